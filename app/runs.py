"""Reading run folders for the dashboard: status, metrics, summary, log, media. No gradio, no
torch: tested directly (the launch form is ``app.forms``, process liveness ``app.processes``).

A run folder ``<runs_dir>/<name>/`` is written by ``python -m reflow_exp.run`` (see
``reflow_exp/rundir.py``); the dashboard adds two files of its own:

- ``dashboard.json``       the launch: pid/pgid of the wrapper, device, command, start time,
                           and ``stop_requested`` once Stop was pressed
- ``dashboard_exit.json``  written by ``app.launcher`` when the run's process exits:
                           ``{"exit_code", "ended"}``
- ``console.txt``          the process's stdout/stderr (``log.txt`` is the run's own tee; this
                           also has what was printed before the run folder was opened)

so the runs table can be rebuilt from the folder alone after a dashboard restart. A run's status
comes from exit records, never from log text: the run's own ``status.json`` (written by
``reflow_exp.run`` when it opens the folder and when it ends, with the exit code and the reason),
else the launcher's ``dashboard_exit.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.processes import launcher_alive, record_owner_alive
from reflow_exp.files import read_json, write_json_atomic  # noqa: F401  re-exported for the app

LAUNCH_FILE = "dashboard.json"
EXIT_FILE = "dashboard_exit.json"
CONSOLE_FILE = "console.txt"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "status.json"  # reflow_exp.rundir.STATUS_FILE
# Folders under runs_dir that are never runs (the Aim repo; the sandbox's data cache has no run files).
NOT_RUNS = {".aim"}
EXIT_INTERRUPTED = 130
STOPPED_CODES = (EXIT_INTERRUPTED, -2, -15, -9)  # SIGINT handled, or killed by SIGINT/SIGTERM/SIGKILL
STATUSES = ("running", "stopping", "finished", "failed", "stopped", "unknown")


# -- reading files ---------------------------------------------------------------------------


_metrics_cache: dict[Path, tuple[tuple[int, int], list[dict]]] = {}
METRICS_TAIL_BYTES = 4 << 20  # the page shows the last 4 MiB of metrics.jsonl (~20k rows)
SUMMARY_MAX_BYTES = 1 << 20  # a real summary.json is a few KiB


def read_metrics(run_dir: Path, max_bytes: int = METRICS_TAIL_BYTES) -> list[dict]:
    """The rows of ``metrics.jsonl``, its last ``max_bytes`` only, so a huge file cannot stall the
    page (cached by size and mtime; a half-written last line is skipped until it is complete)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        stat = path.stat()
    except OSError:
        return []
    key = (stat.st_size, stat.st_mtime_ns)
    cached = _metrics_cache.get(path)
    if cached and cached[0] == key:
        return cached[1]
    rows = []
    with open(path, "rb") as f:
        if stat.st_size > max_bytes:
            f.seek(stat.st_size - max_bytes)
            f.readline()  # a partial line
        for line in f.read(max_bytes).decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    _metrics_cache[path] = (key, rows)
    return rows


