"""The embedded sandbox: tiny SmolVLM, the task, the scripted expert, the recorded dataset."""

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors
from transformers import AutoModelForImageTextToText, AutoProcessor

from reflow_exp.files import MARKER, build_once
from reflow_exp.sandbox import (
    ENV_ID,
    INSTRUCTIONS,
    SandboxEnv,
    ScriptedExpert,
    build_sandbox,
    make_tiny_vlm,
    record_dataset,
    route_of,
    tiny_smolvla_config,
)
from reflow_exp.sandbox.task import (
    COLOURS,
    GOAL_SLOTS_X,
    HELDOUT_LAYOUTS,
    MAX_EPISODE_STEPS,
    MAX_STEP,
    OBSTACLE,
    eval_episode_seed,
    eval_seeds,
    in_layout_set,
    layout_of,
    train_episode_seed,
    train_seeds,
)

FPS = 10
CHUNK = 16


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """Tiny VLM + a 5-episode dataset, made once for the module."""
    return build_sandbox(tmp_path_factory.mktemp("sandbox"), seed=0, episodes=5)


def rollout(env, policy, seed, options=None):
    """Run `policy(obs, env) -> action` for one episode; returns (positions (T+1, 2), actions, last info)."""
    obs, info = env.reset(seed=seed, options=options)
    positions, actions, done = [obs["agent_pos"]], [], False
    while not done:
        action = policy(obs, env)
        obs, _, terminated, truncated, info = env.step(action)
        positions.append(obs["agent_pos"])
        actions.append(action)
        done = terminated or truncated
    return np.stack(positions), actions, info


def expert_policy(expert):
    expert.reset()
    return expert.act


# -- tiny VLM -----------------------------------------------------------------------------------


