"""Full disks: recognise "No space left on device" and say which filesystem is full.

A run that fills its disk fails with ENOSPC somewhere deep (a checkpoint, metrics.jsonl, Aim's
RocksDB). The user needs the filesystem's name and what to do, not the call stack's last frame.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

NO_SPACE = "No space left on device"


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an error it was raised from is ENOSPC (RocksDB's errors carry only the
    text, so the message counts too)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if NO_SPACE in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (its nearest existing ancestor's)."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_full_message(path: str | Path) -> str:
    """One line naming the full filesystem that holds ``path``, its free space and the fix."""
    mount = mount_point(path)
    try:
        usage = shutil.disk_usage(mount)
        space = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
    except OSError:
        space = "size unknown"
    return (
        f"the disk is full: {NO_SPACE} on the filesystem mounted at {mount} ({space}), which holds {path}. "
        "Free space there (or keep fewer checkpoints: Trainer.keep_last_checkpoints), then run again to resume."
    )
