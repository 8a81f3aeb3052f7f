"""Scripted-expert MetaWorld demonstrations as a LeRobotDataset, cached like the sandbox's.

Episode i of every task runs the env with seed `sandbox.task.train_episode_seed(seed, i)`, the
training range that the Evaluator's seeds (`eval_seeds`, "dev" and "report") never meet. The expert
is MetaWorld's own scripted policy for the task (`metaworld.policies`, through LeRobot's
TASK_POLICY_MAPPING), acting on the raw 39-D state that `FastMetaworldEnv` keeps; the recorded
frame is what a policy sees: the 64 px image, `agent_pos` as `observation.state`, and LeRobot's
task description as the instruction. Failed expert episodes are left out and counted.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from datasets.utils import logging as datasets_logging
from tqdm import tqdm

from reflow_exp.files import build_once
from reflow_exp.sandbox.task import train_episode_seed
from reflow_exp.sandbox.vlm import make_tiny_vlm

from .env import STATES
from .tasks import DEFAULT_TASKS, check_task

DATASET_VERSION = 1  # bump when the env, expert or features change: cached datasets re-record
REPO_ID = "reflow_exp/metaworld"
FPS = 80  # LeRobot's MetaworldEnv metadata


def features(image_size: int, state: str, video: bool) -> dict:
    """LeRobotDataset features: the camera (video or image), observation.state, 4-D action."""
    return {
        "observation.image": {
            "dtype": "video" if video else "image",
            "shape": (image_size, image_size, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (STATES[state],), "names": None},
        "action": {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "gripper"]},
    }


def check_arguments(tasks, episodes_per_task: int, min_expert_success: float, state: str) -> list[str]:
    """Validate before any env is made; return the task list."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("tasks is empty; give at least one MetaWorld v3 task, e.g. ['push-v3']")
    tasks = [check_task(task) for task in tasks]  # "metaworld-push-v3" -> "push-v3"
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks has duplicates: {tasks}")
    if int(episodes_per_task) != episodes_per_task or episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be an integer >= 1, got {episodes_per_task!r}")
    if not 0.0 <= min_expert_success <= 1.0:
        raise ValueError(f"min_expert_success must be in [0, 1], got {min_expert_success!r}")
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}; choose one of {sorted(STATES)}")
    return tasks


def record_dataset(
    root: str | Path,
    tasks=DEFAULT_TASKS,
    episodes_per_task: int = 50,
    seed: int = 0,
    image_size: int = 64,
    state: str = "objects",
    video: bool = True,
    min_expert_success: float = 0.8,
) -> dict:
    """Record `episodes_per_task` expert episodes of each task into a LeRobotDataset at `root`.

    Returns the report {"episodes" (kept), "frames", "discarded", "ms_per_step" (recording wall time
    per env step, failed episodes' steps included), "tasks": {task:
    {"success_rate", "kept", "run", "mean_length"}}}. A task whose expert succeeds in fewer than
    `min_expert_success` of its episodes fails the recording (RuntimeError listing every task's
    rate). Idempotent: a dataset recorded at `root` with the same arguments is reused.
    """
    tasks = check_arguments(tasks, episodes_per_task, min_expert_success, state)
    marker = {
        "kind": "metaworld_dataset",
        "version": DATASET_VERSION,
        "repo_id": REPO_ID,
        "tasks": tasks,
        "episodes_per_task": episodes_per_task,
        "seed": seed,
        "image_size": image_size,
        "state": state,
        "video": video,
    }
    report = build_once(
        root, marker, lambda work: _record(work, tasks, episodes_per_task, seed, image_size, state, video)
    )
    check_expert(report, min_expert_success)
    return report


def check_expert(report: dict, min_expert_success: float) -> None:
    low = {task: r["success_rate"] for task, r in report["tasks"].items() if r["success_rate"] < min_expert_success}
    if low:
        rates = ", ".join(
            f"{task} {r['success_rate']:.2f} ({r['kept']}/{r['run']})" for task, r in report["tasks"].items()
        )
        raise RuntimeError(
            f"the scripted expert succeeded in fewer than min_expert_success={min_expert_success} of the episodes "
            f"of {sorted(low)}; per task: {rates}. Drop those tasks or lower min_expert_success"
        )


