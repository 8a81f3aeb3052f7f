"""The dashboard's launch form (app.forms): gin files, overrides, run names, the command, and the
message a failed dry run shows."""

import time
from pathlib import Path

import pytest

from app import forms
from app.forms import LaunchError


@pytest.fixture
def gin_dir(tmp_path):
    root = tmp_path / "gin"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "base.gin").write_text("run.seed = 0\n")
    (root / "sub" / "a.gin").write_text("")
    (root / "sub" / "deeper" / "b.gin").write_text("")
    (root / "sub" / "notes.txt").write_text("")
    (tmp_path / "outside.gin").write_text("")
    (root / "sub" / "link.gin").symlink_to(tmp_path / "outside.gin")
    return root


def test_list_gin_files_is_recursive(gin_dir):
    assert forms.list_gin_files(gin_dir) == ["base.gin", "sub/a.gin", "sub/link.gin", "sub/deeper/b.gin"]
    assert "sandbox/tiny.gin" in forms.list_gin_files()  # the repo's own


def test_resolve_gin_file_stays_inside_gin(gin_dir):
    assert forms.resolve_gin_file("sub/a.gin", gin_dir) == (gin_dir / "sub" / "a.gin").resolve()
    assert forms.resolve_gin_file("gin/sub/a.gin", gin_dir) == (gin_dir / "sub" / "a.gin").resolve()
    for bad, words in [
        ("../outside.gin", "outside gin/"),
        (str(gin_dir / "base.gin"), "outside gin/"),
        ("sub/link.gin", "outside gin/"),
        ("sub/../../outside.gin", "outside gin/"),
        ("sub/notes.txt", "not a .gin file"),
        ("nope.gin", "Unknown gin file"),
        ("", "Choose a gin file"),
    ]:
        with pytest.raises(LaunchError, match=words):
            forms.resolve_gin_file(bad, gin_dir)


def test_parse_overrides():
    text = "Trainer.steps = 100\n\n# a comment\n teacher/ActionHead.x = @uniform \nreflow.teacher = 'runs/t'\n"
    assert forms.parse_overrides(text) == [
        "Trainer.steps = 100",
        "teacher/ActionHead.x = @uniform",
        "reflow.teacher = 'runs/t'",
    ]
    assert forms.parse_overrides("") == [] and forms.parse_overrides(None) == []
    for bad, words in [
        ("Trainer.steps 100", "line 1.*configurable.parameter = value"),
        ("Trainer.lr = 1\nTrainer.steps = [1, 2", "line 2.*close brackets"),
        ("a.b = 'unclosed", "not a valid gin binding"),
        ("Trainer.steps = 1 2", "not a valid gin binding"),
        ("FOO = 3", "has no parameter"),
        ("run.name = 'x'", "Run name field"),
        ("run.runs_dir = '/tmp'", "--runs-dir"),
    ]:
        with pytest.raises(LaunchError, match=words):
            forms.parse_overrides(bad)


def test_run_names_and_command(tmp_path):
    assert forms.check_run_name(" my-run_1.b ") == "my-run_1.b"
    for bad in ["../x", "a/b", ".hidden", "a b", "x" * 101]:
        with pytest.raises(LaunchError, match="not allowed"):
            forms.check_run_name(bad)
    now = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    assert forms.default_run_name(tmp_path, now) == "20260102-030405"
    (tmp_path / "20260102-030405").mkdir()
    assert forms.default_run_name(tmp_path, now) == "20260102-030405-2"

    cmd = forms.build_command(["gin/a.gin", "gin/b.gin"], ["X.y = 1"], "r1", Path("/r"), python="py", dry_run=True)
    assert cmd == [
        "py",
        "-m",
        "reflow_exp.run",
        "--gin_file",
        "gin/a.gin",
        "--gin_file",
        "gin/b.gin",
        "--gin_param",
        "X.y = 1",
        "--gin_param",
        'run.name = "r1"',
        "--gin_param",
        'run.runs_dir = "/r"',
        "--dry_run",
    ]


def test_config_error_message_never_shows_a_traceback():
    assert (
        forms.config_error_message("error: gin/x.gin:3: Trainer has no parameter 'stepz'\n")
        == "gin/x.gin:3: Trainer has no parameter 'stepz'"
    )
    assert (
        forms.config_error_message("error: two problems\nA.b is required\nC.d is required\n")
        == "two problems\nA.b is required\nC.d is required"
    )
    traceback = (
        'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    boom()\n'
        "FileNotFoundError: no teacher at runs/t\n"
    )
    assert forms.config_error_message(traceback) == "FileNotFoundError: no teacher at runs/t"
