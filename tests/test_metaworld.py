"""MetaWorld through LeRobot's env: the subclassed env, expert recording, bad input, and the smoke
pipeline (one task, a few recorded episodes, a 2-step teacher, a 2-episode rollout)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("metaworld", reason="needs the metaworld extra: pip install -e '.[metaworld]'")

from reflow_exp.metaworld import tasks  # noqa: E402  (no MuJoCo imported by this)

REPO = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_module(*args: str, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "ignore", *args],
        cwd=REPO,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- bad input ------------------------------------------------------------------------------------


def test_unknown_task_lists_the_valid_v3_names(tmp_path):
    from reflow_exp.jobs import metaworld_source

    with pytest.raises(ValueError, match="unknown MetaWorld task 'push-v2'") as error:
        metaworld_source(root=str(tmp_path / "mw"), tasks=["reach-v3", "push-v2"])
    assert "push-v3" in str(error.value) and "button-press-topdown-v3" in str(error.value)
    assert not (tmp_path / "mw").exists()  # failed before anything was built
    assert tasks.check_task("metaworld-push-v3") == "push-v3"  # LeRobot's config prefix is accepted


@pytest.mark.parametrize("settings", [{"MUJOCO_GL": "bogus"}, {"MUJOCO_GL": "egl", "MUJOCO_EGL_DEVICE_ID": "99"}])
def test_broken_gl_backend_fails_with_one_line_naming_the_fix(settings):
    result = run_module("-c", "import reflow_exp.metaworld.env", env=ENV | settings, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: MuJoCo cannot render offscreen with MUJOCO_GL=")
    assert "apt-get install libegl1" in last and "libosmesa6" in last


def test_expert_below_threshold_fails_with_per_task_rates(recorded):
    from reflow_exp.metaworld.record import check_expert

    report = json.loads(json.dumps(recorded["report"]))
    report["tasks"]["push-v3"] = {"success_rate": 0.5, "kept": 1, "run": 2, "mean_length": 500.0}
    with pytest.raises(RuntimeError, match=r"\['push-v3'\].*reach-v3 1.00 \(2/2\), push-v3 0.50 \(1/2\)"):
        check_expert(report, 0.8)
    check_expert(recorded["report"], 1.0)  # the real recording: every reach episode succeeded


# -- the env --------------------------------------------------------------------------------------


def test_env_is_lerobots_wrapper_small_and_with_raw_state():
    import gymnasium as gym
    from lerobot.envs.metaworld import MetaworldEnv

    from reflow_exp.metaworld import ENV_ID

    env = gym.make(ENV_ID, task="reach-v3")
    small = gym.make(ENV_ID, task="reach-v3", state="agent_pos")
    try:
        assert isinstance(env.unwrapped, MetaworldEnv)
        obs, _ = env.reset(seed=7)
        raw = env.unwrapped.raw_obs
        env.step(env.action_space.sample())
        again, _ = small.reset(seed=7)  # another env (its MetaWorld benchmark object from the cache)
        assert obs["pixels"].shape == (64, 64, 3) and obs["pixels"].std() > 10  # a scene, not a black frame
        np.testing.assert_array_equal(obs["pixels"], again["pixels"])  # reset(seed) is deterministic
        assert np.array_equal(env.reset(seed=7)[0]["pixels"], obs["pixels"])
        assert not np.array_equal(env.reset(seed=8)[0]["pixels"], obs["pixels"])  # seeds place the goal
        assert raw.shape == (39,)
        np.testing.assert_array_equal(obs["agent_pos"], np.r_[raw[:18], raw[36:39]])  # current frame + goal
        assert np.abs(raw[36:39]).sum() > 0  # the goal is observed (MT1 is fully observable)
        assert again["agent_pos"].shape == (4,)
        assert env.unwrapped.task_description == "Reach a goal position"  # LeRobot's own description
    finally:
        env.close()
        small.close()


# -- recording and the smoke pipeline -------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two reach-v3 expert episodes recorded through metaworld_source (image features: see tiny.gin)."""
    from reflow_exp.jobs import metaworld_source

    root = tmp_path_factory.mktemp("metaworld") / "source"
    source = metaworld_source(root=str(root), tasks=["reach-v3"], episodes_per_task=2, video=False)
    return {"root": root, "source": source, "report": source.report}


