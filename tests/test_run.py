"""The CLI end to end, in-process: gin files → checks → run folder → job."""

import json
import os
import signal
import textwrap
import time

import pytest

import gin
from reflow_exp import run as run_cli
from reflow_exp.checkpoint import save_checkpoint


# Toy configurables. They live here, not in run.py (which runs as __main__; see PITFALLS).
@gin.configurable
def toy_run_part(width=gin.REQUIRED, depth=1):
    return {"width": width, "depth": depth}


@gin.configurable
def toy_run_job(run, value=gin.REQUIRED, part=None, fail=False, dry_run=False):
    if dry_run:
        print(f"toy_run_job dry run: value={value}")
        return
    print(f"toy job got value={value}")
    if fail:
        raise RuntimeError("toy job failed on purpose")
    run.log_metrics(0, {"loss": 1.5}, subset="train", head="student")
    run.update_summary({"value": value, "part": part})
    run.update_summary({"params": {"total": 3}})
    run.update_summary({"params": {"trainable": 1}})  # deep-merged


@gin.configurable
def toy_run_sigterm_job(run, seconds=30.0):
    print("toy job waiting")
    os.kill(os.getpid(), signal.SIGTERM)  # what `kill <pid>` from the dashboard does
    time.sleep(seconds)
    raise AssertionError("SIGTERM did not interrupt the job")


@gin.configurable
def toy_run_job_without_dry_run(run):
    raise AssertionError("must not be called by --dry_run")


def _gin(tmp_path, body: str, name: str = "toy.gin") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip())
    return str(path)


def _config(tmp_path, extra: str = "", tracker: bool = False) -> str:
    return _gin(
        tmp_path,
        f"""
        include 'base.gin'
        run.job = @toy_run_job
        run.name = "demo"
        run.runs_dir = "{tmp_path / "runs"}"
        Tracker.enabled = {tracker}
        toy_run_job.value = 1
        """
        + textwrap.dedent(extra),
    )