def _record(root: Path, tasks: list[str], episodes: int, seed: int, image_size: int, state: str, video: bool) -> dict:
    import gymnasium as gym
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.envs.metaworld import TASK_POLICY_MAPPING

    from . import ENV_ID

    dataset = LeRobotDataset.create(
        REPO_ID, FPS, root=root, features=features(image_size, state, video), use_videos=video
    )
    per_task, frames, steps, start = {}, 0, 0, time.perf_counter()
    bars_were_on = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # one bar per saved episode would bury ours
    try:
        for task in tasks:
            env = gym.make(ENV_ID, task=task, image_size=image_size, state=state)
            kept, lengths = 0, []
            for i in tqdm(range(episodes), desc=f"recording {task}", unit="ep"):
                success, episode = _run_episode(env.unwrapped, TASK_POLICY_MAPPING[task](), train_episode_seed(seed, i))
                steps += len(episode)
                lengths.append(len(episode))
                if not success:
                    continue
                for frame in episode:
                    dataset.add_frame(frame)
                dataset.save_episode()
                kept += 1
                frames += len(episode)
            env.close()
            per_task[task] = {
                "success_rate": kept / episodes,
                "kept": kept,
                "run": episodes,
                "mean_length": float(np.mean(lengths)),
            }
        dataset.finalize()
    finally:
        if bars_were_on:
            datasets_logging.enable_progress_bar()
    kept = sum(r["kept"] for r in per_task.values())
    # ms_per_step: env, expert and dataset writing (encoding included), per env step run
    return {
        "episodes": kept,
        "frames": frames,
        "discarded": len(tasks) * episodes - kept,
        "ms_per_step": 1000 * (time.perf_counter() - start) / steps,
        "tasks": per_task,
    }


def _run_episode(env, expert, episode_seed: int) -> tuple[bool, list[dict]]:
    """One expert episode in a FastMetaworldEnv (unwrapped: no gymnasium checks between steps):
    (success, its frames for `add_frame`). Runs until success or the 500-step limit."""
    obs, info = env.reset(seed=episode_seed)
    episode = []
    for _ in range(env._max_episode_steps):
        action = np.clip(expert.get_action(env.raw_obs), -1.0, 1.0).astype(np.float32)  # (4,)
        episode.append(
            {
                "observation.image": obs["pixels"],  # (64, 64, 3) uint8
                "observation.state": obs["agent_pos"].astype(np.float32),  # (4,) or (21,)
                "action": action,
                "task": env.task_description,
            }
        )
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    return bool(info["is_success"]), episode


def build_metaworld(
    root: str | Path,
    tasks=DEFAULT_TASKS,
    episodes_per_task: int = 50,
    seed: int = 0,
    image_size: int = 64,
    state: str = "objects",
    video: bool = True,
    min_expert_success: float = 0.8,
) -> dict:
    """Make (or reuse) the tiny VLM at root/"vlm" (its vocabulary: the tasks' descriptions) and the
    demonstrations at root/"data". Returns {"vlm_path", "dataset_root", "repo_id", "expert": report}.
    Arguments are checked before anything is built."""
    from lerobot.envs.metaworld import TASK_DESCRIPTIONS

    tasks = check_arguments(tasks, episodes_per_task, min_expert_success, state)
    root = Path(root)
    vlm_path = make_tiny_vlm(
        root / "vlm", seed=seed, image_size=image_size, instructions=[TASK_DESCRIPTIONS[t] for t in tasks]
    )
    report = record_dataset(root / "data", tasks, episodes_per_task, seed, image_size, state, video, min_expert_success)
    return {"vlm_path": str(vlm_path), "dataset_root": str(root / "data"), "repo_id": REPO_ID, "expert": report}
