"""Tracker against a real Aim repo: what we log can be read back the way `aim up` reads it."""

import numpy as np
import pytest
import torch

from reflow_exp.tracking import HASH_FILE, Tracker


def _read_back(repo_path, run_hash):
    """Read a closed run like another process would: the SDK only sees indexed runs (PITFALLS),
    so index it first — the step `aim up` does in the background (`aim storage reindex`)."""
    from aim import Repo, Run
    from aim.sdk.index_manager import RepoIndexManager

    RepoIndexManager.get_index_manager(Repo.from_path(str(repo_path))).index(run_hash)
    return Run(run_hash, repo=Repo(str(repo_path)), read_only=True)  # fresh Repo: no caches


def _series(run, name, context):
    for metric in run.metrics():
        if metric.name == name and metric.context.to_dict() == context:
            steps, (values, *_rest) = metric.data.items_list()
            return dict(zip(steps, values))
    raise AssertionError(f"no metric {name} with context {context}")


def test_params_metrics_text_image_and_resume(tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "demo"
    tracker = Tracker(run_dir, experiment="tests")
    try:
        tracker.log_params({"Trainer": {"lr": np.float32(1e-4), "betas": (0.9, 0.95)}, "run": {"job": "@toy"}})
        tracker.log_params({"Trainer": {"steps": 3}})  # merges, does not replace
        for step in range(3):  # numpy / torch scalars are accepted
            loss = np.float32(1.0 / (step + 1)) if step % 2 else torch.tensor(1.0 / (step + 1))
            tracker.track("loss", loss, step=step, context={"subset": "train", "head": "teacher"})
        tracker.track("loss", 9.0, step=0, context={"subset": "eval", "head": "teacher"})
        tracker.log_text("operative_config", "Trainer.lr = 0.0001")
        tracker.track_image("frame", np.zeros((8, 8, 3), dtype=np.float32), step=0, context={"subset": "eval"})
        run_hash = tracker.run_hash
    finally:
        tracker.close()
    tracker.close()  # idempotent

    assert (run_dir / HASH_FILE).read_text().strip() == run_hash
    assert (runs / ".aim").is_dir()  # the runs folder is the Aim repo by default

    run = _read_back(runs, run_hash)
    assert run.name == "demo"
    assert run.experiment == "tests"
    hparams = run.get("hparams")
    assert hparams["Trainer"] == {"lr": pytest.approx(1e-4), "betas": [0.9, 0.95], "steps": 3}
    assert hparams["run"] == {"job": "@toy"}
    train = _series(run, "loss", {"subset": "train", "head": "teacher"})
    assert train == {0: pytest.approx(1.0), 1: pytest.approx(0.5), 2: pytest.approx(1 / 3)}
    assert _series(run, "loss", {"subset": "eval", "head": "teacher"}) == {0: 9.0}
    from aim.storage.context import Context

    _, (texts, *_rest) = run.get_text_sequence("operative_config", Context({})).data.items_list()
    assert texts[0].data == "Trainer.lr = 0.0001"
    _, (images, *_rest) = run.get_image_sequence("frame", Context({"subset": "eval"})).data.items_list()
    assert images[0].to_pil_image().size == (8, 8)

    # Resume: a new Tracker on the same run folder reopens the same Aim run and appends.
    resumed = Tracker(run_dir, experiment="tests")
    try:
        assert resumed.run_hash == run_hash
        resumed.track("loss", 0.25, step=3, context={"subset": "train", "head": "teacher"})
    finally:
        resumed.close()
    train = _series(_read_back(runs, run_hash), "loss", {"subset": "train", "head": "teacher"})
    assert sorted(train) == [0, 1, 2, 3]


def test_disabled_tracker_is_a_no_op(tmp_path):
    tracker = Tracker(tmp_path / "runs" / "off", enabled=False)
    tracker.log_params({"a": 1})
    tracker.track("loss", 1.0, step=0, context={"subset": "train"})
    tracker.log_text("t", "x")
    tracker.track_image("i", np.zeros((2, 2), dtype=np.uint8), step=0)
    tracker.close()
    assert tracker.run_hash is None
    assert not (tmp_path / "runs").exists()


def test_non_numeric_metric_is_rejected_with_its_name(tmp_path):
    tracker = Tracker(tmp_path / "runs" / "bad")
    try:
        with pytest.raises(TypeError, match="'loss'.*str"):
            tracker.track("loss", "nan-ish", step=0)
    finally:
        tracker.close()


def test_runs_starting_together_share_one_fresh_aim_repo(tmp_path):
    """Four processes open Trackers in one fresh runs folder at the same instant (a start file
    releases them): each gets its own Aim run. Without the lock around the repo's creation, the
    ones that found `.aim` half made failed with Aim's bare RuntimeError."""
    import subprocess
    import sys
    import time

    go = tmp_path / "go"
    script = (
        "import sys, time, pathlib\n"
        "from reflow_exp.tracking import Tracker\n"
        "go = pathlib.Path(sys.argv[1])\n"
        "while not go.exists(): time.sleep(0.001)\n"
        "Tracker(pathlib.Path(sys.argv[2]) / f'run{sys.argv[3]}').close()\n"
    )
    runs = tmp_path / "runs"
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(go), str(runs), str(i)], stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    time.sleep(8)  # every process has imported aim and waits on the start file
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(errors)
    hashes = {(runs / f"run{i}" / HASH_FILE).read_text().strip() for i in range(4)}
    assert len(hashes) == 4
