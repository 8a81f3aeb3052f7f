"""The run folder: everything one job run writes, and the ``run`` settings gin binds.

``<runs_dir>/<name>/`` holds::

    config.gin             the gin files + --gin_param bindings exactly as given
    operative_config.gin   the values actually used (saved after build and at the end)
    log.txt                everything printed to stdout/stderr (line-buffered: tail it live)
    metrics.jsonl          one JSON object per log_metrics call
    summary.json           machine-readable results (DESIGN.md §5)
    status.json            how the last session ended: {"status", "exit_code", "message", "pid",
                           "started", "ended"}; "running" while a process holds the folder
    checkpoints/           see checkpoint.py
    aim_run_hash.txt       the Aim run this folder logs to
    .lock                  flock-ed by the process that has the folder open (its pid inside)

Running again with the same ``run.name`` resumes: the folder is reopened, logs are appended to
and the trainer continues from ``checkpoints/last``. Only one process at a time may have a run
folder open: a second one is refused (``RunLocked``) before it writes anything. The lock is the
kernel's (``flock``), so it goes with its process, even a SIGKILLed one: a stale ``.lock`` file
never blocks.

Non-finite metric values (NaN, ±inf) are written as ``null`` in metrics.jsonl, so every line is
strict JSON.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import gin
from reflow_exp.checkpoint import checkpoint_step, latest_checkpoint
from reflow_exp.distributed import DEFAULT_TIMEOUT_S
from reflow_exp.files import deep_merge, json_safe, read_json, remove_stale_temp_files, write_atomic
from reflow_exp.tracking import Tracker, TrackerCloseError

CONFIG_FILE = "config.gin"
OPERATIVE_CONFIG_FILE = "operative_config.gin"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
STATUS_FILE = "status.json"
LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another live process has this run folder open; the message names it."""


@dataclass(frozen=True)
class RunSettings:
    """What ``run.*`` in gin resolves to. ``job`` is the configured job callable."""

    job: Callable[..., Any]
    name: str
    runs_dir: Path
    seed: int
    dist_timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def path(self) -> Path:
        return self.runs_dir / self.name


