"""The teacher job: 1-rectified flow (SmolVLA's flow matching) on a dataset, from a fresh head."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import torch
from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

import gin
from reflow_exp import distributed
from reflow_exp.backbone import Backbone, vlm_load_count
from reflow_exp.config_types import AtLeast
from reflow_exp.data import (
    dataset_digest,
    dataset_stats,
    default_workers,
    load_dataset,
    make_dataloader,
    open_metadata,
    policy_features,
    split_episodes,
)
from reflow_exp.heads import ActionHead
from reflow_exp.jobs.builders import param_summary, smolvla_config
from reflow_exp.policy import Policy
from reflow_exp.rundir import RunDir
from reflow_exp.torch_utils import enable_tf32
from reflow_exp.trainer import Trainer


@gin.configurable
def train_teacher(
    run: RunDir,
    source=gin.REQUIRED,
    batch_size: Annotated[int, AtLeast(1)] = 32,
    num_workers: int | None = None,
    train_backbone: bool = False,
    holdout_episodes: int = 10,
    dry_run: bool = False,
) -> None:
    """1-rectified flow: SmolVLA's flow-matching objective on a dataset, from a fresh head.

    `source` is a reference to a DataSource builder (`@sandbox_source`, `@lerobot_source`).
    The last `holdout_episodes` episodes are left out of training (`data.split_episodes`, the rule
    reflow uses too), so reflow's offline metrics can use episodes the teacher never saw; 0 trains
    on every episode. The split goes into summary.json's `data_split`.
    `num_workers`: DataLoader workers that decode camera frames (None: `data.default_workers`).
    `train_backbone=True` trains the VLM with the head: for the sandbox, whose tiny VLM is random
    rather than pretrained and must learn to see the goals. The trained VLM is saved with the
    teacher, and reflow keeps it frozen.
    """
    trainer, loads_before = Trainer(find_unused_parameters=train_backbone), vlm_load_count()
    if dry_run:
        print(f"[Teacher] would train {trainer.steps} steps at batch {batch_size} on {source.__name__}()")
        return
    with distributed.main_first():  # rank 0 makes or downloads the data; the others then read it
        data = source()
        meta = open_metadata(data)
    if data.report:
        print(f"[Teacher] Data: {data.report}")
        run.update_summary({"data": data.report})
    device = distributed.device()
    features = policy_features(meta, data.rename_map)
    config = dataclasses.replace(smolvla_config(data.vlm_model_name, features), device=device.type)
    train_eps, holdout_eps = (
        split_episodes(meta.total_episodes, holdout_episodes)
        if holdout_episodes
        else (list(range(meta.total_episodes)), [])
    )
    run.update_summary({"data_split": data_split(meta, train_eps, holdout_eps)})
    with distributed.main_first():
        dataset = load_dataset(data, meta, config.chunk_size, train_eps, cameras=list(config.image_features))
    torch.manual_seed(run.seed)
    backbone = Backbone.from_pretrained_vlm(data.vlm_model_name, config.num_vlm_layers).to(device)
    if train_backbone:
        backbone.unfreeze()
    # The processors send batches to this process's exact device (e.g. cuda:1).
    preprocessor, postprocessor = make_smolvla_pre_post_processors(
        dataclasses.replace(config, device=str(device)), dataset_stats(meta, data.rename_map)
    )
    policy = Policy(backbone, ActionHead(config, backbone), preprocessor, postprocessor)
    params = param_summary(policy, "teacher_head")
    print(f"[Teacher] Parameters: {params}")
    run.update_summary({"vlm_load_count": vlm_load_count() - loads_before, "params": params})
    run.save_operative_config()

    enable_tf32()  # CUDA only
    loader = make_dataloader(dataset, batch_size, seed=run.seed, num_workers=default_workers(num_workers))
    result = trainer.fit(policy, loader, run, preprocess=preprocessor, context={"head": "teacher"})
    run.update_summary({"train": result, "teacher_checkpoint": str(result["checkpoint"] / "pretrained_model")})
    run.save_operative_config()


def data_split(meta, train_eps: list[int], holdout_eps: list[int]) -> dict:
    """summary.json's `data_split`: which episodes of which dataset trained the run's policy."""
    return {
        "dataset": dataset_digest(meta),
        "episodes": meta.total_episodes,
        "train_episodes": len(train_eps),
        "holdout_episodes": holdout_eps,
        "fps": meta.fps,  # a reflow from this teacher refuses data at another rate (reflow.allow_fps_mismatch)
    }
