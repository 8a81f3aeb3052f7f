"""States the teacher visits (`reflow.visited_episodes`): recorded once, added to the training
frames with unique indices, the held-out set untouched, bad settings refused before any weights."""

import json

import numpy as np
import pytest
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from safetensors import safe_open
from safetensors.torch import load_file

from reflow_exp import jobs, run, visited
from reflow_exp.sandbox.task import (
    EVAL_SEED_OFFSETS,
    HELDOUT_LAYOUTS,
    INSTRUCTIONS,
    MAX_STEP,
    SEED_STRIDE,
    TRAIN_SEED_OFFSET,
    VISITED_SEED_OFFSET,
    layout_of,
    visited_seeds,
)

EPISODES = 2  # visited rollouts in the tests


def reflow_run(runs_dir, name, sandbox, teacher, *params):
    """A tiny reflow run (gin/sandbox/tiny_reflow.gin) in this process, with cached pairs, a shared
    image embedding folder and no rollouts at the end."""
    bindings = [
        f'run.runs_dir = "{runs_dir}"',
        f'run.name = "{name}"',
        f'sandbox_source.root = "{sandbox}"',
        f'reflow.teacher = "{teacher}"',
        "Tracker.enabled = False",
        "reflow.coupling = @CachedCoupling()",
        "CachedCoupling.teacher_steps = 3",
        f'ImageEmbeddingCache.folder = "{runs_dir / "shared"}"',
        "reflow.teacher_eval_steps = ()",
        "reflow.student_eval_steps = ()",
        *params,
    ]
    argv = ["--gin_file", "gin/sandbox/tiny_reflow.gin"] + [x for b in bindings for x in ("--gin_param", b)]
    assert run.main(argv) == 0
    return runs_dir / name


@pytest.fixture(scope="module")
def runs(tiny_teacher, tmp_path_factory):
    """A run without visited states, then one with EPISODES of them (same shared image cache folder)."""
    runs_dir = tmp_path_factory.mktemp("visited") / "runs"
    sandbox = tiny_teacher.parent / "sandbox"
    base = reflow_run(runs_dir, "base", sandbox, tiny_teacher)
    with_visited = reflow_run(
        runs_dir,
        "with-visited",
        sandbox,
        tiny_teacher,
        f"reflow.visited_episodes = {EPISODES}",
        "reflow.visited_teacher_steps = 2",
    )
    return {"base": base, "visited": with_visited, "sandbox": sandbox, "teacher": tiny_teacher, "dir": runs_dir}


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


def test_visited_dataset_has_the_episodes_and_the_source_features(runs):
    source = LeRobotDatasetMetadata("reflow_exp/sandbox", root=runs["sandbox"] / "data")
    recorded = LeRobotDatasetMetadata(visited.REPO_ID, root=runs["visited"] / visited.FOLDER)
    assert recorded.total_episodes == EPISODES
    assert recorded.features == source.features and recorded.fps == source.fps
    report = summary(runs["visited"])["visited"]
    assert report["episodes"] == EPISODES and report["frames"] == recorded.total_frames > 0
    assert report["teacher_steps"] == 2 and 0 <= report["success_rate"] <= 1
    assert report["first_seed"] == visited_seeds(1)[0] and report["folder"] == visited.FOLDER
    assert "recording teacher@2 rollouts" in (runs["visited"] / "log.txt").read_text()
    assert "visited" not in summary(runs["base"])


def test_training_frames_are_the_train_episodes_plus_the_visited_frames_with_unique_indices(runs):
    base, with_visited = summary(runs["base"]), summary(runs["visited"])
    train_frames = base["image_embedding_cache"]["frames"]  # one row per training frame
    visited_frames = with_visited["visited"]["frames"]
    assert with_visited["image_embedding_cache"]["frames"] == train_frames + visited_frames
    pairs = load_file(runs["visited"] / "reflow_pairs.safetensors")["index"].tolist()
    assert len(pairs) == len(set(pairs)) == train_frames + visited_frames
    base_pairs = load_file(runs["base"] / "reflow_pairs.safetensors")["index"].tolist()
    assert set(base_pairs) < set(pairs)  # the dataset's frames keep their index; visited ones follow
    assert (
        min(set(pairs) - set(base_pairs))
        == LeRobotDatasetMetadata("reflow_exp/sandbox", root=runs["sandbox"] / "data").total_frames
    )


