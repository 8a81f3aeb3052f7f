"""Expert demonstrations of the sandbox task as a LeRobotDataset, and the whole sandbox builder.

Dataset episode i of a dataset recorded with `seed` runs the env with env seed
`train_episode_seed(seed, i)` (= TRAIN_SEED_OFFSET + 1_000_000 * seed + i) and the expert with
the same number, so the data are a pure function of (seed, episodes). Evaluation uses
`eval_episode_seed` and never meets these layouts.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from pathlib import Path

import av
import numpy as np
from datasets.utils import logging as datasets_logging
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from tqdm import tqdm

from reflow_exp.data import video_backend
from reflow_exp.files import build_once

from .expert import ROUTES, ScriptedExpert, route_of
from .task import HELDOUT_LAYOUTS, IMAGE_SIZE, MAX_STEP, SandboxEnv, train_seeds
from .vlm import make_tiny_vlm

DATASET_VERSION = 3  # bump when the task, expert or features change: cached datasets re-record

_NOISE_SALT = 0xDA27  # mixed into the action-noise seed, apart from the env's and the expert's

# The cameras, in order: the full view (what the evaluator's env renders), then a 2x zoom on the
# frame's centre (a second view for tests of several cameras).
CAMERA_KEYS = ("observation.image", "observation.images.zoom")
_CAMERA = {"shape": (IMAGE_SIZE, IMAGE_SIZE, 3), "names": ["height", "width", "channels"]}
_STATE_AND_ACTION = {
    "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
    "action": {"dtype": "float32", "shape": (2,), "names": ["dx", "dy"]},
}


def features(video: bool = False, cameras: int = 1) -> dict:
    """The dataset's features: `cameras` cameras stored as video or as images, state, action."""
    if cameras not in (1, 2):
        raise ValueError(f"the sandbox records 1 or 2 cameras, got cameras={cameras}")
    dtype = "video" if video else "image"
    return {**{key: {"dtype": dtype, **_CAMERA} for key in CAMERA_KEYS[:cameras]}, **_STATE_AND_ACTION}


def zoom(pixels: np.ndarray) -> np.ndarray:
    """The second camera: the centre half of the frame at twice the size, (H, W, 3) uint8."""
    h, w = pixels.shape[:2]
    centre = pixels[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2]
    return np.repeat(np.repeat(centre, 2, axis=0), 2, axis=1)


