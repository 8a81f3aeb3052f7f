"""Data: a LeRobotDataset read as SmolVLA training samples (one frame + the action chunk after it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.configs.types import PolicyFeature
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.utils.feature_utils import dataset_to_policy_features


@dataclass(frozen=True)
class DataSource:
    """Where a job's VLM and demonstrations come from.

    `vlm_model_name` is a hub id or a local folder; `root` a local LeRobotDataset folder (None: the
    Hugging Face cache for `repo_id`).
    """

    vlm_model_name: str
    repo_id: str
    root: str | None = None
    report: dict | None = None  # what building the source measured (e.g. the expert's success rate)


def open_metadata(source: DataSource) -> LeRobotDatasetMetadata:
    """The dataset's metadata (features, fps, stats), with a clear error for a wrong folder."""
    root = Path(source.root) if source.root else None
    if root is not None and not (root / "meta" / "info.json").is_file():
        raise FileNotFoundError(
            f"No LeRobotDataset at {root} (missing meta/info.json); point the data source's root at a "
            "folder written by LeRobotDataset.create, or leave root unset to use the hub cache"
        )
    return LeRobotDatasetMetadata(source.repo_id, root=root)


def policy_features(meta: LeRobotDatasetMetadata) -> dict[str, PolicyFeature]:
    """The dataset's features as LeRobot policy features (images, state, action)."""
    return dataset_to_policy_features(meta.features)


def load_dataset(
    source: DataSource, meta: LeRobotDatasetMetadata, chunk_size: int, episodes: list[int] | None = None
) -> LeRobotDataset:
    """The dataset with `action` as a chunk of `chunk_size` future steps (plus `action_is_pad`)."""
    deltas = {"action": [i / meta.fps for i in range(chunk_size)]}
    return LeRobotDataset(source.repo_id, root=meta.root, episodes=episodes, delta_timestamps=deltas)


def make_dataloader(
    dataset: LeRobotDataset, batch_size: int, seed: int, num_workers: int = 0, shuffle: bool = True
) -> torch.utils.data.DataLoader:
    """Shuffled batches without the ragged last one (constant shapes for training), or every frame
    in order (`shuffle=False`, for pair generation and evaluation)."""
    if shuffle and batch_size > len(dataset):
        raise ValueError(
            f"batch_size={batch_size} exceeds the dataset's {len(dataset)} frames; lower the batch size "
            "or record more episodes"
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def split_episodes(total: int, holdout: int) -> tuple[list[int], list[int]]:
    """Training episodes first, the last `holdout` held out (for offline metrics)."""
    if not 0 < holdout < total:
        raise ValueError(f"holdout_episodes must be between 1 and {total - 1} for {total} episodes, got {holdout}")
    return list(range(total - holdout)), list(range(total - holdout, total))


def dataset_digest(meta: LeRobotDatasetMetadata) -> str:
    """Changes whenever the dataset's content description (info.json, stats) changes."""
    digest = hashlib.sha256()
    for name in ("info.json", "stats.json"):
        file = Path(meta.root) / "meta" / name
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()
