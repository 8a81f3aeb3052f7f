"""Is a process alive, and still the same one: the dashboard's liveness checks (psutil)."""

from __future__ import annotations

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


def record_owner_alive(record: dict) -> bool:
    """Whether the process that wrote a "running" status.json still runs (same pid, created
    before it wrote the record: a reused pid is a younger process)."""
    try:
        started = float(record["started"])
    except (KeyError, TypeError, ValueError):
        return False
    created = process_start_time(record.get("pid"))
    return created is not None and created <= started + 1.0
