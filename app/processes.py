"""Is a process alive, and still the same one: the dashboard's liveness checks (psutil)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil


def process_start_time(pid: int) -> float | None:
    """The process's creation time (psutil, seconds since the epoch), or None when there is no
    such live process (zombies count as dead)."""
    try:
        process = psutil.Process(int(pid))
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except (TypeError, ValueError, psutil.Error):
        return None


def pid_alive(pid: int | None, start_time: float | None = None) -> bool:
    """Whether ``pid`` is a live process, and the same one (same creation time) if given."""
    current = process_start_time(pid) if pid else None
    return current is not None and (start_time is None or current == start_time)


def record_owner_alive(record: dict, run_dir: Path) -> bool:
    """Whether the process that wrote a "running" status.json still runs (same pid, created
    before it wrote the record: a reused pid is a younger process) and holds the run folder's
    lock (``<run_dir>/.lock``, flocked while it runs): a copy of a running folder holds the same
    record, but nobody locks the copy's lock file."""
    try:
        started = float(record["started"])
    except (KeyError, TypeError, ValueError):
        return False
    created = process_start_time(record.get("pid"))
    return created is not None and created <= started + 1.0 and folder_locked(run_dir)


RUN_LOCK_FILE = ".lock"  # reflow_exp.rundir.LOCK_FILE


def folder_locked(run_dir: Path) -> bool:
    """Whether some process holds a ``flock`` on ``<run_dir>/.lock``, read from ``/proc/locks``
    (taking the lock to find out could make a run starting at that moment fail)."""
    try:
        stat = (Path(run_dir) / RUN_LOCK_FILE).stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    me = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    return any(line.split()[1] == "FLOCK" and me in line.split() for line in lines if len(line.split()) > 5)


LAUNCHER_MODULE = "app.launcher"


def launcher_alive(record: dict, run_dir: Path) -> bool:
    """Whether the process a run folder's ``dashboard.json`` names is alive and is a dashboard's
    launcher of *this* folder: the same pid, the same creation time (a record without one is
    refused), and a command line ``... -m app.launcher <run_dir> -- ...``.

    The record is a file anyone can copy or write: a copied run folder names the original's
    launcher, a hand-written one any process. Only a process that passes this check may be shown
    as running or be signalled."""
    try:
        pid, created = int(record["pid"]), float(record["proc_start"])
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or process.create_time() != created:
            return False
        argv = process.cmdline()
    except (KeyError, TypeError, ValueError, psutil.Error):
        return False
    if LAUNCHER_MODULE not in argv or argv.index(LAUNCHER_MODULE) + 1 >= len(argv):
        return False
    named = Path(argv[argv.index(LAUNCHER_MODULE) + 1])
    cwd = _cwd(process)
    if not named.is_absolute() and cwd is not None:
        named = cwd / named
    return named.resolve() == Path(run_dir).resolve()


def _cwd(process: psutil.Process) -> Path | None:
    try:
        return Path(process.cwd())
    except psutil.Error:
        return None
