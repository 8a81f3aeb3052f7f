"""Files every part of reflow_exp writes the same way: atomic and durable, JSON-safe, digested,
and cached folders built once (`build_once`).

An atomic write goes to a temp file beside the target (``.<name>.tmp-<pid>``), is fsynced, renamed
into place and the folder fsynced: readers never see a half-written file, and the new content
survives a power loss. Standard library only at import (the dashboard's launcher wrapper imports this).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

MARKER = "reflow_exp_sandbox.json"  # what `build_once` writes into each folder it made


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; when the block ends without error it replaces
    `path` (fsynced, then the folder fsynced); on error it is removed and `path` is unchanged."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files (``.<name>.tmp-<pid>``, see ``atomic_path``) in ``folder`` whose
    process is dead: a SIGKILLed writer leaves its temp file behind, which may be large (an image
    embedding cache). A live process's temp file is kept (it may be writing). Returns the removed."""
    removed = []
    for path in Path(folder).glob(".*.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and path.is_file() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Replace `path` with `data` as indented JSON (see `json_safe`), atomically and durably."""
    write_atomic(path, json.dumps(json_safe(data), indent=2) + "\n")


def read_json(path: str | Path) -> dict:
    """A JSON object file's content; {} when it is missing, unreadable or not an object (a reader
    racing a writer, or a folder another tool made)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def json_safe(value: Any) -> Any:
    """`value` with only JSON's types: nested dicts (str keys) and lists, None, bool, str, int and
    float; numpy/torch scalars become Python numbers, anything else (paths, enums) its str."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def deep_merge(base: dict, update: Mapping) -> dict:
    """Merge `update` into `base` recursively (nested dicts merge, other values replace); returns base."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            base[key] = deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so renames and new entries in it survive a power loss."""
    fsync_file(path)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (``root`` included)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def file_digest(path: str | Path) -> str:
    """sha256 of a file, streamed (a 1.8 GB teacher takes a few seconds)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_once(dest: str | Path, marker: dict, build: Callable[[Path], dict]) -> dict:
    """Make folder `dest` with `build(work_dir) -> report` unless it already holds `marker`.

    The marker file (MARKER) stores {"args": marker, "report": report}; the stored report is
    returned when the args match. `build` creates `work_dir`, a fresh path in a temporary sibling
    of `dest`, which is then renamed into place, so `dest` is either complete or absent. A
    non-empty `dest` without our marker is never overwritten. A file lock beside `dest` makes a
    second process that asks for the same folder wait for the first one's build, then reuse it.
    """
    from filelock import FileLock

    dest = Path(dest)
    marker = json.loads(json.dumps(marker))  # compare as stored (tuples become lists)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dest.parent / f".{dest.name}.lock"):
        stored = _read_marker(dest)
        if stored is not None and stored["args"] == marker:
            return stored["report"]
        if dest.exists() and stored is None and (not dest.is_dir() or any(dest.iterdir())):
            raise FileExistsError(f"{dest} exists and was not made by reflow_exp; choose another path")
        scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))  # same filesystem
        try:
            work = scratch / dest.name  # not created yet: some writers insist on making it themselves
            report = build(work)
            (work / MARKER).write_text(json.dumps({"args": marker, "report": report}, indent=2))
            if dest.exists():  # an older folder of ours: moved aside, removed with the scratch folder
                dest.rename(scratch / "old")
            work.rename(dest)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return report


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