def test_recording_is_a_lerobot_dataset_of_successful_expert_episodes(recorded):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from reflow_exp.jobs import metaworld_source
    from reflow_exp.sandbox.task import EVAL_SEED_OFFSET

    report = recorded["report"]
    assert report["tasks"]["reach-v3"]["run"] == 2 and report["discarded"] == 2 - report["episodes"]
    dataset = LeRobotDataset(recorded["source"].repo_id, root=recorded["source"].root)
    assert dataset.meta.total_episodes == report["episodes"] and dataset.meta.total_frames == report["frames"]
    item = dataset[0]
    assert tuple(item["observation.image"].shape) == (3, 64, 64)
    assert tuple(item["observation.state"].shape) == (21,) and tuple(item["action"].shape) == (4,)
    assert item["task"] == "Reach a goal position"
    marker = json.loads((Path(recorded["source"].root) / "reflow_exp_sandbox.json").read_text())
    assert marker["args"]["seed"] == 0 and marker["args"]["episodes_per_task"] < EVAL_SEED_OFFSET  # seeds 0, 1
    # Same arguments: the cached dataset is reused, not recorded again.
    mtime = (Path(recorded["source"].root) / "meta" / "info.json").stat().st_mtime
    again = metaworld_source(root=str(recorded["root"]), tasks=["reach-v3"], episodes_per_task=2, video=False)
    assert again.report == report
    assert (Path(recorded["source"].root) / "meta" / "info.json").stat().st_mtime == mtime


def test_smoke_record_teacher_rollout(tmp_path, capsys):
    """gin/metaworld/tiny.gin (3 recorded episodes, a 2-step teacher), then tiny_eval.gin (a 2-episode
    rollout per step count): summary.json holds the per-task and mean tables of the benchmark."""
    from reflow_exp import run

    runs = tmp_path / "runs"
    common = [f'run.runs_dir = "{runs}"', f'metaworld_source.root = "{tmp_path / "mw"}"', "Tracker.enabled = False"]
    assert run.main(["--gin_file", "metaworld/tiny.gin", *[a for p in common for a in ("--gin_param", p)]]) == 0
    teacher_run = runs / "metaworld-tiny-teacher"
    params = [*common, f'evaluate_metaworld.policies = {{"teacher": ("{teacher_run}", [2])}}']
    assert run.main(["--gin_file", "metaworld/tiny_eval.gin", *[a for p in params for a in ("--gin_param", p)]]) == 0
    summary = json.loads((runs / "metaworld-tiny-eval" / "summary.json").read_text())
    row = summary["tasks"]["reach-v3"]["teacher"]["2"]
    assert row["episodes"] == 2 and 0.0 <= row["ci_low"] <= row["success_rate"] <= row["ci_high"] <= 1.0
    assert row["latency_ms"] > 0 and 1 <= row["mean_length"] <= 40
    assert summary["mean"]["teacher"]["2"]["episodes"] == 2
    assert summary["eval_protocol"]["env_kwargs"] == {"image_size": 64, "state": "objects"}
    assert (runs / "metaworld-tiny-eval" / row["videos"][0]).stat().st_size > 0
    assert "mean over 1 tasks" in capsys.readouterr().out


def test_bench_bindings_go_to_every_stage_or_to_the_named_one():
    from reflow_exp.bench.metaworld import for_stage

    params = ["Trainer.steps=2", "reflow:reflow.batch_size=8", "record:metaworld_source.video=False"]
    assert for_stage("teacher", params) == ["Trainer.steps=2"]
    assert for_stage("reflow", params) == ["Trainer.steps=2", "reflow.batch_size=8"]
    assert for_stage("record", params) == ["Trainer.steps=2", "metaworld_source.video=False"]


def test_evaluation_env_must_match_the_recording(recorded):
    from reflow_exp.data import open_metadata, policy_features
    from reflow_exp.jobs import smolvla_config
    from reflow_exp.metaworld.evaluation import check_config_fits

    source = recorded["source"]
    config = smolvla_config(source.vlm_model_name, policy_features(open_metadata(source)))
    check_config_fits("teacher", config, {"image_size": 64, "state": "objects"})
    with pytest.raises(ValueError, match="takes a state of 21 values but the env gives state='agent_pos'"):
        check_config_fits("teacher", config, {"state": "agent_pos"})
    with pytest.raises(ValueError, match="renders 96 px"):
        check_config_fits("teacher", config, {"image_size": 96})


def test_mean_over_tasks_pools_episodes_by_task_and_seed():
    from reflow_exp.metaworld.evaluation import pool
    from reflow_exp.stats import wilson_interval

    def metrics(success, length, latency):
        return {
            "episode_success": success,
            "episode_seeds": [5, 6],
            "episodes": 2,
            "mean_length": length,
            "mean_return": 1.0,
            "latency_ms": latency,
        }

    pooled = pool([metrics([1, 1], 40.0, 10.0), metrics([0, 0], 200.0, 30.0)], ["reach-v3", "push-v3"])
    assert pooled["success_rate"] == 0.5 and pooled["episodes"] == 4
    assert (pooled["ci_low"], pooled["ci_high"]) == wilson_interval(2, 4)
    assert pooled["mean_length"] == 120.0 and pooled["latency_ms"] == 20.0
    assert pooled["episode_seeds"] == ["reach-v3:5", "reach-v3:6", "push-v3:5", "push-v3:6"]
