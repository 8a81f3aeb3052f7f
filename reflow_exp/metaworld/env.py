"""LeRobot's MetaWorld env, rendered small and fast, with the raw state its scripted experts need.

`FastMetaworldEnv` subclasses `lerobot.envs.metaworld.MetaworldEnv` (LeRobot's wrapper: its camera,
its image flip, its success/termination rule, its auto-reset on success) and changes three things:

- images are rendered at `image_size` (64) px instead of 480, without multisampling
  (`model.vis.quality.offsamples = 0`, set before the first render), shadows or reflections:
  ~7 ms a step instead of ~160 ms;
- the raw 39-D MetaWorld observation of the last step is kept in `raw_obs` (captured where the
  wrapper formats it, not by calling `_get_obs()`, which would advance MetaWorld's frame stack);
  `metaworld.policies` experts act on it;
- `state` chooses what `agent_pos` (the policy's `observation.state`) holds: "agent_pos", LeRobot's
  4 values (hand xyz, gripper opening), or "objects", 21 values: those 4, the first two objects'
  positions and quaternions (14) and the goal position (3) — the current frame of MetaWorld's
  observation without its frame-stacked copy of the previous frame.

Language: `task_description`, LeRobot's own MetaWorld task descriptions (what `lerobot_eval`
feeds a policy). The same class records the demonstrations and evaluates the policies, so the
two always see the same observations.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
from gymnasium import spaces

from .gl import check_gl_backend
from .tasks import check_task

check_gl_backend()  # before LeRobot's module imports MetaWorld: a broken backend fails clearly here
import metaworld  # noqa: E402
import mujoco  # noqa: E402
from lerobot.envs.metaworld import MetaworldEnv  # noqa: E402

STATES = {"agent_pos": 4, "objects": 21}
# Raw 39-D MetaWorld observation: hand (3), gripper (1), objects (14), previous frame (18), goal (3).
_OBJECTS_INDEX = np.r_[0:18, 36:39]


class FastMetaworldEnv(MetaworldEnv):
    """LeRobot's MetaworldEnv at `image_size` px, fast rendering, raw state kept (module docstring).

    Args:
        task: a MetaWorld v3 task name ("push-v3"; a "metaworld-" prefix is accepted).
        image_size: square render size in pixels.
        state: "agent_pos" (4) or "objects" (21): what `agent_pos` holds.
    """

    def __init__(self, task: str = "push-v3", image_size: int = 64, state: str = "objects", **kwargs):
        task = check_task(task)
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; choose one of {sorted(STATES)}")
        super().__init__(
            task, obs_type="pixels_agent_pos", observation_width=image_size, observation_height=image_size, **kwargs
        )
        self.image_size = image_size
        self.state = state
        self.raw_obs: np.ndarray | None = None  # (39,) float64, the last observation MetaWorld returned
        self.observation_space = spaces.Dict(
            {
                "pixels": spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
                "agent_pos": spaces.Box(-1000.0, 1000.0, (STATES[state],), np.float64),
            }
        )

    def _ensure_env(self) -> None:
        if self._env is not None:
            return
        with _mt1_cached():
            super()._ensure_env()
        model, renderer = self._env.model, self._env.mujoco_renderer
        # Before the first render: the offscreen buffer and viewer are created at these sizes then.
        model.vis.global_.offwidth = model.vis.global_.offheight = self.image_size
        model.vis.quality.offsamples = 0
        renderer.width = renderer.height = self.image_size
        self._env.width = self._env.height = self.image_size
        viewer = renderer._get_viewer("rgb_array")
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

    def _format_raw_obs(self, raw_obs: np.ndarray) -> dict:
        self.raw_obs = np.asarray(raw_obs, np.float64).copy()
        obs = super()._format_raw_obs(raw_obs)
        if self.state == "objects":
            obs["agent_pos"] = self.raw_obs[_OBJECTS_INDEX]
        return obs


_MT1 = metaworld.MT1


@functools.cache
def _cached_mt1(task: str, seed: int | None = None):
    return _MT1(task, seed=seed)


@contextlib.contextmanager
def _mt1_cached():
    """LeRobot's `_ensure_env` builds `metaworld.MT1(task, seed=42)` for every env it makes: 0.8 s of
    the 1.6 s an env takes here, and the same object each time (a pure function of its arguments,
    only read afterwards). The Evaluator makes one env per episode, so it is served from a cache
    while LeRobot's method runs."""
    metaworld.MT1 = _cached_mt1
    try:
        yield
    finally:
        metaworld.MT1 = _MT1
