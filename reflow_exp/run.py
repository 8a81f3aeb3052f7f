"""Run one configured job::

    python -m reflow_exp.run --gin_file gin/sandbox/teacher.gin [--gin_file G ...] \\
        [--gin_param 'Trainer.steps=100' ...] [--dry_run]

Gin files are found relative to the working directory or the repo's ``gin/`` folder (so are
their ``include``s). The whole config is checked before anything is built or written
(``reflow_exp.gin_config``: gin's own parse, then REQUIRED bindings, undefined macros and literal
types). Problems exit with code 2 and name file and line, before the run folder exists.

Exit codes: 0 done, 1 the job failed (status.json in the run folder says why), 2 config error
(or inputs a job's preflight refuses, e.g. a dataset without the teacher's cameras),
3 another process has the run folder open (nothing written), 130 interrupted (resumable).

Then ``run.*`` (see ``reflow_exp.rundir.run_settings``) picks the job and the run folder
``<run.runs_dir>/<run.name>``; the job is called as ``job(run_dir)``, or as
``job(None, dry_run=True)`` under ``--dry_run`` (which writes nothing).

No configurables live here: this module runs as ``__main__``, and a configurable defined in it
would be registered twice (PITFALLS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import gin
from reflow_exp import disk, distributed, jobs, rundir, tracking, trainer  # noqa: F401  register the configurables
from reflow_exp.gin_config import GIN_DIR, Config, ConfigError, load_config  # noqa: F401  GIN_DIR for callers

EXIT_CONFIG_ERROR = 2
EXIT_JOB_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_RUN_LOCKED = 3  # another process has the run folder open


def main(argv: list[str] | None = None) -> int:
    """Parse and check the gin config, then run the job. Returns the process exit code."""
    args = _parse_args(argv)
    gin.clear_config()
    try:
        config = load_config(args.gin_file, args.gin_param)
        settings = rundir.run_settings()
    except (ConfigError, TypeError, ValueError) as e:  # run_settings raises the latter for bad run.*
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    try:
        distributed.check_devices()  # a wrong GPU index fails here, before the run folder exists
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    if args.dry_run:
        return _dry_run(settings)

    try:
        distributed.start(settings.dist_timeout_s)
    except distributed.UnreachableError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_JOB_FAILED
    try:
        _preflight(settings.job)
    except (ValueError, FileNotFoundError) as e:  # the job's inputs do not fit: the message says it all
        print(f"error: {_reason(e)}", file=sys.stderr)
        distributed.stop()
        return EXIT_CONFIG_ERROR
    try:
        return _open_and_run(settings, config)
    finally:
        distributed.stop()


def _preflight(job: Any) -> None:
    """Let a job that can (a `preflight` parameter) check its inputs (teacher folder, data features)
    before the run folder exists; it raises ValueError / FileNotFoundError naming the problem."""
    if "preflight" in inspect.signature(job).parameters:
        job(None, preflight=True)


def _open_and_run(settings: rundir.RunSettings, config: Config) -> int:
    """Open the run folder (rank 0; the other processes share it) and run the job in it."""
    try:
        run = _open_run(settings, config)
    except rundir.RunLocked as e:  # another process has this run folder open; nothing was written
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUN_LOCKED
    with _sigterm_ignored(), run:
        print(f"Job {_name(settings.job)} in {run.path} on {distributed.describe()}")
        run.save_operative_config()
        run.update_summary({"run": distributed.device_record()})
        code, message = _run_job(settings, run)
        with contextlib.suppress(OSError):  # a full disk: the job's error already says so
            run.save_operative_config()
        hung = run.close_tracker()  # before the exit record: it can fail the run
        if hung and code == 0:
            code, message = EXIT_JOB_FAILED, hung
        run.record_exit(_STATUS.get(code, "failed"), code, message)
    return code


_STATUS = {0: "finished", EXIT_INTERRUPTED: "interrupted"}


def _run_job(settings: rundir.RunSettings, run: rundir.RunDir) -> tuple[int, str]:
    """Run the job; returns (exit code, one-line reason for status.json)."""
    try:
        with _sigterm_as_keyboard_interrupt():
            rundir.seed_everything(settings.seed)  # last, so nothing before shifts the stream
            settings.job(run)
    except KeyboardInterrupt:
        if distributed.dead_peers():  # the launcher stopped us because another process died
            return _peer_died()
        print("Interrupted; the run resumes from its last checkpoint if started again.", file=sys.stderr)
        return EXIT_INTERRUPTED, "interrupted"
    except (trainer.TrainingDiverged, trainer.ResumeRefused) as e:  # known ends: the message says it all
        print(f"error: {_reason(e)}", file=sys.stderr)
        return EXIT_JOB_FAILED, _reason(e)
    except Exception as e:
        if distributed.dead_peers():  # a collective failed because another process died
            return _peer_died()
        traceback.print_exc()  # into log.txt too: the tee is still installed
        if disk.is_disk_full(e):
            tracking.storage_blocked()
            print(f"error: {disk.disk_full_message(run.path)}", file=sys.stderr)
            return EXIT_JOB_FAILED, disk.disk_full_message(run.path)
        return EXIT_JOB_FAILED, f"{type(e).__name__}: {_reason(e)}"
    return 0, ""


def _peer_died() -> tuple[int, str]:
    """The status when another process of a multi-process run died: name it; the run resumes."""
    who = ", ".join(f"rank {rank} (pid {pid})" for rank, pid in distributed.dead_peers())
    message = (
        f"{who} of this run died (killed? out of memory?), so this process stopped too; the run resumes from "
        "its last checkpoint when started again with the same number of processes"
    )
    print(f"error: {message}", file=sys.stderr)
    return EXIT_JOB_FAILED, message


def _reason(error: Exception) -> str:
    """The error's message without the "In call to configurable ..." lines gin appends."""
    return str(error).split("\n  In call to configurable")[0]


