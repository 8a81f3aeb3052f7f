"""The scripted demonstrator and the route classifier.

The expert flips a fair coin at the start of each episode: left or right around the bar. It then
follows two waypoints on that side (below and above the bar's end) and heads for the instructed
goal. Same observation, two equally good routes: the data are bimodal by construction. It re-aims
from wherever the agent is, so it also demonstrates how to recover when the executed actions are
perturbed (see `record_dataset(action_noise=...)`).
"""

from __future__ import annotations

import numpy as np

from .task import AGENT_RADIUS, GOAL_RGB, MAX_STEP, OBSTACLE, SandboxEnv, colour_of

ROUTES = ("left", "right")
_CLEARANCE = 0.12  # distance the waypoints keep from the bar's corners: room for imprecise policies
_REACHED = 0.02  # a waypoint counts as reached this close (exactly, without action noise)
_SALT = 0x5EED  # mixed into the expert's seed (see ScriptedExpert)


def waypoints(route: str, goal: np.ndarray) -> list[np.ndarray]:
    """The points (each (2,)) the expert visits on `route`, the goal last."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    x0, y0, x1, y1 = OBSTACLE
    side_x = x0 - _CLEARANCE if route == "left" else x1 + _CLEARANCE
    return [np.array([side_x, y0 - _CLEARANCE]), np.array([side_x, y1 + _CLEARANCE]), np.asarray(goal, float)]


class ScriptedExpert:
    """Waypoint follower: `reset()` at each episode start, then `act(obs, task_or_env)` each step.

    `task_or_env` is either the env (the goal is read from its state) or the instruction string
    (the goal is found in `obs["pixels"]` by its colour). `route` is this episode's side, or fixed
    for every episode when given to the constructor.
    """

    def __init__(self, seed: int = 0, route: str | None = None):
        if route is not None and route not in ROUTES:
            raise ValueError(f"route must be None or one of {ROUTES}, got {route!r}")
        # Salted so that an expert and an env given the same seed draw from different streams.
        self.rng = np.random.default_rng((_SALT, seed))
        self.fixed_route = route
        self.route: str | None = None
        self._next = 0  # index of the waypoint being approached

    def reset(self) -> str:
        """Start an episode: choose the route (50/50 unless fixed) and return it."""
        self.route = self.fixed_route or ROUTES[int(self.rng.integers(2))]
        self._next = 0
        return self.route

    def act(self, obs: dict, task_or_env: str | SandboxEnv) -> np.ndarray:
        """Displacement (2,) float32 of length <= MAX_STEP towards the current waypoint."""
        if self.route is None:
            self.reset()
        agent = np.asarray(obs["agent_pos"], float)
        points = waypoints(self.route, _goal_of(obs, task_or_env))
        while self._next < len(points) - 1 and np.linalg.norm(points[self._next] - agent) < _REACHED:
            self._next += 1
        delta = points[self._next] - agent
        length = np.linalg.norm(delta)
        if length > MAX_STEP:
            delta *= MAX_STEP / length
        return delta.astype(np.float32)


def _goal_of(obs: dict, task_or_env: str | SandboxEnv) -> np.ndarray:
    """Centre (2,) of the instructed goal, from the env's state or from the pixels."""
    if isinstance(task_or_env, str):
        return locate_goal(obs["pixels"], colour_of(task_or_env))
    return task_or_env.unwrapped.goal


def locate_goal(pixels: np.ndarray, colour: str) -> np.ndarray:
    """Centre (2,) in unit coordinates of the `colour` disc in a (H, W, 3) uint8 image."""
    rows, cols = np.nonzero(np.all(pixels == np.array(GOAL_RGB[colour], np.uint8), axis=-1))
    if rows.size == 0:
        raise ValueError(f"no {colour} goal visible in the image")
    size = pixels.shape[0]
    return np.array([(cols.mean() + 0.5) / size, 1.0 - (rows.mean() + 0.5) / size])


def route_of(trajectory_xy: np.ndarray) -> str:
    """Which way a rollout went around the bar: "left", "right", or "none" if it never got past.

    trajectory_xy: (T, 2) agent positions. The route is read where the rollout first rises above the
    bar's middle: left of the bar is "left", right of it is "right"; a rollout that never rises
    that high (e.g. it hit the bar from below) or does so over the bar is "none".
    """
    xy = np.asarray(trajectory_xy, float).reshape(-1, 2)
    x0, y0, x1, y1 = OBSTACLE
    above = np.nonzero(xy[:, 1] > (y0 + y1) / 2)[0]
    if above.size == 0:
        return "none"
    x = xy[above[0], 0]
    if x < x0 - AGENT_RADIUS:
        return "left"
    if x > x1 + AGENT_RADIUS:
        return "right"
    return "none"
