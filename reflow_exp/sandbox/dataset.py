"""Expert demonstrations of the sandbox task as a LeRobotDataset, and the whole sandbox builder.

Dataset episode i of a dataset recorded with `seed` runs the env with env seed
`train_episode_seed(seed, i)` (= TRAIN_SEED_OFFSET + 1_000_000 * seed + i) and the expert with
the same number, so the data are a pure function of (seed, episodes). Evaluation uses
`eval_episode_seed` and never meets these layouts.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from datasets.utils import logging as datasets_logging
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from tqdm import tqdm

from .expert import ROUTES, ScriptedExpert, route_of
from .task import IMAGE_SIZE, SandboxEnv, train_episode_seed
from .vlm import build_once, make_tiny_vlm

DATASET_VERSION = 1  # bump when the task, expert or features change: cached datasets re-record

FEATURES = {
    "observation.image": {"dtype": "image", "shape": (IMAGE_SIZE, IMAGE_SIZE, 3),
                          "names": ["height", "width", "channels"]},
    "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
    "action": {"dtype": "float32", "shape": (2,), "names": ["dx", "dy"]},
}


def record_dataset(root: str | Path, repo_id: str = "reflow_exp/sandbox", episodes: int = 100,
                   seed: int = 0, fps: int = 10) -> dict:
    """Record `episodes` expert episodes into a LeRobotDataset at `root`; return the report.

    Report: {"episodes", "frames", "success_rate", "routes": {"left", "right", "none"}}.
    Features: FEATURES, plus the instruction as each frame's task. Idempotent: a dataset already
    recorded at `root` with the same arguments is reused and its stored report returned.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    marker = {"kind": "sandbox_dataset", "version": DATASET_VERSION, "repo_id": repo_id,
              "episodes": episodes, "seed": seed, "fps": fps}
    return build_once(root, marker, lambda work: _record(work, repo_id, episodes, seed, fps))


def _record(root: Path, repo_id: str, episodes: int, seed: int, fps: int) -> dict:
    dataset = LeRobotDataset.create(repo_id, fps, root=root, features=FEATURES, use_videos=False)
    env = SandboxEnv()
    successes, routes, frames = 0, Counter({route: 0 for route in (*ROUTES, "none")}), 0
    bars_were_on = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # one bar per saved episode would bury ours
    try:
        for i in tqdm(range(episodes), desc="recording sandbox episodes", unit="ep"):
            episode_seed = train_episode_seed(seed, i)
            success, route, length = _record_episode(dataset, env, ScriptedExpert(episode_seed), episode_seed)
            successes += success
            routes[route] += 1
            frames += length
        dataset.finalize()  # writes parquet footers and the stats used for normalisation
    finally:
        if bars_were_on:
            datasets_logging.enable_progress_bar()
    return {"episodes": episodes, "frames": frames, "success_rate": successes / episodes,
            "routes": dict(routes)}


def _record_episode(dataset: LeRobotDataset, env: SandboxEnv, expert: ScriptedExpert,
                    episode_seed: int) -> tuple[bool, str, int]:
    """One expert episode into `dataset`; returns (success, route taken, frames)."""
    obs, info = env.reset(seed=episode_seed)
    expert.reset()
    path = [obs["agent_pos"]]
    done = False
    while not done:
        action = expert.act(obs, env)
        dataset.add_frame({
            "observation.image": obs["pixels"],  # (64, 64, 3) uint8
            "observation.state": obs["agent_pos"],  # (2,) float32
            "action": action,  # (2,) float32
            "task": env.task,
        })
        obs, _, terminated, truncated, info = env.step(action)
        path.append(obs["agent_pos"])
        done = terminated or truncated
    dataset.save_episode()
    return info["is_success"], route_of(np.stack(path)), len(path) - 1


def build_sandbox(root: str | Path, seed: int = 0, episodes: int = 100) -> dict:
    """Make (or reuse) the tiny VLM at root/"vlm" and the expert dataset at root/"data".

    Returns {"vlm_path", "dataset_root", "repo_id", "expert": record_dataset's report}.
    """
    root = Path(root)
    repo_id = "reflow_exp/sandbox"
    vlm_path = make_tiny_vlm(root / "vlm", seed=seed)
    report = record_dataset(root / "data", repo_id=repo_id, episodes=episodes, seed=seed)
    return {"vlm_path": str(vlm_path), "dataset_root": str(root / "data"), "repo_id": repo_id,
            "expert": report}