def _open_run(settings: rundir.RunSettings, config: Config) -> rundir.RunDir | rundir.WorkerRun:
    """Rank 0 (or the only process) opens the run folder; the others wait for it, then share it."""
    if distributed.is_main():
        run = rundir.RunDir(settings.path, seed=settings.seed, config_text=config.text, hparams=config.hparams)
        distributed.barrier()
        return run
    distributed.barrier()  # rank 0 has created the folder (and resumed or started its Aim run)
    return rundir.WorkerRun(settings.path, seed=settings.seed)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reflow_exp.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", required=True, help="gin file (repeatable)")
    parser.add_argument("--gin_param", action="append", default=[], help="binding like 'Trainer.steps=10'")
    parser.add_argument("--dry_run", action="store_true", help="parse, check and summarise; write nothing")
    return parser.parse_args(argv)


def _dry_run(settings: rundir.RunSettings) -> int:
    state = "exists: would resume" if settings.path.exists() else "would be created"
    print(f"Dry run: job {_name(settings.job)}, run folder {settings.path} ({state}); nothing is written.")
    print(f"Device: {distributed.describe()}")
    print(gin.config_str())
    if not _accepts_dry_run(settings.job):
        print(f"Job {_name(settings.job)} has no dry_run parameter; not called.")
        return 0
    try:
        rundir.seed_everything(settings.seed)
        settings.job(None, dry_run=True)
    except Exception:
        traceback.print_exc()
        return EXIT_JOB_FAILED
    return 0


def _accepts_dry_run(job: Any) -> bool:
    params = inspect.signature(job).parameters.values()
    return any(p.name == "dry_run" or p.kind is p.VAR_KEYWORD for p in params)


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", repr(fn))


@contextlib.contextmanager
def _sigterm_ignored() -> Iterator[None]:
    """Ignore SIGTERM around the job (which turns it into KeyboardInterrupt itself): one arriving
    while a failed or stopped job's exit is recorded would otherwise kill the process before
    status.json says why (torchrun sends it to rank 0 just after a collective with a dead rank failed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so the Aim run and log are closed (SIGTERM skips atexit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit(code: int) -> None:
    """Exit with ``code``; when an Aim run hung in its close (a full disk), skip the interpreter's
    exit cleanup, where Aim would block again, forever."""
    if tracking.close_hung():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
