"""Atomic checkpoints: complete or absent, `last` always points at a complete one."""

import os

import pytest

from reflow_exp.checkpoint import checkpoint_step, latest_checkpoint, save_checkpoint


def _writer(content: str):
    def write(tmp):
        (tmp / "pretrained_model").mkdir()
        (tmp / "pretrained_model" / "model.txt").write_text(content)
        (tmp / "training_state").mkdir()

    return write


def test_save_publishes_folder_and_last(tmp_path):
    root = tmp_path / "checkpoints"
    first = save_checkpoint(root, 5, _writer("a"))
    assert first == root / "000005"
    assert (first / "pretrained_model" / "model.txt").read_text() == "a"
    assert os.readlink(root / "last") == "000005"  # relative link: the run folder can move

    second = save_checkpoint(root, 10, _writer("b"))
    assert os.readlink(root / "last") == "000010"
    assert latest_checkpoint(root) == second
    assert checkpoint_step(second) == 10
    assert sorted(p.name for p in root.iterdir()) == ["000005", "000010", "last"]


def test_crash_inside_write_leaves_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    good = save_checkpoint(root, 5, _writer("good"))

    def crashing_write(tmp):
        (tmp / "pretrained_model").mkdir()
        (tmp / "pretrained_model" / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(root, 10, crashing_write)
    assert not (root / "000010").exists()
    assert not list(root.glob(".tmp-*"))
    assert os.readlink(root / "last") == "000005"
    assert latest_checkpoint(root) == good


def test_leftovers_of_a_killed_save_are_ignored_and_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 5, _writer("good"))
    # What SIGKILL in the middle of a save leaves: a half-written tmp folder, maybe a tmp link.
    (root / ".tmp-10" / "pretrained_model").mkdir(parents=True)
    os.symlink("000010", root / ".tmp-last")

    assert latest_checkpoint(root) == root / "000005"
    assert (root / ".tmp-10").exists()  # readers in other processes leave it alone
    assert latest_checkpoint(root, clean=True) == root / "000005"
    assert not list(root.glob(".tmp-*"))

    # A later save of that step works normally.
    assert save_checkpoint(root, 10, _writer("c")) == root / "000010"


def test_last_missing_falls_back_to_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 5, _writer("a"))
    save_checkpoint(root, 20, _writer("b"))
    (root / "last").unlink()  # crash between rename and repoint
    assert latest_checkpoint(root) == root / "000020"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_keep_last_and_resave(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(root, step, _writer(str(step)), keep_last=2)
    assert sorted(p.name for p in root.iterdir() if p.name != "last") == ["000003", "000004"]
    # Saving the same step again replaces it atomically.
    save_checkpoint(root, 4, _writer("again"))
    assert (root / "000004" / "pretrained_model" / "model.txt").read_text() == "again"
    assert not list(root.glob(".tmp-*"))
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(root, 5, _writer("x"), keep_last=0)