def test_tiny_vlm_runs_through_transformers(sandbox):
    path = sandbox["vlm_path"]
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    env = SandboxEnv()
    obs, _ = env.reset(seed=0)
    inputs = processor(text=["<image>" + env.task], images=[[obs["pixels"]]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    unk = processor.tokenizer.unk_token_id
    for instruction in INSTRUCTIONS:
        assert unk not in processor.tokenizer(instruction + "\n")["input_ids"], instruction


def test_tiny_vlm_is_reused_and_rebuilt_per_arguments(tmp_path):
    path = make_tiny_vlm(tmp_path / "vlm", seed=0)
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    make_tiny_vlm(path, seed=0)
    assert weights.stat().st_mtime_ns == stamp  # same arguments: not rewritten
    before = AutoModelForImageTextToText.from_pretrained(path).state_dict()
    make_tiny_vlm(path, seed=1)
    after = AutoModelForImageTextToText.from_pretrained(path).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # new seed, new weights
    # No temporary folders left behind; only build_once's (empty, hidden) lock file beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".vlm.lock", "vlm"]


def test_build_once_never_overwrites_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        build_once(tmp_path, {"a": 1}, lambda work: work.mkdir() or {})
    assert (tmp_path / "mine.txt").read_text() == "precious"
    assert not (tmp_path / MARKER).exists()


def test_smolvla_trains_and_predicts_on_the_sandbox(sandbox):
    config = tiny_smolvla_config(sandbox["vlm_path"], device="cpu")
    dataset = LeRobotDataset(
        sandbox["repo_id"], root=sandbox["dataset_root"], delta_timestamps={"action": [i / FPS for i in range(CHUNK)]}
    )
    policy = SmolVLAPolicy(config)
    preprocess, postprocess = make_smolvla_pre_post_processors(config, dataset.meta.stats)
    batch = preprocess(next(iter(torch.utils.data.DataLoader(dataset, batch_size=4))))

    expert = policy.model.vlm_with_expert.lm_expert
    expert_before = [p.detach().clone() for p in expert.parameters()]
    vlm_before = [p.detach().clone() for p in policy.model.vlm_with_expert.vlm.parameters()]
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    policy.train()
    loss, _ = policy.forward(batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(expert_before, expert.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(vlm_before, policy.model.vlm_with_expert.vlm.parameters()))

    policy.eval()
    with torch.no_grad():
        chunk = postprocess(policy.predict_action_chunk(batch))
    assert chunk.shape == (4, CHUNK, 2)
    assert torch.isfinite(chunk).all()


# -- task ---------------------------------------------------------------------------------------


def test_env_is_registered_deterministic_and_well_shaped():
    env = gym.make(ENV_ID)
    obs, info = env.reset(seed=3)
    assert obs["pixels"].shape == (64, 64, 3) and obs["pixels"].dtype == np.uint8
    assert obs["agent_pos"].shape == (2,) and obs["agent_pos"].dtype == np.float32
    assert info["task"] == env.unwrapped.task == env.unwrapped.task_description
    assert info["task"] in INSTRUCTIONS and info["is_success"] is False
    assert env.render().shape == (256, 256, 3)

    again, _ = env.reset(seed=3)
    np.testing.assert_array_equal(obs["pixels"], again["pixels"])
    other, _ = env.reset(seed=4)
    assert not np.array_equal(obs["pixels"], other["pixels"])  # the goals move with the seed

    step = env.step(np.array([0.0, 1.0], np.float32))  # too long: scaled down to MAX_STEP
    assert np.linalg.norm(step[0]["agent_pos"] - other["agent_pos"]) == pytest.approx(MAX_STEP, rel=1e-5)
    with pytest.raises(ValueError, match="action"):
        env.step(np.array([np.nan, 0.0]))


def test_env_truncates_at_max_episode_length():
    positions, actions, info = rollout(SandboxEnv(), lambda obs, env: np.zeros(2, np.float32), seed=0)
    assert len(actions) == MAX_EPISODE_STEPS and info["is_success"] is False


def test_the_instruction_decides_which_goal_counts():
    env = SandboxEnv()
    red, blue = INSTRUCTIONS
    _, actions, info = rollout(env, expert_policy(ScriptedExpert(0)), seed=7, options={"task": red})
    assert info["is_success"]
    # Same layout, same moves, other instruction: standing on the red goal is not a success.
    env.reset(seed=7, options={"task": blue})
    for action in actions:
        _, reward, terminated, _, info = env.step(action)
        assert reward == 0.0 and not terminated
    assert not info["is_success"]
    _, _, info = rollout(env, expert_policy(ScriptedExpert(0)), seed=7, options={"task": blue})
    assert info["is_success"]
    with pytest.raises(ValueError, match="go north"):
        env.reset(seed=7, options={"task": "go north"})


def test_episode_seed_ranges_are_disjoint():
    ends = [(s, i) for s in (0, 999) for i in (0, 999_999)]  # the corners of each range
    train = {train_episode_seed(s, i) for s, i in ends}
    dev = {eval_episode_seed(s, i, "dev") for s, i in ends}
    report = {eval_episode_seed(s, i, "report") for s, i in ends}
    assert max(train) < min(dev) <= max(dev) < min(report)
    assert eval_episode_seed(0, 7) == eval_episode_seed(0, 7, "dev")  # the range every earlier number used
    with pytest.raises(ValueError, match="1000000"):
        train_episode_seed(0, 1_000_000)
    with pytest.raises(ValueError, match="'test'.*'report'"):
        eval_episode_seed(0, 0, "test")


def test_layout_split_holds_out_combinations_not_slots():
    reds = sorted(red for red, _ in HELDOUT_LAYOUTS)
    blues = sorted(blue for _, blue in HELDOUT_LAYOUTS)
    assert reds == blues == list(range(len(GOAL_SLOTS_X)))  # each colour in each slot exactly once
    env = SandboxEnv()
    for seed in train_seeds(20):
        env.reset(seed=seed)
        assert layout_of(seed) == tuple(GOAL_SLOTS_X.index(env.goals[c][0]) for c in COLOURS)
    assert train_seeds(5) == [train_episode_seed(0, i) for i in range(5)]
    kept, heldout = train_seeds(40, layouts="train"), eval_seeds(40, split="report", layouts="heldout")
    assert not any(layout_of(s) in HELDOUT_LAYOUTS for s in kept)
    assert all(layout_of(s) in HELDOUT_LAYOUTS for s in heldout)
    assert eval_seeds(40, split="report", layouts="all")[:3] == [eval_episode_seed(0, i, "report") for i in range(3)]
    # About a quarter of the layouts (5 of 20 slot pairs) are held out.
    share = np.mean([in_layout_set(train_episode_seed(0, i), "heldout") for i in range(400)])
    assert 0.18 < share < 0.32
    with pytest.raises(ValueError, match="unknown layout set 'ood'"):
        eval_seeds(2, layouts="ood")


# -- expert -------------------------------------------------------------------------------------


def test_expert_succeeds_and_takes_both_routes():
    env = SandboxEnv()
    successes, routes = 0, []
    for i in range(20):
        expert = ScriptedExpert(seed=i)
        positions, _, info = rollout(env, expert_policy(expert), seed=train_episode_seed(0, i))
        successes += info["is_success"]
        assert route_of(positions) == expert.route
        routes.append(expert.route)
    assert successes >= 18
    assert set(routes) == {"left", "right"}


def test_expert_reads_the_goal_from_pixels():
    env = SandboxEnv()
    for seed in range(5):
        expert = ScriptedExpert(seed)
        expert.reset()
        _, _, info = rollout(env, lambda obs, e, expert=expert: expert.act(obs, e.task), seed=seed)
        assert info["is_success"], seed


def test_both_routes_succeed_from_the_same_observation():
    env = SandboxEnv()
    first_moves = {}
    for route in ("left", "right"):
        positions, actions, info = rollout(env, expert_policy(ScriptedExpert(0, route=route)), seed=11)
        assert info["is_success"] and route_of(positions) == route
        first_moves[route] = actions[0]
    assert first_moves["left"][0] < 0 < first_moves["right"][0]  # bimodal: opposite first moves


def test_averaging_the_routes_fails():
    """Why reflow must keep the modes apart: the straight line to the goal hits the bar, and the
    mean of the two experts' moves stalls below it."""

    def straight(obs, env):
        return (env.goal - obs["agent_pos"]).astype(np.float32)

    def mode_average(obs, env):
        return (left.act(obs, env) + right.act(obs, env)) / 2

    env = SandboxEnv()
    for seed in range(20):
        left, right = ScriptedExpert(0, route="left"), ScriptedExpert(0, route="right")
        positions, _, info = rollout(env, straight, seed=eval_episode_seed(0, seed))
        assert info["collision"] and route_of(positions) == "none", seed
        positions, _, info = rollout(env, mode_average, seed=eval_episode_seed(0, seed))
        assert not info["is_success"] and route_of(positions) == "none", seed


def test_route_of_reads_the_side_of_the_bar():
    x0, y0, x1, y1 = OBSTACLE
    below, above = y0 - 0.1, y1 + 0.1
    assert route_of([[0.5, 0.1], [x0 - 0.1, below], [x0 - 0.1, above], [0.5, 0.8]]) == "left"
    assert route_of([[0.5, 0.1], [x1 + 0.1, below], [x1 + 0.1, above], [0.5, 0.8]]) == "right"
    assert route_of([[0.5, 0.1], [0.5, below]]) == "none"


# -- dataset ------------------------------------------------------------------------------------


def test_dataset_loads_with_lerobot_and_yields_action_chunks(sandbox):
    report = sandbox["expert"]
    assert report["episodes"] == 5 and report["success_rate"] >= 0.8
    assert sum(report["routes"].values()) == 5

    dataset = LeRobotDataset(
        sandbox["repo_id"], root=sandbox["dataset_root"], delta_timestamps={"action": [i / FPS for i in range(CHUNK)]}
    )
    assert dataset.num_episodes == 5 and dataset.num_frames == report["frames"]
    assert set(dataset.meta.stats) >= {"observation.image", "observation.state", "action"}
    batch = next(
        iter(
            torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
        )
    )
    assert batch["observation.image"].shape == (8, 3, 64, 64)
    assert batch["observation.state"].shape == (8, 2)
    assert batch["action"].shape == (8, CHUNK, 2)
    assert batch["action_is_pad"].shape == (8, CHUNK)
    assert set(batch["task"]) <= set(INSTRUCTIONS)
    # Chunks running past an episode's end are padded; the rest are real expert moves.
    last = dataset[report["frames"] - 1]
    assert last["action_is_pad"][1:].all() and not last["action_is_pad"][0]
    assert torch.linalg.norm(batch["action"][~batch["action_is_pad"]], dim=-1).max() <= MAX_STEP + 1e-6


def test_dataset_is_reused_for_the_same_arguments(sandbox, tmp_path):
    parquet = next(Path(sandbox["dataset_root"], "data").rglob("*.parquet"))
    stamp = parquet.stat().st_mtime_ns
    assert build_sandbox(Path(sandbox["dataset_root"]).parent, seed=0, episodes=5) == sandbox
    assert parquet.stat().st_mtime_ns == stamp  # reused, not re-recorded
    small = record_dataset(tmp_path / "data", episodes=2, seed=1)
    assert small["episodes"] == 2
    assert record_dataset(tmp_path / "data", episodes=3, seed=1)["episodes"] == 3  # args changed: re-recorded
    assert LeRobotDataset("reflow_exp/sandbox", root=tmp_path / "data").num_episodes == 3


def test_action_noise_perturbs_the_states_but_not_the_labels(tmp_path):
    clean = LeRobotDataset("reflow_exp/sandbox", root=_recorded(tmp_path / "clean", 0.0))
    noisy = LeRobotDataset("reflow_exp/sandbox", root=_recorded(tmp_path / "noisy", 0.01))
    clean_states = clean.hf_dataset.with_format("numpy")["observation.state"]
    noisy_rows = noisy.hf_dataset.with_format("numpy")
    assert not np.allclose(clean_states[:10], noisy_rows["observation.state"][:10])
    # Each label is what the expert does from the recorded (perturbed) state: replay it.
    expert = ScriptedExpert(train_episode_seed(1, 0))
    expert.reset()
    for i in np.flatnonzero(noisy_rows["episode_index"] == 0):
        frame = noisy[int(i)]
        obs = {
            "pixels": (frame["observation.image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
            "agent_pos": frame["observation.state"].numpy(),
        }
        np.testing.assert_allclose(expert.act(obs, frame["task"]), frame["action"].numpy(), atol=1e-5)


def test_recorder_can_skip_the_heldout_layouts(tmp_path):
    report = record_dataset(tmp_path / "data", episodes=3, seed=0, holdout_layouts=True)
    assert report["heldout_layouts"] == sorted(map(list, HELDOUT_LAYOUTS))
    assert report["episodes"] == 3 and report["discarded"] == 0  # the expert never fails without noise
    dataset = LeRobotDataset("reflow_exp/sandbox", root=tmp_path / "data")
    rows = dataset.hf_dataset.with_format("numpy")
    episode, state = np.asarray(rows["episode_index"]), np.asarray(rows["observation.state"])
    starts = [state[np.flatnonzero(episode == e)[0]] for e in range(3)]
    # The recorded episodes are the first 3 training seeds outside the held-out layouts, in order;
    # seed 0's very first episode has a held-out layout, so it is skipped.
    seeds = train_seeds(3, seed=0, layouts="train")
    assert seeds == [train_episode_seed(0, i) for i in (1, 2, 3)]
    assert layout_of(train_episode_seed(0, 0)) in HELDOUT_LAYOUTS
    expected = [SandboxEnv().reset(seed=s)[0]["agent_pos"] for s in seeds]
    np.testing.assert_allclose(np.stack(starts), np.stack(expected))


def test_action_noise_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="action_noise"):
        record_dataset(tmp_path / "data", episodes=1, action_noise=MAX_STEP)
    assert not (tmp_path / "data").exists()


def _recorded(root: Path, action_noise: float) -> Path:
    report = record_dataset(root, episodes=2, seed=1, action_noise=action_noise)
    assert report["episodes"] + report["discarded"] == 2 and report["success_rate"] == report["episodes"] / 2
    return root