def test_run_writes_the_run_folder(tmp_path, capsys):
    config = _config(tmp_path, tracker=True)
    rc = run_cli.main(["--gin_file", config, "--gin_param", "toy_run_job.value = 7"])
    assert rc == 0, capsys.readouterr().err
    folder = tmp_path / "runs" / "demo"

    config_gin = (folder / "config.gin").read_text()
    assert "include 'base.gin'" in config_gin and "toy_run_job.value = 7" in config_gin
    assert "toy_run_job.value = 7" in (folder / "operative_config.gin").read_text()
    assert "toy job got value=7" in (folder / "log.txt").read_text()
    assert "toy job got value=7" in capsys.readouterr().out  # tee'd, not swallowed

    (record,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 0 and record["loss"] == 1.5
    assert record["context"] == {"subset": "train", "head": "student"}
    summary = json.loads((folder / "summary.json").read_text())
    device = summary.pop("run")  # where it ran (the dashboard's Device column for CLI runs)
    assert device["processes"] == 1 and device["device"] in ("cpu", "cuda") and device["description"]
    assert summary == {"value": 7, "part": None, "params": {"total": 3, "trainable": 1}}
    assert (folder / "aim_run_hash.txt").exists()
    assert (tmp_path / "runs" / ".aim").is_dir()


def test_same_name_resumes_and_keeps_history(tmp_path, capsys):
    config = _config(tmp_path)
    assert run_cli.main(["--gin_file", config]) == 0
    folder = tmp_path / "runs" / "demo"
    save_checkpoint(folder / "checkpoints", 3, lambda tmp: None)

    assert run_cli.main(["--gin_file", config, "--gin_param", "toy_run_job.value = 1"]) == 0
    log = (folder / "log.txt").read_text()
    assert f"Resuming from {folder / 'checkpoints' / '000003'} (step 3)" in log
    assert log.count("toy job got value=1") == 2  # appended, not truncated
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2
    # The config given on resume differs (an extra --gin_param): kept beside the original.
    assert "--gin_param" not in (folder / "config.gin").read_text()
    (other,) = folder.glob("config.*.gin")
    assert "toy_run_job.value = 1" in other.read_text()


def test_scoped_reference_and_required_binding(tmp_path):
    config = _config(tmp_path, "toy_run_job.part = @teacher/toy_run_part()\nteacher/toy_run_part.width = 4\n")
    assert run_cli.main(["--gin_file", config, "--gin_param", "run.name = 'scoped'"]) == 0
    summary = json.loads((tmp_path / "runs" / "scoped" / "summary.json").read_text())
    assert summary["part"] == {"width": 4, "depth": 1}


# (extra lines, line number, words, whether gin itself reports it: "In file ..., line N")
BROKEN = {
    "unclosed bracket": ("toy_run_job.value = (1,\n", 7, "syntax", False),
    "two values": ("toy_run_job.value = 1 2\n", 7, "syntax", False),
    "unknown configurable": ("no_such_thing.x = 1\n", 7, "No configurable matching 'no_such_thing'", True),
    "unknown parameter": ("toy_run_job.colour = 1\n", 7, "doesn't have a parameter named 'colour'", True),
    "unknown reference": ("toy_run_job.part = @no_such_part()\n", 7, "reference '@no_such_part()'", True),
    "missing required of a referenced configurable": (
        "toy_run_job.part = @student/toy_run_part()\nteacher/toy_run_part.width = 4\n",
        7,
        "student/toy_run_part.width is required",
        False,
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_config_fails_before_writing(tmp_path, capsys, case):
    extra, line, words, by_gin = BROKEN[case]
    config = _config(tmp_path, extra)
    assert run_cli.main(["--gin_file", config]) == run_cli.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    where = f'In file "{config}", line {line}' if by_gin else f"{config}:{line}"
    assert where in err and words in err, err
    assert not (tmp_path / "runs").exists()


def test_missing_required_names_the_binding_to_add(tmp_path, capsys):
    config = _gin(tmp_path, f"run.job = @toy_run_job\nrun.runs_dir = '{tmp_path / 'runs'}'\n")
    assert run_cli.main(["--gin_file", config]) == 2
    err = capsys.readouterr().err
    assert f"{config}:1: toy_run_job.value is required; add `toy_run_job.value = ...`" in err
    # The same value given on the command line is enough.
    assert run_cli.main(["--gin_file", config, "--gin_param", "toy_run_job.value=2", "--dry_run"]) == 0
    assert not (tmp_path / "runs").exists()

    # run.job itself: base.gin alone has no job.
    assert run_cli.main(["--gin_file", "base.gin", "--dry_run"]) == 2
    assert "run.job is required" in capsys.readouterr().err


def test_errors_in_included_files_and_params_name_their_source(tmp_path, capsys):
    _gin(tmp_path, "toy_run_job.value = [1,\n", name="inner.gin")
    config = _gin(tmp_path, f"include '{tmp_path / 'inner.gin'}'\nrun.job = @toy_run_job\n")
    assert run_cli.main(["--gin_file", config]) == 2
    assert f"{tmp_path / 'inner.gin'}:1: gin syntax error" in capsys.readouterr().err

    assert run_cli.main(["--gin_file", _config(tmp_path), "--gin_param", "toy_run_job.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "doesn't have a parameter named 'nope'" in err and "In bindings string line 1" in err, err
    assert run_cli.main(["--gin_file", str(tmp_path / "missing.gin")]) == 2
    assert "cannot find gin file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_dry_run_calls_the_job_and_writes_nothing(tmp_path, capsys):
    config = _config(tmp_path)
    assert run_cli.main(["--gin_file", config, "--gin_param", "toy_run_job.value=5", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "toy_run_job dry run: value=5" in out and "Dry run: job toy_run_job" in out
    assert not (tmp_path / "runs").exists()

    param = "run.job = @toy_run_job_without_dry_run"
    assert run_cli.main(["--gin_file", config, "--gin_param", param, "--dry_run"]) == 0
    assert "has no dry_run parameter" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_failing_job_exits_non_zero_with_traceback_in_log(tmp_path):
    config = _config(tmp_path, "toy_run_job.fail = True\n")
    assert run_cli.main(["--gin_file", config]) == run_cli.EXIT_JOB_FAILED
    log = (tmp_path / "runs" / "demo" / "log.txt").read_text()
    assert "RuntimeError: toy job failed on purpose" in log
    assert (tmp_path / "runs" / "demo" / "operative_config.gin").exists()


def test_sigterm_unwinds_the_job_and_closes_the_run(tmp_path, capsys):
    """A dashboard stops runs with SIGTERM: the job unwinds like Ctrl-C, the run folder is closed."""
    config = _config(tmp_path, "run.job = @toy_run_sigterm_job\n")
    handler_before = signal.getsignal(signal.SIGTERM)
    assert run_cli.main(["--gin_file", config]) == run_cli.EXIT_INTERRUPTED
    log = (tmp_path / "runs" / "demo" / "log.txt").read_text()
    assert "toy job waiting" in log and "Interrupted" in log
    assert "toy_run_sigterm_job.seconds = 30.0" in (tmp_path / "runs" / "demo" / "operative_config.gin").read_text()
    assert signal.getsignal(signal.SIGTERM) is handler_before  # main's handler is removed again