def read_summary(run_dir: Path, max_bytes: int = SUMMARY_MAX_BYTES) -> dict:
    """``summary.json`` with its known parts of the expected types (a part of another type is left
    out, never shown as an error page); {} when the file is missing, broken or over ``max_bytes``."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        if path.stat().st_size > max_bytes:
            return {}
    except OSError:
        return {}
    return well_typed_summary(read_json(path))


SUMMARY_DICTS = ("params", "train", "eval", "offline", "run")  # parts that must be JSON objects


def well_typed_summary(summary: dict) -> dict:
    """``summary`` without parts of the wrong type: the dicts above, ``eval.<head>.<steps>`` and
    ``offline.<head>.<steps>`` objects (the rows of the evaluation table)."""
    clean = {k: v for k, v in summary.items() if k not in SUMMARY_DICTS or isinstance(v, dict)}
    for part in ("eval", "offline"):
        if part in clean:
            clean[part] = {
                head: by_steps if head == "straightness" else {k: m for k, m in by_steps.items() if isinstance(m, dict)}
                for head, by_steps in clean[part].items()
                if isinstance(by_steps, dict)
            }
    return clean


def read_log(run_dir: Path, max_chars: int = 200_000) -> str:
    """The run's log: ``log.txt``, or ``console.txt`` before the run opened its folder or when it
    failed before that. Only the last ``max_chars`` characters (cut at a line start)."""
    run_dir = Path(run_dir)
    text = _read_tail(run_dir / LOG_FILE, max_chars)
    if not text.strip():
        text = _read_tail(run_dir / CONSOLE_FILE, max_chars)
    return text


def _read_tail(path: Path, max_chars: int) -> str:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size > max_chars:
                f.seek(size - max_chars)
                data = f.read().decode("utf-8", errors="replace")
                return "… (earlier lines not shown)\n" + data.split("\n", 1)[-1]
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _subset(row: dict) -> str | None:
    context = row.get("context")
    return context.get("subset") if isinstance(context, dict) else None


def train_progress(rows: list[dict]) -> tuple[int | None, float | None]:
    """(last training step, last training loss) from metrics rows."""
    step = loss = None
    for row in rows:
        if _subset(row) == "train":
            step = row.get("step", step)
            if _finite(row.get("loss")):
                loss = float(row["loss"])
    return step, loss


def total_steps(run_dir: Path) -> int | None:
    """``Trainer.steps`` from the run's operative config, if written yet."""
    try:
        text = (Path(run_dir) / "operative_config.gin").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"^Trainer\.steps\s*=\s*(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def vlm_load_count(summary: dict, rows: list[dict] | None = None) -> int | None:
    """``summary.json``'s ``vlm_load_count``; before it is written, the setup row of metrics."""
    value = summary.get("vlm_load_count")
    if value is None:
        for row in rows or []:
            if _subset(row) == "setup" and "vlm_load_count" in row:
                value = row["vlm_load_count"]
    return int(value) if _finite(value) else None


PARAM_ROWS = (
    ("total", "Total"),
    ("trainable", "Trainable"),
    ("backbone", "Backbone (VLM)"),
    ("teacher_head", "Teacher head"),
    ("student_head", "Student head"),
)


def params_rows(summary: dict) -> list[list[str]]:
    """Rows ``[part, count, share of total]`` for the parameter table; absent parts show ``—``."""
    params = summary.get("params") or {}
    total = params.get("total")
    rows = []
    for key, label in PARAM_ROWS:
        value = params.get(key)
        if not _finite(value):
            rows.append([label, "—", ""])
            continue
        share = f"{100 * value / total:.2f}%" if _finite(total) and total and key != "total" else ""
        rows.append([label, f"{int(value):,}", share])
    return rows


EVAL_COLUMNS = ["Head", "Steps", "Success", "95% interval", "Mean return", "Latency (ms)", "Episodes", "Offline error"]


def eval_rows(summary: dict) -> list[list[Any]]:
    """Teacher/student × steps rows from ``summary.eval`` (rollouts) and ``summary.offline``."""
    evaluation = summary.get("eval") or {}
    offline = summary.get("offline") or {}
    keys: set[tuple[str, int]] = set()
    for source in (evaluation, offline):
        for head, by_steps in source.items():
            if isinstance(by_steps, dict) and head != "straightness":
                keys.update((head, int(k)) for k in by_steps if str(k).isdigit())
    order = {"teacher": 0, "student": 1}
    rows = []
    for head, steps in sorted(keys, key=lambda k: (order.get(k[0], 2), k[0], k[1])):
        m = (evaluation.get(head) or {}).get(str(steps)) or {}
        o = (offline.get(head) or {}).get(str(steps)) or {}
        rows.append(
            [
                head,
                steps,
                _fmt(m.get("success_rate"), "{:.0%}"),
                _interval(m),
                _fmt(m.get("mean_return"), "{:.3f}"),
                _fmt(m.get("latency_ms"), "{:.1f}"),
                _fmt(m.get("episodes"), "{:.0f}"),
                _fmt(o.get("error"), "{:.4f}"),
            ]
        )
    return rows


