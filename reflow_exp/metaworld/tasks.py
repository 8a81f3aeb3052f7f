"""MetaWorld task names and LeRobot's descriptions of them, read without importing MetaWorld.

LeRobot ships the descriptions (what `lerobot_eval` gives a policy as its instruction) in
`lerobot/envs/metaworld_config.json`; reading the file directly keeps name checks instant and
free of MuJoCo, so a wrong name fails before any env or OpenGL context is made.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

# The benchmark's tasks (issue 13): scripted experts that succeed on (nearly) every episode.
DEFAULT_TASKS = ("reach-v3", "push-v3", "drawer-open-v3", "door-open-v3", "button-press-topdown-v3")


@functools.cache
def descriptions() -> dict[str, str]:
    """{task name: LeRobot's instruction}, e.g. "push-v3": "Push the puck to a goal"."""
    text = resources.files("lerobot.envs").joinpath("metaworld_config.json").read_text()
    return dict(json.loads(text)["TASK_DESCRIPTIONS"])


def valid_tasks() -> list[str]:
    """The MetaWorld v3 task names LeRobot describes (each has a scripted expert)."""
    return sorted(name for name in descriptions() if name.endswith("-v3"))


def check_task(task: str) -> str:
    """`task` without a "metaworld-" prefix; ValueError listing the valid v3 names if unknown."""
    name = str(task).removeprefix("metaworld-")
    if name not in valid_tasks():
        raise ValueError(f"unknown MetaWorld task {task!r}; valid v3 tasks: {', '.join(valid_tasks())}")
    return name