@gin.configurable("run")
def run_settings(
    job=gin.REQUIRED,
    name: str | None = None,
    runs_dir: str = "runs",
    seed: int = 0,
    dist_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RunSettings:
    """Settings of a run, bound in gin as ``run.job = @train_teacher``, ``run.name = "x"``, ...

    Args:
        job: the job to run (a gin reference, e.g. ``@train_teacher``); called as
            ``job(run_dir)``, or ``job(None, dry_run=True)`` for ``--dry_run``.
        name: run folder name under ``runs_dir``; None → a timestamp ``YYYYmmdd-HHMMSS``.
            An existing folder with that name is resumed.
        runs_dir: folder that holds all run folders (also the Aim repo by default).
        seed: seeds python, numpy and torch before the job starts (the same in every process).
        dist_timeout_s: with several processes (torchrun / accelerate launch), how long a process
            waits to reach rank 0 and, later, for the others at each synchronisation point.
    """
    if not callable(job):
        raise TypeError(f"run.job must be a job reference like `@train_teacher`, got {job!r}")
    name = name or time.strftime("%Y%m%d-%H%M%S")
    if not name or "/" in name or "\x00" in name or name in (".", "..") or len(name) > 255:
        shown = repr(name) if len(name) <= 80 else f"{name[:80]!r}… ({len(name):,} characters)"
        raise ValueError(f"run.name must be a plain folder name of up to 255 characters, got {shown}")
    if not dist_timeout_s > 0:
        raise ValueError(f"run.dist_timeout_s must be > 0 seconds, got {dist_timeout_s!r}")
    return RunSettings(
        job=job, name=name, runs_dir=Path(runs_dir), seed=int(seed), dist_timeout_s=float(dist_timeout_s)
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class RunDir:
    """One run folder: files, stdout/stderr tee into ``log.txt``, metrics, summary and tracker.

    Use as a context manager (or call ``close()``): it restores stdout/stderr and closes the
    Aim run even when the job fails.

    Args:
        path: the run folder; created if missing, resumed if it has ``checkpoints/``.
        seed: the run's seed (recorded; the caller seeds).
        config_text: text for ``config.gin`` (the gin files and bindings as given).
        hparams: nested dict of hyper-parameters for Aim (e.g. the parsed gin bindings).
        tracker: a ready Tracker; None → ``Tracker(path)`` configured by gin.

    With several processes only rank 0 opens a RunDir; the others get a ``WorkerRun``.
    """

    is_main = True  # the process that writes (see WorkerRun)

    def __init__(
        self,
        path: str | Path,
        *,
        seed: int = 0,
        config_text: str | None = None,
        hparams: Mapping[str, Any] | None = None,
        tracker: Tracker | None = None,
    ):
        self.path = Path(path)
        self.seed = seed
        self.checkpoints_dir = self.path / CHECKPOINTS_DIR
        resuming = self.checkpoints_dir.is_dir()
        self._lock_fd = lock_run_folder(self.path)  # first: a refused process writes nothing
        self.tracker: Tracker | None = None
        self._log = open(self.path / LOG_FILE, "a", buffering=1, encoding="utf-8")
        self._stdout, self._stderr = sys.stdout, sys.stderr
        sys.stdout = _Tee(self._stdout, self._log)
        sys.stderr = _Tee(self._stderr, self._log)
        self._log_handlers = _redirect_logging({self._stdout: sys.stdout, self._stderr: sys.stderr})
        try:
            for stale in remove_stale_temp_files(self.path):
                print(f"Removed {stale.name}, left by a process that died while writing it")
            self.resume_from = latest_checkpoint(self.checkpoints_dir) if resuming else None
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            if self.resume_from is not None:
                step = checkpoint_step(self.resume_from)
                print(f"[{stamp}] Resuming from {self.resume_from} (step {step})")
            elif resuming:
                print(f"[{stamp}] Run folder {self.path} has no complete checkpoint; starting at step 0")
            else:
                print(f"[{stamp}] Run folder {self.path}")
            self._started = time.time()
            write_atomic(
                self.path / STATUS_FILE,
                json.dumps({"status": "running", "pid": os.getpid(), "started": self._started}) + "\n",
            )
            if config_text is not None:
                self._write_config(config_text)
            self.summary: dict = _read_json(self.path / SUMMARY_FILE)
            self.tracker = tracker if tracker is not None else Tracker(self.path)
            if hparams:
                self.tracker.log_params(hparams)
        except BaseException:
            self.close()
            raise

    # -- files ---------------------------------------------------------------------------------

    def log_metrics(self, step: int, metrics: Mapping[str, Any], **context: Any) -> None:
        """Append ``{"step", "time", "context", **metrics}`` to metrics.jsonl and track in Aim.

        ``context`` becomes the Aim context, e.g. ``subset="train", head="student"``.
        """
        values = {name: _to_float(name, value) for name, value in metrics.items()}
        reserved = {"step", "time", "context"} & values.keys()
        if reserved:
            raise ValueError(f"metric names {sorted(reserved)} are reserved in metrics.jsonl; rename them")
        context = {k: json_safe(v) for k, v in context.items()}
        finite = {k: v if math.isfinite(v) else None for k, v in values.items()}  # strict JSON: null
        record = {"step": int(step), "time": time.time(), "context": context, **finite}
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        for name, value in values.items():
            self.tracker.track(name, value, step=step, context=context)

    def update_summary(self, update: Mapping[str, Any]) -> dict:
        """Deep-merge ``update`` into summary.json (written atomically) and return the summary."""
        self.summary = deep_merge(self.summary, json_safe(update))
        write_atomic(self.path / SUMMARY_FILE, json.dumps(self.summary, indent=2) + "\n")
        return self.summary

    def record_exit(self, status: str, exit_code: int, message: str = "") -> None:
        """Write status.json for this session's end (``status``: finished, failed, interrupted).

        On a full disk the atomic write (a new temp file) fails; the record is then written over
        the "running" one in place, into the blocks that file already holds, so the dashboard
        does not show a dead run as running."""
        record = {
            "status": status,
            "exit_code": int(exit_code),
            "message": message,
            "pid": os.getpid(),
            "started": self._started,
            "ended": time.time(),
        }
        text = json.dumps(record, indent=2) + "\n"
        try:
            write_atomic(self.path / STATUS_FILE, text)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            with open(self.path / STATUS_FILE, "r+", encoding="utf-8") as f:
                f.write(json.dumps(record, separators=(",", ":")) + "\n")
                f.truncate()

    def close_tracker(self) -> str | None:
        """Close the Aim run (bounded: see ``Tracker.close``); returns the error when it hung."""
        try:
            self.tracker.close()
        except TrackerCloseError as e:
            print(f"error: {e}", file=sys.stderr)
            return str(e)
        return None

    def save_operative_config(self) -> str:
        """Write operative_config.gin (values of every configurable called so far) and log it."""
        text = gin.operative_config_str()
        write_atomic(self.path / OPERATIVE_CONFIG_FILE, text)
        self.tracker.log_text("operative_config", text)
        return text

    def _write_config(self, text: str) -> None:
        config = self.path / CONFIG_FILE
        if not config.exists():
            write_atomic(config, text)
        elif config.read_text() != text:
            # Resumed with a different config: keep the original, record the new one beside it.
            other = self.path / f"config.{time.strftime('%Y%m%d-%H%M%S')}.gin"
            write_atomic(other, text)
            print(f"Note: the gin config differs from this run's {CONFIG_FILE}; saved it as {other.name}")

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the tracker, restore stdout/stderr, close log.txt. Safe to call twice."""
        try:
            if self.tracker is not None:
                self.close_tracker()
        finally:
            for handler, stream in self._log_handlers:
                handler.setStream(stream)
            self._log_handlers = []
            if isinstance(sys.stdout, _Tee) and sys.stdout.log is self._log:
                sys.stdout.flush_pending()
                sys.stdout = self._stdout
            if isinstance(sys.stderr, _Tee) and sys.stderr.log is self._log:
                sys.stderr.flush_pending()
                sys.stderr = self._stderr
            with contextlib.suppress(OSError):  # a full disk: what it could not take is lost
                self._log.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WorkerRun:
    """What ranks > 0 of a multi-process run get instead of a ``RunDir``: the same folder, seed and
    checkpoints (to resume from), and writing methods that do nothing, because rank 0 writes the
    config, log, metrics, summary, Aim run and checkpoints. Its stdout is discarded (rank 0 prints
    for everyone), and so are its warnings (Python's ``warnings`` and ``logging`` below ERROR, which
    rank 0 shows once); stderr stays, so errors still show.
    """

    is_main = False

    def __init__(self, path: str | Path, *, seed: int = 0):
        self.path = Path(path)
        self.seed = seed
        self.checkpoints_dir = self.path / CHECKPOINTS_DIR
        self.summary: dict = {}
        self.tracker = Tracker(self.path, enabled=False)
        self._stdout, self._devnull = sys.stdout, open(os.devnull, "w")
        sys.stdout = self._devnull
        # Errors only: rank 0 already shows the warnings every rank would repeat.
        self._logging_disabled = logging.root.manager.disable
        logging.disable(logging.WARNING)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")

    def log_metrics(self, step: int, metrics: Mapping[str, Any], **context: Any) -> None:
        pass

    def update_summary(self, update: Mapping[str, Any]) -> dict:
        return self.summary

    def save_operative_config(self) -> str:
        return ""

    def record_exit(self, status: str, exit_code: int, message: str = "") -> None:
        pass

    def close_tracker(self) -> str | None:
        return None

    def close(self) -> None:
        if sys.stdout is self._devnull:
            sys.stdout = self._stdout
        self._devnull.close()
        if self._warnings is not None:
            self._warnings.__exit__(None, None, None)
            self._warnings = None
            logging.disable(self._logging_disabled)

    def __enter__(self) -> WorkerRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _redirect_logging(streams: dict) -> list[tuple[logging.StreamHandler, Any]]:
    """Point every logging handler that writes to the console (a stream in ``streams``, e.g. the
    stderr a library's ``basicConfig`` captured before the run) at its tee, so warnings sent through
    ``logging`` reach log.txt too. Returns (handler, old stream) pairs to restore."""
    loggers = [
        logging.getLogger(),
        *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)),
    ]
    redirected = []
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if type(handler) is logging.StreamHandler and any(stream is s for s in streams):
                tee = next(t for s, t in streams.items() if s is stream)
                redirected.append((handler, handler.setStream(tee)))
    return redirected


class _Tee:
    """Writes to a stream and, line by line, to a log file.

    Progress bars redraw a line with ``\\r``; the log keeps only what the line finally shows,
    so log.txt stays readable (tqdm's final bar line, not thousands of redraws).
    """

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream = stream
        self.log = log
        self._pending = ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        if not self.log.closed:
            self._pending += text
            if "\n" in self._pending:
                *lines, self._pending = self._pending.split("\n")
                self._write_log("".join(line.rsplit("\r", 1)[-1] + "\n" for line in lines))
        return len(text)

    def _write_log(self, text: str) -> None:
        """Append to log.txt; when that fails (a full disk) the log is closed and the console
        keeps everything: an error message must never fail because the log cannot take it."""
        try:
            self.log.write(text)
        except OSError as e:
            self._give_up(e)

    def _give_up(self, error: OSError) -> None:
        with contextlib.suppress(OSError):
            self.log.close()
        self.stream.write(f"(log.txt is no longer written: {error})\n")

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush_pending(self) -> None:
        """Write a trailing partial line (no newline yet) to the log."""
        tail = self._pending.rsplit("\r", 1)[-1]
        self._pending = ""
        if tail.strip() and not self.log.closed:
            self._write_log(tail + "\n")

    def flush(self) -> None:
        self.stream.flush()
        if not self.log.closed:
            try:
                self.log.flush()
            except OSError as e:
                self._give_up(e)

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, ...
        return getattr(self.stream, name)


def _to_float(name: str, value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}: {value!r}") from None


def _read_json(path: Path) -> dict:
    """Strict, unlike `files.read_json`: a damaged summary.json stops the run instead of being
    replaced by an empty one."""
    return json.loads(path.read_text()) if path.exists() else {}


def lock_run_folder(path: Path) -> int | None:
    """Create the run folder if needed and take an exclusive ``flock`` on ``<path>/.lock``, held
    until the returned descriptor is closed (or the process dies). The lock file records the
    owner (pid, command line, start time) for the message a refused process prints.

    Under torchrun only rank 0 locks (the other ranks belong to the same run); returns None then.

    Raises:
        RunLocked: another live process holds the lock.
    """
    if os.environ.get("RANK", "0") != "0":
        return None
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        owner = read_json(path / LOCK_FILE)
        pid = owner.get("pid", "?")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])) if "started" in owner else "?"
        raise RunLocked(
            f"run folder {path} is in use by process {pid} (started {since}: {owner.get('command', '?')}). "
            f"Wait for it to end or stop it (kill -INT {pid}), or choose another run.name."
        ) from None
    owner = {"pid": os.getpid(), "started": time.time(), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    return fd
