"""Pure logic of the dashboard: gin files, overrides, run names and commands, and reading run
folders (status, metrics, summary, media). No gradio, no torch: tested directly.

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

Everything the dashboard acts on stays inside the runs folder: ``confined_path`` is the one check
for the run folders it launches, stops and shows, and for the folders that overrides make a run
write to (``WRITE_LOCATIONS``).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflow_exp.files import read_json, write_json_atomic  # noqa: F401  re-exported for the app

REPO_ROOT = Path(__file__).resolve().parent.parent
GIN_DIR = REPO_ROOT / "gin"
LAUNCH_FILE = "dashboard.json"
EXIT_FILE = "dashboard_exit.json"
CONSOLE_FILE = "console.txt"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "status.json"  # reflow_exp.rundir.STATUS_FILE
# Bindings the dashboard sets itself (from the Name field and --runs-dir).
RESERVED_BINDINGS = {"run.name": "the Run name field", "run.runs_dir": "the dashboard's --runs-dir"}
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Folders under runs_dir that are never runs (the Aim repo; the sandbox's data cache has no run files).
NOT_RUNS = {".aim"}
EXIT_INTERRUPTED = 130
STOPPED_CODES = (EXIT_INTERRUPTED, -2, -15, -9)  # SIGINT handled, or killed by SIGINT/SIGTERM/SIGKILL
# Parameters that name a folder a run writes into: an override may point them only inside the runs
# folder, unless the launch form's "allow writes outside runs/" is on.
WRITE_LOCATIONS = {
    "sandbox_source.root": "the sandbox cache is built there",
    "lerobot_source.root": "a dataset missing there is downloaded there",
    "Tracker.repo": "the Aim repo is written there",
}
STATUSES = ("running", "stopping", "finished", "failed", "stopped", "unknown")


class LaunchError(ValueError):
    """Bad input from the launch form; the message says what is wrong and what to do."""


# -- gin files -------------------------------------------------------------------------------


def list_gin_files(gin_dir: Path = GIN_DIR) -> list[str]:
    """Every ``*.gin`` under ``gin_dir`` (recursively), as posix paths relative to it, sorted
    with top-level files first (``base.gin``, then ``sandbox/...``, ``smolvla/...``)."""
    gin_dir = Path(gin_dir)
    if not gin_dir.is_dir():
        return []
    files = [p.relative_to(gin_dir).as_posix() for p in gin_dir.rglob("*.gin") if p.is_file()]
    return sorted(files, key=lambda f: (f.count("/"), f))


def resolve_gin_file(name: str, gin_dir: Path = GIN_DIR) -> Path:
    """Check a gin file chosen in the form and return its absolute path inside ``gin_dir``.

    Accepts ``sandbox/tiny.gin`` or ``gin/sandbox/tiny.gin``.

    Raises:
        LaunchError: empty, outside ``gin_dir`` (absolute paths, ``..``, symlinks out), not a
            ``.gin`` file, or missing.
    """
    text = (name or "").strip()
    if not text:
        raise LaunchError("Choose a gin file.")
    gin_dir = Path(gin_dir).resolve()
    if os.path.isabs(text) or text.startswith("~"):
        raise LaunchError(f"Gin file {text!r} is outside gin/: pick one of the listed files (paths relative to gin/).")
    relative = text[len("gin/"):] if text.startswith("gin/") else text
    path = (gin_dir / relative).resolve()
    if not path.is_relative_to(gin_dir):
        raise LaunchError(f"Gin file {text!r} is outside gin/: pick one of the listed files.")
    if path.suffix != ".gin":
        raise LaunchError(f"{text!r} is not a .gin file.")
    if not path.is_file():
        raise LaunchError(f"Unknown gin file {text!r}: no such file in gin/. Pick one of the listed files.")
    return path


# -- overrides -------------------------------------------------------------------------------


def parse_overrides(text: str | None) -> list[str]:
    """One gin binding per line (``Trainer.steps = 100``) → the list of bindings.

    Blank lines and ``#`` comments are skipped. Each line must be a single binding gin can parse
    (``[scope/]configurable.parameter = value``); includes, imports and macros are refused here,
    as are ``run.name`` and ``run.runs_dir`` (set by the dashboard).

    Raises:
        LaunchError: naming the line number and the line.
    """
    from gin import config_parser

    from reflow_exp import gin_config  # light: gin only, no registry lookups, no torch

    bindings = []
    for number, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"Override line {number} ({line!r})"
        if "=" not in line:
            raise LaunchError(f"{where}: expected `configurable.parameter = value`, e.g. `Trainer.steps = 100`.")
        try:
            statements = gin_config.statements(line + "\n", label=where)
        except gin_config.ConfigError as e:
            raise LaunchError(f"{where}: not a valid gin binding ({str(e).split('gin syntax error: ')[-1]}). "
                              "Write `configurable.parameter = value`; values are Python literals: quote strings, "
                              "close brackets.") from None
        if len(statements) != 1 or not isinstance(statements[0], config_parser.BindingStatement):
            raise LaunchError(f"{where}: only bindings `configurable.parameter = value` are allowed here "
                              "(no include or import; put those in a gin file).")
        stmt = statements[0]
        if not stmt.arg_name:
            raise LaunchError(f"{where}: `{stmt.selector}` has no parameter; write `configurable.parameter = value`.")
        key = f"{stmt.selector}.{stmt.arg_name}"
        if not stmt.scope and key in RESERVED_BINDINGS:
            raise LaunchError(f"{where}: {key} is set by {RESERVED_BINDINGS[key]}; remove this line.")
        bindings.append(line)
    return bindings


def check_write_locations(bindings: list[str], runs_dir: Path, repo_root: Path) -> None:
    """Refuse overrides that make a run write outside ``runs_dir`` (see ``WRITE_LOCATIONS``).

    Values are paths relative to ``repo_root`` (the runs' working directory) or absolute;
    ``None`` (the default location) is fine.

    Raises:
        LaunchError: naming the binding, the folder and the option that allows it.
    """
    from reflow_exp import gin_config

    for line in bindings:
        (stmt,) = gin_config.parse_bindings(line + "\n", label=line)
        key = f"{stmt.selector.rsplit('.', 1)[-1]}.{stmt.arg_name}"  # module-qualified selectors too
        if key not in WRITE_LOCATIONS or stmt.value is None:
            continue
        if not isinstance(stmt.value, str) or stmt.value.startswith(("@", "%")):
            raise LaunchError(f"Override {line!r}: {key} must be a quoted folder path.")
        try:
            confined_path(runs_dir, stmt.value, base=repo_root, what=f"{key} ({WRITE_LOCATIONS[key]})")
        except LaunchError as e:
            raise LaunchError(f"Override {line!r}: {e} Put it inside the runs folder, or tick "
                              "\"Allow writes outside runs/\" on the launch form.") from None


def confined_path(runs_dir: Path, path: str | Path, *, base: Path | None = None, what: str = "Path") -> Path:
    """``path`` resolved (relative to ``base``, default ``runs_dir``; ``~`` expanded, ``..`` and
    symlinks followed) when it lies inside ``runs_dir``: the one confinement check of the
    dashboard, for run folders (launch, stop, show) and for folders overrides write to.

    Raises:
        LaunchError: it points outside ``runs_dir``.
    """
    root = Path(runs_dir).resolve()
    resolved = (Path(base or root) / Path(os.path.expanduser(str(path)))).resolve()
    if not resolved.is_relative_to(root):
        raise LaunchError(f"{what} {str(path)!r} resolves to {resolved}, outside the runs folder {root}.")
    return resolved


def run_folder(runs_dir: Path, name: str) -> Path:
    """The folder of run ``name``: a plain name (``check_run_name``) inside ``runs_dir``, also
    after following symlinks (``confined_path``).

    Raises:
        LaunchError: a bad name, or a folder that leads outside ``runs_dir``.
    """
    path = confined_path(runs_dir, check_run_name(name), what="Run folder")
    if path == Path(runs_dir).resolve():
        raise LaunchError(f"Run name {name!r} names the runs folder itself.")
    return path


# -- run names and commands ------------------------------------------------------------------


def check_run_name(name: str) -> str:
    """A plain folder name: letters, digits, ``.``, ``_``, ``-`` (not starting with a dot).

    Raises:
        LaunchError: otherwise.
    """
    text = (name or "").strip()
    if not RUN_NAME_RE.match(text):
        raise LaunchError(f"Run name {text!r} is not allowed: use letters, digits, '.', '_' or '-' "
                          "(up to 100, starting with a letter or digit).")
    return text


def default_run_name(runs_dir: Path, now: float | None = None) -> str:
    """A ``YYYYmmdd-HHMMSS`` timestamp, suffixed ``-2``, ``-3``... if that folder exists."""
    base = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    name, n = base, 1
    while (Path(runs_dir) / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def gin_string(value: str) -> str:
    """A Python/gin string literal for ``value`` (paths and names)."""
    return json.dumps(str(value))


def build_command(gin_files: list[str], overrides: list[str], name: str, runs_dir: Path,
                  *, python: str = sys.executable, dry_run: bool = False) -> list[str]:
    """``python -m reflow_exp.run --gin_file ... --gin_param ... --gin_param run.name=... ``.

    ``gin_files`` as passed (relative to the repo root, e.g. ``gin/sandbox/tiny.gin``); the
    run name and runs folder go last, so they win over the gin files.
    """
    cmd = [python, "-m", "reflow_exp.run"]
    for f in gin_files:
        cmd += ["--gin_file", f]
    for binding in overrides:
        cmd += ["--gin_param", binding]
    cmd += ["--gin_param", f"run.name = {gin_string(name)}", "--gin_param", f"run.runs_dir = {gin_string(runs_dir)}"]
    if dry_run:
        cmd.append("--dry_run")
    return cmd


def config_error_message(stderr: str, stdout: str = "") -> str:
    """What to show for a failed ``--dry_run``: the ``error: ...`` lines, or the last line of a
    traceback (the exception and its message), never the whole traceback."""
    lines = [l.rstrip() for l in (stderr or "").splitlines() if l.strip()]
    errors = [l[len("error: "):] if l.startswith("error: ") else l for l in lines if l.startswith("error:")]
    if errors:
        # `error:` may be followed by continuation lines (one problem per line).
        start = next(i for i, l in enumerate(lines) if l.startswith("error:"))
        rest = [l for l in lines[start + 1:] if not l.startswith(("Traceback", "  File "))]
        return "\n".join([errors[0], *rest]).strip()
    if any(l.startswith("Traceback") for l in lines):
        last = next((l for l in reversed(lines) if not l.startswith(" ")), lines[-1])
        return last.strip()
    tail = lines[-5:] or [l for l in (stdout or "").splitlines() if l.strip()][-5:]
    return "\n".join(tail) or "the dry run failed without a message"


# -- reading files ---------------------------------------------------------------------------


_metrics_cache: dict[Path, tuple[tuple[int, int], list[dict]]] = {}


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (cached by size and mtime; a half-written last line is
    skipped until it is complete)."""
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
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    _metrics_cache[path] = (key, rows)
    return rows


def read_summary(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / SUMMARY_FILE)


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


PARAM_ROWS = (("total", "Total"), ("trainable", "Trainable"), ("backbone", "Backbone (VLM)"),
              ("teacher_head", "Teacher head"), ("student_head", "Student head"))


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
        rows.append([
            head, steps,
            _fmt(m.get("success_rate"), "{:.0%}"),
            _interval(m),
            _fmt(m.get("mean_return"), "{:.3f}"),
            _fmt(m.get("latency_ms"), "{:.1f}"),
            _fmt(m.get("episodes"), "{:.0f}"),
            _fmt(o.get("error"), "{:.4f}"),
        ])
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
                    label = "t ∈ [" + key[len("loss_t"):].replace("-", ", ") + ")"
                    if len(heads) > 1:
                        label = f"{head} {label}"
                    out["loss_by_t"].append({"step": step, "value": value, "series": label})
        elif subset == "eval" and _finite(row.get("offline_error")):
            out["offline"].append({"step": step, "value": row["offline_error"],
                                   "series": f"{head} @{context.get('steps', '?')} steps"})
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


# -- processes -------------------------------------------------------------------------------


def process_start_time(pid: int) -> float | None:
    """The process's creation time (psutil, seconds since the epoch), or None when there is no
    such live process (zombies count as dead)."""
    import psutil

    try:
        process = psutil.Process(int(pid))
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except (TypeError, ValueError, psutil.Error):
        return None


def pid_alive(pid: int | None, start_time: float | None = None) -> bool:
    """Whether ``pid`` is a live process, and the same one (same creation time) if given."""
    current = process_start_time(pid) if pid else None
    return current is not None and (start_time is None or current == start_time)


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
    return path.is_dir() and path.name not in NOT_RUNS and any(
        (path / f).exists() for f in (LAUNCH_FILE, "config.gin", LOG_FILE))


def run_status(run_dir: Path) -> RunInfo:
    """The status of one run folder, from exit records and process liveness, never log text:
    see ``_status``."""
    from app.gpus import device_label

    run_dir = Path(run_dir)
    launch = read_json(run_dir / LAUNCH_FILE)
    summary = read_summary(run_dir)
    rows = read_metrics(run_dir)
    step, loss = train_progress(rows)
    status, detail, exit_code = _status(launch, read_json(run_dir / EXIT_FILE), read_json(run_dir / STATUS_FILE),
                                        summary)
    started = launch.get("started")
    if started is None:
        started = _mtime(run_dir / "config.gin") or _mtime(run_dir / LOG_FILE)
    return RunInfo(
        name=run_dir.name, path=run_dir, status=status,
        device=device_label(launch.get("cuda_visible_devices")) if launch else "—",
        started=started, step=step, total_steps=total_steps(run_dir), last_loss=loss,
        pid=launch.get("pid"), exit_code=exit_code, detail=detail, launch=launch,
    )


def _status(launch: dict, exit_info: dict, record: dict, summary: dict) -> tuple[str, str, int | None]:
    """(status, detail, exit code) from the dashboard's launch and exit files and the run's own
    ``status.json``, in this order:

    1. a live process: the launcher of a dashboard run, or the pid that holds ``status.json``'s
       "running" record (a run started from the command line);
    2. the newest exit record of the last session: the run's ``status.json`` (it has the reason)
       unless it is older than the dashboard's launch, else the launcher's exit code;
    3. no exit record: the process died without a word (SIGKILL, OOM).
    """
    stop_requested = bool(launch.get("stop_requested"))
    if launch and not exit_info and pid_alive(launch.get("pid"), launch.get("proc_start")):
        return ("stopping" if stop_requested else "running"), "", None
    if record.get("status") == "running" and _record_owner_alive(record):
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


def _record_owner_alive(record: dict) -> bool:
    """Whether the process that wrote a "running" status.json still runs (same pid, created
    before it wrote the record: a reused pid is a younger process)."""
    import psutil

    try:
        process = psutil.Process(int(record["pid"]))
        return (process.status() != psutil.STATUS_ZOMBIE
                and process.create_time() <= float(record["started"]) + 1.0)
    except (KeyError, TypeError, ValueError, psutil.Error):
        return False


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
