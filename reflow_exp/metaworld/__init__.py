"""MetaWorld through LeRobot's env: scripted demonstrations, recorded small and fast (issue 13).

- `env`: `FastMetaworldEnv`, a subclass of LeRobot's `MetaworldEnv` (64 px fast renders, raw state
  for the experts), registered with gymnasium as ENV_ID (`gym.make(ENV_ID, task="push-v3")`);
- `record`: scripted-expert demonstrations of a task list into a LeRobotDataset, cached.

Importing this package imports neither metaworld nor MuJoCo (the env class loads on `gym.make`),
so the rest of reflow_exp works without the `metaworld` extra. MUJOCO_GL defaults to "egl" (an
offscreen backend that Mesa provides); it must be set before MuJoCo is first imported.
"""

import os

import gymnasium as gym

from .tasks import DEFAULT_TASKS  # noqa: F401  (re-exported)

ENV_ID = "reflow_exp/MetaWorld-v0"

os.environ.setdefault("MUJOCO_GL", "egl")


def register() -> None:
    """Register ENV_ID (idempotent); the entry point is imported by `gym.make`."""
    if ENV_ID not in gym.registry:
        gym.register(ENV_ID, entry_point="reflow_exp.metaworld.env:FastMetaworldEnv")


register()