def _interval(metrics: dict) -> str:
    """The success rate's 95% Wilson interval, e.g. ``81–95%``; ``—`` when absent."""
    low, high = metrics.get("ci_low"), metrics.get("ci_high")
    return f"{100 * low:.0f}–{100 * high:.0f}%" if _finite(low) and _finite(high) else "—"


def _fmt(value: Any, pattern: str) -> str:
    return pattern.format(value) if _finite(value) else "—"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_points(rows: list[dict]) -> dict[str, list[dict]]:
    """Long-format points for the plots:

    - ``loss``: train loss, series = head
    - ``loss_by_t``: ``loss_t<a>-<b>`` bins, series = ``t in [a, b)`` (+ head if several)
    - ``offline``: eval ``offline_error``, series = ``<head> @<k> steps``
    - ``lr``: learning rate
    """
    out: dict[str, list[dict]] = {"loss": [], "loss_by_t": [], "offline": [], "lr": []}
    heads = {(r.get("context") or {}).get("head") for r in rows if _subset(r) == "train"}
    for row in rows:
        subset, step = _subset(row), row.get("step")
        if not isinstance(step, (int, float)):
            continue
        context = row.get("context") or {}
        head = context.get("head") or "train"
        if subset == "train":
            if _finite(row.get("loss")):
                out["loss"].append({"step": step, "value": row["loss"], "series": head})
            if _finite(row.get("lr")):
                out["lr"].append({"step": step, "value": row["lr"], "series": head})
            for key, value in row.items():
                if key.startswith("loss_t") and _finite(value):
                    label = "t ∈ [" + key[len("loss_t") :].replace("-", ", ") + ")"
                    if len(heads) > 1:
                        label = f"{head} {label}"
                    out["loss_by_t"].append({"step": step, "value": value, "series": label})
        elif subset == "eval" and _finite(row.get("offline_error")):
            out["offline"].append(
                {"step": step, "value": row["offline_error"], "series": f"{head} @{context.get('steps', '?')} steps"}
            )
    return out


MEDIA_SKIP = {"checkpoints", "student", ".aim"}