def record_dataset(
    root: str | Path,
    repo_id: str = "reflow_exp/sandbox",
    episodes: int = 100,
    seed: int = 0,
    fps: int = 10,
    action_noise: float = 0.0,
    holdout_layouts: bool = False,
    video: bool = False,
    cameras: int = 1,
) -> dict:
    """Record `episodes` expert episodes into a LeRobotDataset at `root`; return the report.

    `video`: cameras stored as MP4 (LeRobot's default codec, as on the hub) instead of images;
    `cameras`: 1 (the full view) or 2 (plus a zoomed view), see CAMERA_KEYS.

    `action_noise` > 0 perturbs each executed action by Gaussian noise of that standard deviation
    per axis while the recorded label stays the expert's clean action (DART): the data then show
    how to get back on course, which a policy that drifts needs. A failed episode is left out: it
    would demonstrate failure. `holdout_layouts=True` skips every episode whose layout is in
    `task.HELDOUT_LAYOUTS` (not counted: the next training seeds fill in), so a policy trained on
    the data never sees those goal-slot pairs; the default data are unchanged by this option.

    Report: {"episodes" (kept), "frames", "success_rate" (the expert's, over all episodes run),
    "routes": {"left", "right", "none"}, "discarded"}. Features: `features(video, cameras)`, plus the
    instruction as each frame's task. Idempotent: a dataset already recorded at `root` with the same
    arguments is reused and its report returned.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if not 0.0 <= action_noise < MAX_STEP:
        raise ValueError(f"action_noise must be in [0, {MAX_STEP}) (the longest step), got {action_noise}")
    marker = {
        "kind": "sandbox_dataset",
        "version": DATASET_VERSION,
        "repo_id": repo_id,
        "episodes": episodes,
        "seed": seed,
        "fps": fps,
        "action_noise": action_noise,
    }
    if holdout_layouts:  # only then, so caches of the default data stay valid
        marker["holdout_layouts"] = [list(pair) for pair in sorted(HELDOUT_LAYOUTS)]  # as JSON stores it
    if video or cameras != 1:  # likewise
        marker |= {"video": video, "cameras": cameras}
    seeds = train_seeds(episodes, seed, "train" if holdout_layouts else "all")
    spec = features(video, cameras)
    report = build_once(root, marker, lambda work: _record(work, repo_id, seeds, fps, action_noise, spec))
    return report | ({"heldout_layouts": marker["holdout_layouts"]} if holdout_layouts else {})


def _record(root: Path, repo_id: str, seeds: list[int], fps: int, action_noise: float, spec: dict) -> dict:
    env = SandboxEnv()
    kept, frames = 0, 0
    routes = Counter({route: 0 for route in (*ROUTES, "none")})
    with episode_writer(root, repo_id, fps, spec) as add_episode:
        for episode_seed in tqdm(seeds, desc="recording sandbox episodes", unit="ep"):
            noise = np.random.default_rng((_NOISE_SALT, episode_seed))
            success, route, steps = _run_episode(env, ScriptedExpert(episode_seed), episode_seed, action_noise, noise)
            if not success:
                continue
            add_episode(steps)
            kept += 1
            routes[route] += 1
            frames += len(steps)
    return {
        "episodes": kept,
        "frames": frames,
        "success_rate": kept / len(seeds),
        "routes": dict(routes),
        "discarded": len(seeds) - kept,
    }


@contextlib.contextmanager
def episode_writer(root: Path, repo_id: str, fps: int, spec: dict):
    """A new LeRobotDataset at `root` with features `spec`; yields `add_episode(frames)`, which saves
    one episode of `frame(...)` dicts (the zoom camera is derived here when `spec` has it). The
    dataset is finalised (parquet footers, stats) when the block ends without an error."""
    video = any(f["dtype"] == "video" for f in spec.values())
    if video:  # the encoders' per-episode notes (SVT-AV1's banner, FFmpeg's mp4 muxer) would bury the bar
        os.environ.setdefault("SVT_LOG", "1")
        av.logging.set_libav_level(av.logging.ERROR)
    backend = video_backend() if video else None  # LeRobot's own probe prints a traceback when it falls back
    dataset = LeRobotDataset.create(
        repo_id, fps, root=root, features=spec, use_videos=video, streaming_encoding=video, video_backend=backend
    )

    def add_episode(frames: list[dict]) -> None:
        for item in frames:
            if CAMERA_KEYS[1] in spec:
                item[CAMERA_KEYS[1]] = zoom(item[CAMERA_KEYS[0]])
            dataset.add_frame(item)
        dataset.save_episode()

    bars_were_on = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # one bar per saved episode would bury ours
    try:
        yield add_episode
        dataset.finalize()  # writes parquet footers and the stats used for normalisation
    finally:
        if bars_were_on:
            datasets_logging.enable_progress_bar()


def frame(obs: dict, action: np.ndarray, task: str) -> dict:
    """One step as a dataset frame: the observation the action was chosen from, and the action."""
    return {
        "observation.image": obs["pixels"],  # (64, 64, 3) uint8
        "observation.state": obs["agent_pos"],  # (2,) float32
        "action": np.asarray(action, np.float32),  # (2,)
        "task": task,
    }


def _run_episode(
    env: SandboxEnv, expert: ScriptedExpert, episode_seed: int, action_noise: float, noise: np.random.Generator
) -> tuple[bool, str, list[dict]]:
    """One expert episode; returns (success, route taken, its frames for `add_frame`)."""
    obs, info = env.reset(seed=episode_seed)
    expert.reset()
    path, steps = [obs["agent_pos"]], []
    done = False
    while not done:
        action = expert.act(obs, env)
        steps.append(frame(obs, action, env.task))  # the clean action is the label
        obs, _, terminated, truncated, info = env.step(action + noise.normal(0.0, action_noise, 2))
        path.append(obs["agent_pos"])
        done = terminated or truncated
    return info["is_success"], route_of(np.stack(path)), steps


def build_sandbox(
    root: str | Path,
    seed: int = 0,
    episodes: int = 100,
    action_noise: float = 0.0,
    holdout_layouts: bool = False,
    video: bool = False,
    cameras: int = 1,
) -> dict:
    """Make (or reuse) the tiny VLM at root/"vlm" and the expert dataset at root/"data"
    (`holdout_layouts`, `video`, `cameras`: see `record_dataset`).

    Returns {"vlm_path", "dataset_root", "repo_id", "expert": record_dataset's report}.
    """
    root = Path(root)
    repo_id = "reflow_exp/sandbox"
    vlm_path = make_tiny_vlm(root / "vlm", seed=seed)
    report = record_dataset(
        root / "data",
        repo_id=repo_id,
        episodes=episodes,
        seed=seed,
        action_noise=action_noise,
        holdout_layouts=holdout_layouts,
        video=video,
        cameras=cameras,
    )
    return {"vlm_path": str(vlm_path), "dataset_root": str(root / "data"), "repo_id": repo_id, "expert": report}
