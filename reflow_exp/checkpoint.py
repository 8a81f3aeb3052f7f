"""Atomic checkpoints: a checkpoint folder either exists complete or not at all.

Layout (LeRobot's, so a student checkpoint loads like any SmolVLA checkpoint)::

    <run>/checkpoints/
        000500/
            pretrained_model/     LeRobot policy folder (config.json, model.safetensors, ...)
            training_state/       optimizer, scheduler, RNG, step, trainable parameters
        001000/
        last -> 001000            symlink, repointed atomically after each save

A save writes into ``.tmp-<step>`` and renames it into place only when ``write`` returned, so a
crash (or SIGKILL) mid-save leaves the previous checkpoint and ``last`` untouched.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

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


def save_checkpoint(
    ckpt_root: Path, step: int, write: Callable[[Path], None], keep_last: int | None = None
) -> Path:
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
    _point_last(ckpt_root, final.name)

    if keep_last is not None:
        for old in _step_dirs(ckpt_root)[:-keep_last]:
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path, clean: bool = False) -> Path | None:
    """The newest complete checkpoint under ``ckpt_root``, or None if there is none.

    Follows ``last`` when it points at an existing folder, else takes the highest-numbered one
    (``last`` may be missing after a crash between rename and repoint). ``.tmp-*`` folders are
    never returned.

    Args:
        clean: also delete ``.tmp-*`` leftovers of crashed saves. Only the process that owns
            the run may do this (the trainer does, when it resumes): another process (e.g. a
            dashboard) could otherwise delete a save that is in progress.
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
    last = ckpt_root / LAST
    if last.is_symlink() and last.resolve().is_dir() and _STEP_DIR.match(last.resolve().name):
        return ckpt_root / last.resolve().name
    dirs = _step_dirs(ckpt_root)
    return dirs[-1] if dirs else None


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
