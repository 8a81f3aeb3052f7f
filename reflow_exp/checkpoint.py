"""Atomic checkpoints: a checkpoint folder either exists complete or not at all.

Layout (LeRobot's, so a student checkpoint loads like any SmolVLA checkpoint)::

    <run>/checkpoints/
        000500/
            pretrained_model/     LeRobot policy folder (config.json, model.safetensors, ...)
            training_state/       optimizer, scheduler, RNG, step, trainable parameters
        001000/
        last -> 001000            symlink, repointed atomically after each save

A save writes into ``.tmp-<step>`` and renames it into place only when ``write`` returned, so a
crash (or SIGKILL) mid-save leaves the previous checkpoint and ``last`` untouched. Every file and
folder is fsynced before the rename, and the parent folder after it, so a power loss cannot
publish a checkpoint whose content is not on disk yet.

When resuming, a checkpoint with a damaged file (empty, or a truncated safetensors/JSON file)
is skipped with a warning and the one before it is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from reflow_exp.files import fsync_dir, fsync_tree

LAST = "last"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^\d+$")


def checkpoint_dir_name(step: int) -> str:
    """Folder name of the checkpoint at ``step``: zero-padded to 6 digits (LeRobot's)."""
    return f"{step:06d}"


def checkpoint_step(ckpt: Path) -> int:
    """The training step a checkpoint folder holds, read from its name."""
    name = Path(ckpt).name
    if not _STEP_DIR.match(name):
        raise ValueError(f"{ckpt} is not a checkpoint folder (expected a name like 000500)")
    return int(name)


def save_checkpoint(ckpt_root: Path, step: int, write: Callable[[Path], None], keep_last: int | None = None) -> Path:
    """Write the checkpoint for ``step`` atomically and point ``ckpt_root/last`` at it.

    Args:
        ckpt_root: the run's ``checkpoints/`` folder (created if missing).
        step: training step; the folder is ``ckpt_root/<step:06d>``.
        write: fills the (temporary) folder it is given, e.g. ``pretrained_model/`` and
            ``training_state/``. If it raises, nothing is published and the error propagates.
        keep_last: if set, delete all but the newest ``keep_last`` checkpoints afterwards.

    Returns:
        The final checkpoint folder.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_dir_name(step)
    tmp = ckpt_root / f"{TMP_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save that crashed at this step
    tmp.mkdir()
    try:
        write(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if final.exists():
        # Saving a step twice (rare: a resumed run re-saving): swap the old folder out first so
        # `final` never holds a mix of both; until the swap completes, `last` still resolves.
        trash = ckpt_root / f"{TMP_PREFIX}old-{step}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(ckpt_root)
    _point_last(ckpt_root, final.name)

    if keep_last is not None:
        for old in _step_dirs(ckpt_root)[:-keep_last]:
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path, clean: bool = False, check_values: bool = False) -> Path | None:
    """The newest complete, undamaged checkpoint under ``ckpt_root``, or None if there is none.

    Follows ``last`` when it points at an existing folder, else takes the highest-numbered one
    (``last`` may be missing after a crash between rename and repoint). ``.tmp-*`` folders are
    never returned. A checkpoint with a damaged file (see ``checkpoint_problem``) is skipped with
    a warning on stderr, falling back to the one before.

    Args:
        clean: also delete ``.tmp-*`` leftovers of crashed saves. Only the process that owns
            the run may do this (the trainer does, when it resumes): another process (e.g. a
            dashboard) could otherwise delete a save that is in progress.
        check_values: also read the training state's tensors and skip a checkpoint holding NaN/inf
            values (``values_problem``): what a resume loads must be finite, whatever the headers say.
    """
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return None
    if clean:
        for leftover in ckpt_root.glob(f"{TMP_PREFIX}*"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    candidates = _step_dirs(ckpt_root)[::-1]  # newest first
    last = ckpt_root / LAST
    if last.is_symlink() and last.resolve().is_dir() and _STEP_DIR.match(last.resolve().name):
        newest = ckpt_root / last.resolve().name
        candidates = [newest] + [c for c in candidates if int(c.name) < int(newest.name)]
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None and check_values:
            problem = values_problem(ckpt)
        if problem is None:
            return ckpt
        print(f"Warning: checkpoint {ckpt} is damaged ({problem}); falling back to the one before it", file=sys.stderr)
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why the checkpoint folder cannot be trusted (a file that is empty, a truncated safetensors
    file, unreadable JSON), or None. Reads only headers: cheap even for large checkpoints."""
    for path in sorted(p for p in Path(ckpt).rglob("*") if p.is_file()):
        problem = file_problem(path)
        if problem:
            return f"{path.relative_to(ckpt)}: {problem}"
    return None


def values_problem(ckpt: Path) -> str | None:
    """The first tensor of the training state (``training_state/*.safetensors``: trainable
    parameters, optimizer moments) holding a NaN/inf value, as ``"<file>: NaN/inf in <tensor>"``;
    None when all are finite. Reads the tensors, unlike ``checkpoint_problem``: a value flipped on
    disk keeps every size and header intact."""
    import torch
    from safetensors import safe_open

    for path in sorted((Path(ckpt) / "training_state").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open has keys(), no __iter__)
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return f"{path.relative_to(ckpt)}: NaN/inf values in tensor {name!r}"
    return None


def file_problem(path: Path) -> str | None:
    """Whether a checkpoint file is damaged: empty; a ``.safetensors`` file shorter than its
    header says; a ``.json`` file that does not parse. None when it looks whole."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path, size)
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return f"not valid JSON ({e})"
    return None


def _safetensors_problem(path: Path, size: int) -> str | None:
    """The safetensors layout: 8-byte little-endian header length, JSON header, then the data;
    the largest ``data_offsets`` end must equal the data size."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes)"
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            return f"truncated: the header alone needs {8 + header_len} bytes, the file has {size}"
        try:
            header = json.loads(f.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError):
            return "unreadable safetensors header"
    if 8 + header_len + end != size:
        return f"truncated: {8 + header_len + end} bytes expected, the file has {size}"
    return None


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    dirs = [p for p in ckpt_root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(dirs, key=lambda p: int(p.name))


def _point_last(ckpt_root: Path, target_name: str) -> None:
    """Repoint ``ckpt_root/last`` at ``target_name`` atomically (new symlink + os.replace)."""
    tmp_link = ckpt_root / f"{TMP_PREFIX}last"
    tmp_link.unlink(missing_ok=True)
    os.symlink(target_name, tmp_link)  # relative: the run folder stays movable
    os.replace(tmp_link, ckpt_root / LAST)
    fsync_dir(ckpt_root)
