"""Evaluation rollouts: a policy in a gymnasium env, for several sampling step counts.

`Evaluator(...).run(policy, step_counts, out_dir, tag) -> {k: metrics}` is the whole contract: it
returns numbers and writes videos, and never logs (the trainer/run decides what to log).

A policy here is anything with the `ChunkPolicy` interface (`reflow_exp.chunk_policy`).

Sampling follows SmolVLA's time convention: `num_steps` Euler steps from t=1 (noise) to t=0
(action), dt = -1/num_steps. The noise of each chunk is drawn from a generator seeded with the
episode's env seed, so an evaluation is a pure function of (policy, seed), the same whatever
`n_envs` (up to float rounding of batched maths), and every step count sees the same noise
(common random numbers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import statistics
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from lerobot.envs.utils import preprocess_observation
from lerobot.utils.io_utils import write_video
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

import gin
from reflow_exp.chunk_policy import (  # noqa: F401  re-exported: evaluate's policies
    ChunkPolicy,
    ScriptedChunkPolicy,
    SmolVLAChunkPolicy,
    as_chunk_policy,
    feature_mismatch,
)
from reflow_exp.sandbox import ENV_ID as SANDBOX_ENV_ID
from reflow_exp.sandbox import route_of
from reflow_exp.sandbox.task import EVAL_SEED_OFFSETS, LAYOUT_SETS, MAX_EPISODE_STEPS, eval_seeds
from reflow_exp.stats import wilson_interval

PUSHT_TASK = "Push the T-shaped block onto the T-shaped target."


# -- environments --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """How to make one of the supported envs and read what the policy needs from it.

    module: imported first (it registers `gym_id` with gymnasium).
    kwargs: `gym.make` keyword arguments (the Evaluator's `env_kwargs` override them).
    max_steps: episode step limit when the Evaluator gives none.
    task: the instruction for envs that carry none; None reads the env's own (`instruction`).
    routes: whether rollouts are classified left/right around the sandbox's bar.
    """

    gym_id: str
    module: str
    kwargs: dict
    max_steps: int
    task: str | None = None
    routes: bool = False


ENVS = {
    SANDBOX_ENV_ID: EnvSpec(SANDBOX_ENV_ID, "reflow_exp.sandbox", {}, MAX_EPISODE_STEPS, routes=True),
    # Pixels 96x96 + agent position, like LeRobot's PushT datasets; 256 px renders keep videos small.
    "pusht": EnvSpec(
        "gym_pusht/PushT-v0",
        "gym_pusht",
        {"obs_type": "pixels_agent_pos", "visualization_width": 256, "visualization_height": 256},
        max_steps=300,
        task=PUSHT_TASK,
    ),
}
# LeRobot's MetaworldEnv, subclassed (reflow_exp.metaworld.env); choose the task with env_kwargs={"task": ...}.
ENVS["metaworld"] = EnvSpec("reflow_exp/MetaWorld-v0", "reflow_exp.metaworld", {}, max_steps=500)
ALIASES = {"sandbox": SANDBOX_ENV_ID, "gym_pusht/PushT-v0": "pusht", "reflow_exp/MetaWorld-v0": "metaworld"}


def env_spec(env_id: str) -> EnvSpec:
    """The EnvSpec of `env_id` (a key of ENVS or an alias)."""
    key = ALIASES.get(env_id, env_id)
    if key not in ENVS:
        known = sorted([*ENVS, *ALIASES])
        raise ValueError(f"unknown env_id {env_id!r}; choose one of {known}")
    return ENVS[key]


def make_vector_env(spec: EnvSpec, num_envs: int, env_kwargs: dict | None = None) -> gym.vector.SyncVectorEnv:
    """`num_envs` copies of the env, stepped in lockstep (SyncVectorEnv: 2 cores gain nothing from
    subprocesses). Finished sub-envs auto-reset on their next step; the rollout ignores them."""
    importlib.import_module(spec.module)
    kwargs = spec.kwargs | (env_kwargs or {})
    return gym.vector.SyncVectorEnv([lambda: gym.make(spec.gym_id, **kwargs) for _ in range(num_envs)])


def instruction(env: gym.Env) -> str:
    """The env's language instruction, read as `lerobot_eval` does: `task_description` when the env
    has one (LeRobot's MetaWorld, LIBERO), else `task` (the sandbox)."""
    env = env.unwrapped
    return getattr(env, "task_description", None) or env.task


def observation_batch(obs: dict[str, np.ndarray], tasks: list[str]) -> dict:
    """Vector-env observations -> LeRobot's env-side batch, as in `lerobot_eval.py`:
    pixels (B, H, W, 3) uint8 -> `observation.image` (B, 3, H, W) float in [0, 1],
    agent_pos (B, d) -> `observation.state` (B, d) float32, plus `task` (B strings)."""
    return {**preprocess_observation(obs), "task": list(tasks)}


# -- rollouts ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Episode:
    """One rollout: its env seed, outcome, and (if recorded) rendered frames (H, W, 3) uint8."""

    seed: int
    success: bool = False
    ret: float = 0.0
    length: int = 0
    positions: list = dataclasses.field(default_factory=list)  # agent_pos (2,) per step, start included
    frames: list | None = None
    steps: list | None = None  # (observation, executed action (d,), task) per step, when kept


def rollout(
    env: gym.vector.SyncVectorEnv,
    policy: ChunkPolicy,
    seeds: list[int],
    num_steps: int,
    max_steps: int,
    default_task: str | None = None,
    record: int = 0,
    n_action_steps: int | None = None,
    keep_steps: bool = False,
) -> list[Episode]:
    """Run one episode per sub-env, in lockstep, for at most `max_steps` env steps.

    Every `n_action_steps` steps (default: the policy's own) the policy re-plans from the current
    observations and the first `n_action_steps` actions of each chunk are executed in turn
    (LeRobot's action queue).
    All rows re-plan together because all episodes start together; a finished row keeps being
    stepped (gymnasium auto-resets it) but its results are frozen. The first `record` rows keep
    their rendered frames; `keep_steps` keeps every row's env observations (one sub-env's dict),
    each with the action executed from it and the task (what `reflow_exp.visited` records).
    """
    policy.reset(seeds)
    obs, _ = env.reset(seed=seeds)
    tasks = [default_task if default_task is not None else instruction(e) for e in env.envs]
    episodes = [Episode(seed, positions=[obs["agent_pos"][i].copy()]) for i, seed in enumerate(seeds)]
    for i in range(record):
        episodes[i].frames = [env.envs[i].render()]
    for episode in episodes if keep_steps else ():
        episode.steps = []
    done = np.zeros(len(seeds), bool)
    every = n_action_steps or policy.n_action_steps
    for t in range(max_steps):
        if t % every == 0:
            chunk = _to_numpy(policy.predict_chunk(observation_batch(obs, tasks), num_steps))  # (B, chunk, d)
            if chunk.shape[1] < every:
                raise ValueError(f"n_action_steps={every} exceeds the policy's chunk of {chunk.shape[1]} actions")
        seen = obs
        obs, reward, terminated, truncated, info = env.step(chunk[:, t % every])
        success = info.get("is_success", np.zeros(len(seeds), bool))
        for i in np.flatnonzero(~done):
            episode = episodes[i]
            if episode.steps is not None:
                episode.steps.append(({key: value[i] for key, value in seen.items()}, chunk[i, t % every], tasks[i]))
            episode.ret += float(reward[i])
            episode.length += 1
            episode.success |= bool(success[i])
            episode.positions.append(obs["agent_pos"][i].copy())
            if episode.frames is not None:
                episode.frames.append(env.envs[i].render())
        done |= terminated | truncated
        if done.all():
            break
    return episodes


def _to_numpy(actions) -> np.ndarray:
    """Actions as a host float32 array; for a GPU policy this waits for the GPU to finish."""
    if isinstance(actions, Tensor):
        actions = actions.detach().cpu().numpy()
    return np.asarray(actions, np.float32)


def measure_latency(
    policy: ChunkPolicy,
    env: gym.vector.SyncVectorEnv,
    seed: int,
    num_steps: int,
    calls: int,
    default_task: str | None = None,
) -> float:
    """Median wall time in ms of one chunk prediction at batch 1, pre/post-processing included,
    on the first observation of the episode with env seed `seed`. One unmeasured warm-up call."""
    obs, _ = env.reset(seed=[seed])
    tasks = [default_task if default_task is not None else instruction(env.envs[0])]
    batch = observation_batch(obs, tasks)
    policy.reset([seed])
    _to_numpy(policy.predict_chunk(batch, num_steps))  # first calls pay lazy initialisation
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        _to_numpy(policy.predict_chunk(batch, num_steps))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


# -- videos --------------------------------------------------------------------------------------


def write_mp4(frames: list[np.ndarray], path: str | Path, fps: int = 10) -> Path:
    """Frames (H, W, 3) uint8 -> H.264 (libx264, yuv420p) mp4 that browsers and Gradio play, with
    LeRobot's writer (odd sizes are cropped by one pixel)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames, fps)
    return path


def write_gif(frames: list[np.ndarray], path: str | Path, fps: int = 10, size: int = 96, max_frames: int = 40) -> Path:
    """A small animated GIF (for Aim, which has no video type): `size` px, at most `max_frames`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stride = max(1, -(-len(frames) // max_frames))  # ceil: keep the whole episode, fewer frames
    images = [Image.fromarray(f).resize((size, size), Image.Resampling.BILINEAR) for f in frames[::stride]]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 * stride / fps), loop=0)
    return path


# -- the evaluator -------------------------------------------------------------------------------


@gin.configurable
class Evaluator:
    """Success rate (with its 95% Wilson interval), return, length and latency of a policy for each
    sampling step count, and each episode's outcome by env seed (for paired comparisons).

    Args:
        env_id: a key of ENVS ("reflow_exp/Sandbox-v0", "pusht") or an alias ("sandbox",
            "gym_pusht/PushT-v0").
        episodes: rollouts per step count; the env seeds are `sandbox.task.eval_seeds(episodes,
            seed, split, layouts)`, which never meet a training seed. Every policy and step count
            evaluated with the same arguments meets the same seeds (and the same noise).
        seed: evaluation seed in [0, 1000).
        split: "dev" (choose anything on it) or "report" (publish only; never tune on it); two
            disjoint seed ranges (see `sandbox.task.EVAL_SEED_OFFSETS`).
        layouts: sandbox only: "all", "train" (layouts a `holdout_layouts` dataset kept) or
            "heldout" (`sandbox.task.HELDOUT_LAYOUTS`, which such a dataset never shows).
        step_counts: default Euler step counts to evaluate.
        videos: episodes per step count saved as mp4 (the first ones), when `run` gets an out_dir.
        n_envs: episodes run side by side in one batch (a vector env).
        max_steps: env-step limit per episode; None: the env's own (sandbox 60, PushT 300).
        latency_calls: timed chunk predictions at batch 1 per step count (0: no latency).
        env_kwargs: extra `gym.make` arguments, over the env's defaults.
        n_action_steps: actions executed from each chunk before re-planning; None: the policy's
            own (`config.n_action_steps`).
    """

    def __init__(
        self,
        env_id: str = SANDBOX_ENV_ID,
        episodes: int = 20,
        seed: int = 0,
        step_counts=(1, 2, 4, 10),
        videos: int = 2,
        n_envs: int = 10,
        max_steps: int | None = None,
        latency_calls: int = 10,
        env_kwargs: dict | None = None,
        n_action_steps: int | None = None,
        split: str = "dev",
        layouts: str = "all",
    ):
        self.spec = env_spec(env_id)
        for name, value, low in (
            ("episodes", episodes, 1),
            ("n_envs", n_envs, 1),
            ("videos", videos, 0),
            ("latency_calls", latency_calls, 0),
            ("n_action_steps", 1 if n_action_steps is None else n_action_steps, 1),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"Evaluator.{name} must be an integer >= {low}, got {value!r}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"Evaluator.max_steps must be None or >= 1, got {max_steps!r}")
        if split not in EVAL_SEED_OFFSETS:
            raise ValueError(f"Evaluator.split must be one of {sorted(EVAL_SEED_OFFSETS)}, got {split!r}")
        if layouts not in LAYOUT_SETS:
            raise ValueError(f"Evaluator.layouts must be one of {LAYOUT_SETS}, got {layouts!r}")
        if layouts != "all" and not self.spec.routes:
            raise ValueError(f"Evaluator.layouts={layouts!r} needs the sandbox env; {env_id} has no layout split")
        self.seeds = eval_seeds(episodes, seed, split, layouts)  # validates the seed range now, not mid-run
        self.env_id = env_id
        self.episodes = episodes
        self.seed = seed
        self.step_counts = _check_step_counts(step_counts)
        self.videos = videos
        self.n_envs = n_envs
        self.max_steps = max_steps or self.spec.max_steps
        self.latency_calls = latency_calls
        self.env_kwargs = dict(env_kwargs or {})
        self.n_action_steps = n_action_steps
        self.split = split
        self.layouts = layouts

    @property
    def protocol(self) -> dict:
        """Which episodes this evaluator plays: summary.json's `eval_protocol`."""
        return {
            "env_id": self.env_id,
            "split": self.split,
            "seed": self.seed,
            "layouts": self.layouts,
            "episodes": self.episodes,
        }

    def mismatch(self, config) -> str | None:
        """Why a SmolVLA policy with `config` cannot act in this env: its cameras, state or action
        dimension do not fit the env's first observation and action space (None: it fits)."""
        with contextlib.closing(make_vector_env(self.spec, 1, self.env_kwargs)) as env:
            obs, _ = env.reset(seed=self.seeds[:1])
            batch = observation_batch(obs, [""])
            shapes = {key: tuple(value.shape[1:]) for key, value in batch.items() if key != "task"}
            problem = feature_mismatch(config, shapes, env.single_action_space.shape[0])
        return problem and f"{self.env_id} does not fit: {problem}"

    def run(self, policy, step_counts=None, out_dir: str | Path | None = None, tag: str = "") -> dict[int, dict]:
        """Evaluate `policy` (a reflow_exp Policy or a ChunkPolicy) at each step count.

        Returns {k: {"success_rate", "ci_low", "ci_high" (95% Wilson interval), "mean_return",
        "mean_length", "latency_ms", "episodes", "episode_seeds", "episode_success" (0/1 per seed,
        in seed order), "videos": [mp4 paths], "gif": path or None, "routes": {"left", "right",
        "none"} (sandbox)}}.
        Videos go to `out_dir/videos/<tag>_steps<k>_ep<i>.mp4` (none without an out_dir).
        """
        policy = as_chunk_policy(policy)
        step_counts = self.step_counts if step_counts is None else _check_step_counts(step_counts)
        with train_modes_kept(getattr(policy, "model", None)):
            return {k: self._evaluate(policy, k, out_dir, tag) for k in step_counts}

    def _evaluate(self, policy: ChunkPolicy, num_steps: int, out_dir, tag: str) -> dict:
        """The metrics dict of one step count (see `run`)."""
        episodes, fps = self._rollouts(policy, num_steps, record=self.videos if out_dir is not None else 0, tag=tag)
        result = _summarise(episodes)
        if self.latency_calls:
            with contextlib.closing(make_vector_env(self.spec, 1, self.env_kwargs)) as env:
                result["latency_ms"] = measure_latency(
                    policy, env, self.seeds[0], num_steps, self.latency_calls, self.spec.task
                )
        if self.spec.routes:
            result["routes"] = _count_routes(episodes)
        return result | self._save_videos(episodes, num_steps, out_dir, tag, fps)

    def _rollouts(self, policy: ChunkPolicy, num_steps: int, record: int, tag: str) -> tuple[list[Episode], int]:
        """All episodes, `n_envs` at a time, the first `record` with frames; and the env's render fps."""
        episodes: list[Episode] = []
        fps = 10
        with tqdm(total=self.episodes, desc=f"eval {tag or 'policy'} steps={num_steps}", leave=False) as bar:
            for start in range(0, self.episodes, self.n_envs):
                seeds = self.seeds[start : start + self.n_envs]
                with contextlib.closing(make_vector_env(self.spec, len(seeds), self.env_kwargs)) as env:
                    fps = int(env.metadata.get("render_fps") or fps)
                    episodes += rollout(
                        env,
                        policy,
                        seeds,
                        num_steps,
                        self.max_steps,
                        self.spec.task,
                        record=max(0, min(record - start, len(seeds))),
                        n_action_steps=self.n_action_steps,
                    )
                bar.update(len(seeds))
                bar.set_postfix(success=f"{np.mean([e.success for e in episodes]):.2f}")
        return episodes, fps

    def _save_videos(self, episodes: list[Episode], num_steps: int, out_dir, tag: str, fps: int) -> dict:
        """mp4s of the recorded episodes and a GIF of the first: {"videos": [paths], "gif": path}."""
        recorded = [(i, e.frames) for i, e in enumerate(episodes) if e.frames]
        if out_dir is None or not recorded:
            return {"videos": [], "gif": None}
        folder = Path(out_dir) / "videos"
        prefix = f"{tag}_" if tag else ""
        videos = [str(write_mp4(frames, folder / f"{prefix}steps{num_steps}_ep{i}.mp4", fps)) for i, frames in recorded]
        gif = write_gif(recorded[0][1], folder / f"{prefix}steps{num_steps}.gif", fps)
        return {"videos": videos, "gif": str(gif)}


@contextlib.contextmanager
def train_modes_kept(model):
    """Give `model` back in the train/eval modes it came in: LeRobot's predict_action_chunk calls
    eval() on the policy, and the trainer evaluates in the middle of training."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    modes = [module.training for module in modules]
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.training = mode


def _check_step_counts(step_counts) -> tuple[int, ...]:
    counts = (step_counts,) if isinstance(step_counts, int) else tuple(step_counts)
    if not counts or any(int(k) != k or k < 1 for k in counts):
        raise ValueError(f"step_counts must be positive integers, e.g. (1, 2, 4, 10); got {step_counts!r}")
    return tuple(int(k) for k in counts)


def _summarise(episodes: list[Episode]) -> dict:
    """Means over episodes and the success rate's 95% Wilson interval, as native Python numbers
    (Aim rejects numpy scalars), and each episode's outcome by seed."""
    successes = sum(e.success for e in episodes)
    low, high = wilson_interval(successes, len(episodes))
    return {
        "success_rate": successes / len(episodes),
        "ci_low": low,
        "ci_high": high,
        "mean_return": float(np.mean([e.ret for e in episodes])),
        "mean_length": float(np.mean([e.length for e in episodes])),
        "episodes": len(episodes),
        "episode_seeds": [e.seed for e in episodes],
        "episode_success": [int(e.success) for e in episodes],
    }


def _count_routes(episodes: list[Episode]) -> dict[str, int]:
    """How many rollouts went left / right around the sandbox's bar ("none": never got past it)."""
    counts = {"left": 0, "right": 0, "none": 0}
    for episode in episodes:
        counts[route_of(np.stack(episode.positions))] += 1
    return counts