def find_media(run_dir: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files with these suffixes in the run folder and its subfolders (checkpoints and model
    exports skipped), sorted by path."""
    run_dir = Path(run_dir)
    found = []
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = sorted(d for d in dirs if d not in MEDIA_SKIP and not d.startswith("."))
        found += [Path(root) / f for f in files if f.lower().endswith(suffixes) and not f.startswith(".")]
    return sorted(found)


# -- run status ------------------------------------------------------------------------------


@dataclass
class RunInfo:
    name: str
    path: Path
    status: str  # one of STATUSES
    device: str  # "CPU", "GPU 0", "—"
    started: float | None
    step: int | None
    total_steps: int | None
    last_loss: float | None
    pid: int | None = None
    exit_code: int | None = None
    detail: str = ""  # why this status (exit code, ...)
    launch: dict = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.status in ("running", "stopping")

    @property
    def started_text(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)) if self.started else "—"

    @property
    def started_short(self) -> str:
        return time.strftime("%m-%d %H:%M", time.localtime(self.started)) if self.started else "—"

    @property
    def step_text(self) -> str:
        if self.step is None:
            return "—"
        return f"{self.step}/{self.total_steps}" if self.total_steps else str(self.step)

    @property
    def loss_text(self) -> str:
        return f"{self.last_loss:.4g}" if self.last_loss is not None else "—"


def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return (
        path.is_dir()
        and path.name not in NOT_RUNS
        and any((path / f).exists() for f in (LAUNCH_FILE, "config.gin", LOG_FILE))
    )


def run_status(run_dir: Path) -> RunInfo:
    """The status of one run folder, from exit records and process liveness, never log text:
    see ``_status``."""
    from app.gpus import device_label

    run_dir = Path(run_dir)
    launch = read_json(run_dir / LAUNCH_FILE)
    summary = read_summary(run_dir)
    rows = read_metrics(run_dir)
    step, loss = train_progress(rows)
    status, detail, exit_code = _status(
        launch,
        read_json(run_dir / EXIT_FILE),
        read_json(run_dir / STATUS_FILE),
        summary,
        launcher_alive(launch, run_dir),
        run_dir,
    )
    started = launch.get("started")
    if started is None:
        started = _mtime(run_dir / "config.gin") or _mtime(run_dir / LOG_FILE)
    return RunInfo(
        name=run_dir.name,
        path=run_dir,
        status=status,
        device=device_label(launch.get("cuda_visible_devices")) if launch else summary_device(summary),
        started=started,
        step=step,
        total_steps=total_steps(run_dir),
        last_loss=loss,
        pid=launch.get("pid"),
        exit_code=exit_code,
        detail=detail,
        launch=launch,
    )


def summary_device(summary: dict) -> str:
    """The Device column of a run started from the command line (no ``dashboard.json``), from the
    ``run`` record ``reflow_exp.run`` writes into summary.json; ``—`` when absent or malformed."""
    from app.gpus import device_label

    record = summary.get("run")
    if not isinstance(record, dict) or record.get("device") not in ("cpu", "cuda"):
        return "—"
    processes = record.get("processes")
    n = processes if isinstance(processes, int) and not isinstance(processes, bool) else 1
    visible = record.get("cuda_visible_devices")
    label = (
        "CPU" if record["device"] == "cpu" else device_label(visible) if isinstance(visible, str) and visible else "GPU"
    )
    return label if n <= 1 or "processes" in label else f"{label} · {n} processes"


def _status(
    launch: dict, exit_info: dict, record: dict, summary: dict, launched_alive: bool, run_dir: Path
) -> tuple[str, str, int | None]:
    """(status, detail, exit code) from the dashboard's launch and exit files and the run's own
    ``status.json``, in this order:

    1. a live process: the launcher of a dashboard run (``launched_alive``: see
       ``processes.launcher_alive``), or the pid that holds ``status.json``'s "running" record (a run
       started from the command line);
    2. the newest exit record of the last session: the run's ``status.json`` (it has the reason)
       unless it is older than the dashboard's launch, else the launcher's exit code;
    3. no exit record: the process died without a word (SIGKILL, OOM).
    """
    stop_requested = bool(launch.get("stop_requested"))
    if launch and not exit_info and launched_alive:
        return ("stopping" if stop_requested else "running"), "", None
    if record.get("status") == "running" and record_owner_alive(record, run_dir):
        return "running", "" if launch else "started outside the dashboard", None

    final = None
    if record.get("exit_code") is not None and (record.get("started") or 0) >= (launch.get("started") or 0):
        final = record
    elif launch and exit_info.get("exit_code") is not None:
        final = exit_info
    if final is not None:
        code, message = final["exit_code"], final.get("message") or ""
        if code == 0:
            return "finished", "", code
        if code in STOPPED_CODES or (stop_requested and final is exit_info):
            return "stopped", f"exit code {code}", code
        reason = message or ("config error" if code == 2 else "")
        return "failed", f"exit code {code}" + (f": {reason}" if reason else ""), code

    if launch and stop_requested:
        return "stopped", "killed", None
    if launch or record.get("status") == "running":
        return "failed", "the process ended without recording an exit code (killed?)", None
    if "train" in summary:  # a run from before status.json existed: jobs write `train` last
        return "finished", "", None
    return "unknown", "no exit record", None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def list_runs(runs_dir: Path) -> list[RunInfo]:
    """Every run folder under ``runs_dir``, newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [run_status(p) for p in runs_dir.iterdir() if is_run_dir(p)]
    return sorted(runs, key=lambda r: (r.started or 0, r.name), reverse=True)
