"""Files every part of reflow_exp writes the same way: atomic and durable, JSON-safe, digested.

An atomic write goes to a temp file beside the target (``.<name>.tmp-<pid>``), is fsynced, renamed
into place and the folder fsynced: readers never see a half-written file, and the new content
survives a power loss. Standard library only (the dashboard's launcher wrapper imports this).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


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
