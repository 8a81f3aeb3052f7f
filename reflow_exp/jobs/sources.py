"""Data sources for the jobs (gin: `train_teacher.source = @sandbox_source`): each returns a DataSource."""

from __future__ import annotations

from typing import Annotated

import gin
from reflow_exp.config_types import WritesFolder
from reflow_exp.data import DataSource
from reflow_exp.metaworld.tasks import DEFAULT_TASKS as DEFAULT_METAWORLD_TASKS  # no MuJoCo imported


@gin.configurable
def sandbox_source(
    root: Annotated[str, WritesFolder("the sandbox cache is built there")] = "runs/sandbox",
    episodes: int = 100,
    seed: int = 0,
    action_noise: float = 0.0,
    holdout_layouts: bool = False,
    video: bool = False,
    cameras: int = 1,
    rename_map: dict | None = None,
) -> DataSource:
    """The embedded task: a tiny SmolVLM and expert demonstrations, made locally once and cached
    (`action_noise`, `holdout_layouts`, `video`, `cameras`: see `sandbox.dataset.record_dataset`;
    with held-out layouts, use a `root` of its own and evaluate with `Evaluator.layouts`;
    `rename_map`: dataset key -> policy key)."""
    from reflow_exp.sandbox import build_sandbox

    built = build_sandbox(
        root,
        seed=seed,
        episodes=episodes,
        action_noise=action_noise,
        holdout_layouts=holdout_layouts,
        video=video,
        cameras=cameras,
    )
    return DataSource(
        str(built["vlm_path"]), built["repo_id"], str(built["dataset_root"]), built["expert"], dict(rename_map or {})
    )


@gin.configurable
def metaworld_source(
    root: Annotated[str, WritesFolder("the MetaWorld dataset is recorded there")] = "runs/metaworld",
    tasks=DEFAULT_METAWORLD_TASKS,
    episodes_per_task: int = 50,
    seed: int = 0,
    image_size: int = 64,
    state: str = "objects",
    video: bool = True,
    min_expert_success: float = 0.8,
) -> DataSource:
    """MetaWorld (LeRobot's env): scripted-expert demonstrations of `tasks` and a tiny SmolVLM that
    knows their instructions, made locally once and cached (see `metaworld.record.record_dataset`)."""
    from reflow_exp.metaworld.record import build_metaworld

    built = build_metaworld(root, tasks, episodes_per_task, seed, image_size, state, video, min_expert_success)
    return DataSource(built["vlm_path"], built["repo_id"], built["dataset_root"], built["expert"])


@gin.configurable
def lerobot_source(
    repo_id: str = gin.REQUIRED,
    vlm_model_name: str = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
    root: Annotated[str | None, WritesFolder("a dataset missing there is downloaded there")] = None,
    rename_map: dict | None = None,
) -> DataSource:
    """A LeRobotDataset (local `root` or the hub cache) and a SmolVLM (hub id or local folder).
    `rename_map`: dataset key -> policy key, e.g. {"observation.images.top": "observation.images.camera1"}."""
    return DataSource(vlm_model_name, repo_id, root, rename_map=dict(rename_map or {}))