def test_caches_see_the_visited_frames_in_their_fingerprints(runs):
    keys = []
    for name in ("base", "visited"):
        with safe_open(str(runs[name] / "reflow_pairs.safetensors"), framework="pt") as f:
            keys.append(f.metadata()["fingerprint"])
    assert keys[0] != keys[1]
    # the visited run found the base run's image embeddings in the shared folder, stale for its frames
    assert "[Reflow] Building image embeddings into" in (runs["visited"] / "log.txt").read_text()


def test_held_out_set_is_unchanged(runs):
    base, with_visited = summary(runs["base"]), summary(runs["visited"])
    assert with_visited["data_split"] == base["data_split"]

    def teacher_errors_at_start(folder):  # computed on the held-out batches before any training
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {
            r["context"]["steps"]: r["offline_error"]
            for r in rows
            if r["step"] == 0 and "offline_error" in r and r["context"]["head"] == "teacher"
        }

    errors = teacher_errors_at_start(runs["base"])
    assert errors and teacher_errors_at_start(runs["visited"]) == pytest.approx(errors, rel=1e-6)


def test_normalisation_stays_the_teachers(runs):
    """The visited frames never re-derive statistics: the student's processors hold the teacher's."""
    teacher = runs["teacher"] / "checkpoints" / "last" / "pretrained_model"
    recorded = json.loads((runs["visited"] / visited.FOLDER / "meta" / "stats.json").read_text())
    for name in (
        "policy_preprocessor_step_5_normalizer_processor",
        "policy_postprocessor_step_0_unnormalizer_processor",
    ):
        ours = load_file(runs["visited"] / "student" / f"{name}.safetensors")
        theirs = load_file(teacher / f"{name}.safetensors")
        assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
        mean = ours["action.mean"].tolist()
        assert mean != pytest.approx(recorded["action"]["mean"])  # the teacher's, not the recording's


def test_a_second_run_reuses_the_recording_and_online_pairs_train_on_it(runs):
    """The same run again (it resumes), 2 more steps with the default OnlineCoupling: the recording
    is reused as it is, and training goes on over the dataset + visited frames."""
    folder = runs["visited"] / visited.FOLDER
    marker = folder / "reflow_exp_sandbox.json"
    before = marker.stat().st_mtime_ns, summary(runs["visited"])["visited"]
    reflow_run(
        runs["dir"],
        "with-visited",
        runs["sandbox"],
        runs["teacher"],
        f"reflow.visited_episodes = {EPISODES}",
        "reflow.visited_teacher_steps = 2",
        "reflow.coupling = @OnlineCoupling()",
        "Trainer.steps = 6",
    )
    log = (runs["visited"] / "log.txt").read_text()
    assert f"[Reflow] Reusing the teacher's recorded rollouts in {folder}" in log
    assert (marker.stat().st_mtime_ns, summary(runs["visited"])["visited"]) == before
    assert not list(folder.parent.glob(".visited.tmp-*"))  # no scratch folder left behind
    assert summary(runs["visited"])["train"]["steps"] == 6


@pytest.mark.parametrize(
    "binding, message",
    [
        ({"visited_episodes": -1}, "reflow.visited_episodes must be an integer >= 0"),
        ({"visited_episodes": 1.5}, "reflow.visited_episodes must be an integer >= 0"),
        ({"visited_episodes": 2, "visited_teacher_steps": 0}, "reflow.visited_teacher_steps must be an integer >= 1"),
    ],
)
def test_bad_settings_fail_before_any_weights_load(binding, message, tmp_path):
    def source():
        raise AssertionError("the data source was built before the settings were checked")

    with pytest.raises(ValueError, match=message):
        jobs.reflow(None, teacher=str(tmp_path / "no-teacher"), source=source, **binding)


