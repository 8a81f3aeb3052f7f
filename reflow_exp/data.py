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
) -> ChunkedFrames:
    """The dataset's frames, each with the chunk of `chunk_size` actions that starts at it."""
    return ChunkedFrames(LeRobotDataset(source.repo_id, root=meta.root, episodes=episodes), chunk_size)


class ChunkedFrames(torch.utils.data.Dataset):
    """A LeRobotDataset held in memory, one item per frame: what `LeRobotDataset` with
    `delta_timestamps={"action": [k / fps for k < chunk]}` returns (`action` (chunk, action_dim),
    `action_is_pad` (chunk,), `task`, ...), decoded once.

    LeRobot answers each item with a query over the episode (about 12 ms per item here, so 0.8 s
    per batch of 64 against a 0.1 s training step); the columns are read in bulk instead.
    Chunks never cross an episode: past its end the last action repeats and is marked as padding.
    """

    def __init__(self, dataset: LeRobotDataset, chunk_size: int):
        self.columns = dataset.hf_dataset[:]  # column name -> list of per-frame tensors
        self.tasks = list(dataset.meta.tasks.index)  # task_index -> task string
        self.chunk_size = chunk_size
        episode = torch.stack(self.columns["episode_index"])
        self.actions = torch.stack(self.columns["action"])  # (N, action_dim)
        # last row of each row's episode (rows of one episode are contiguous and in frame order)
        change = torch.nonzero(episode[1:] != episode[:-1]).flatten() + 1
        ends = torch.cat([change, torch.tensor([len(episode)])])
        self.episode_end = torch.repeat_interleave(ends, torch.diff(torch.cat([torch.tensor([0]), ends])))

    def __len__(self) -> int:
        return len(self.actions)

    def __getitem__(self, row: int) -> dict:
        item = {key: values[row] for key, values in self.columns.items()}
        steps = row + torch.arange(self.chunk_size)
        item["action"] = self.actions[torch.clamp(steps, max=self.episode_end[row] - 1)]
        item["action_is_pad"] = steps >= self.episode_end[row]
        item["task"] = self.tasks[int(item["task_index"])]
        return item


def make_dataloader(
    dataset: torch.utils.data.Dataset, batch_size: int, seed: int, num_workers: int = 0, shuffle: bool = True
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