def test_visited_needs_the_sandbox_env(tmp_path):
    import gin

    gin.parse_config('Evaluator.env_id = "pusht"')
    with pytest.raises(ValueError, match="records the sandbox's observations"):
        jobs.reflow(None, teacher=str(tmp_path / "no-teacher"), source=None, visited_episodes=3)


def test_visited_seeds_meet_no_training_or_evaluation_seed():
    seeds = visited_seeds(5, seed=999)
    assert all(VISITED_SEED_OFFSET <= s < VISITED_SEED_OFFSET + 1000 * SEED_STRIDE for s in seeds)
    for offset in (TRAIN_SEED_OFFSET, *EVAL_SEED_OFFSETS.values()):
        assert offset + 1000 * SEED_STRIDE <= VISITED_SEED_OFFSET or offset >= VISITED_SEED_OFFSET + 1000 * SEED_STRIDE
    assert visited_seeds(3, seed=1) == [VISITED_SEED_OFFSET + SEED_STRIDE + i for i in range(3)]


def test_visited_frames_are_the_teachers_executed_steps(runs):
    """Each frame holds the observation the teacher acted from and the action the env executed:
    the next frame's state is this one's moved by that action (capped at MAX_STEP, kept in the square)."""
    dataset = LeRobotDataset(visited.REPO_ID, root=runs["visited"] / visited.FOLDER)
    table = dataset.hf_dataset.with_format("numpy")[:]
    state, action, episode = table["observation.state"], table["action"], table["episode_index"]
    moves = 0
    for t in range(len(state) - 1):
        if episode[t] == episode[t + 1]:
            step = action[t] * min(1.0, MAX_STEP / np.linalg.norm(action[t]))
            np.testing.assert_allclose(state[t + 1], np.clip(state[t] + step, 0, 1), atol=1e-5)
            moves += 1
    assert moves == len(state) - EPISODES
    assert {dataset[0]["task"], dataset[len(dataset) - 1]["task"]} <= set(INSTRUCTIONS)


def test_two_processes_record_once_and_train_on_the_same_frames(runs, cli, torchrun):
    """torchrun with 2 gloo ranks: rank 0 records while rank 1 waits, then both read the recording;
    the merged pair file covers the same frames as the 1-process run's."""
    params = [
        f'run.runs_dir = "{runs["dir"]}"',
        'run.name = "two-ranks"',
        f'sandbox_source.root = "{runs["sandbox"]}"',
        f'reflow.teacher = "{runs["teacher"]}"',
        "Tracker.enabled = False",
        "reflow.coupling = @CachedCoupling()",
        "CachedCoupling.teacher_steps = 3",
        "reflow.batch_size = 4",
        "reflow.teacher_eval_steps = ()",
        "reflow.student_eval_steps = ()",
        f"reflow.visited_episodes = {EPISODES}",
        "reflow.visited_teacher_steps = 2",
    ]
    result = cli("gin/sandbox/tiny_reflow.gin", *params, launcher=torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    folder = runs["dir"] / "two-ranks"
    assert summary(folder)["visited"] == summary(runs["visited"])["visited"]  # same seeds, same teacher
    pairs = load_file(folder / "reflow_pairs.safetensors")["index"]
    one_process = load_file(runs["visited"] / "reflow_pairs.safetensors")["index"]
    assert sorted(pairs.tolist()) == sorted(one_process.tolist())
    assert (result.stdout + result.stderr).count("recording teacher@2 rollouts:   0%") == 1  # one process recorded
    assert "Reusing the teacher's recorded rollouts" not in (folder / "log.txt").read_text()  # and it was rank 0
    assert not {layout_of(s) for s in visited_seeds(20, layouts="train")} & HELDOUT_LAYOUTS
