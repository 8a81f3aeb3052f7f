"""Data: a LeRobotDataset read as SmolVLA training samples (one frame + the action chunk after it).

Any dataset LeRobot's own training reads: cameras stored as video or as images, any number of
them, any key names. The small columns (state, action, indices, timestamps) are read once in
bulk; camera frames are decoded per item with LeRobot's decoders, so memory does not grow with
the number of frames and decoding runs in DataLoader workers.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.datasets.video_utils import VideoDecoderCache, decode_video_frames, decode_video_frames_torchcodec
from lerobot.processor.rename_processor import rename_stats
from lerobot.utils.feature_utils import dataset_to_policy_features


@dataclass(frozen=True)
class DataSource:
    """Where a job's VLM and demonstrations come from.

    `vlm_model_name` is a hub id or a local folder; `root` a local LeRobotDataset folder (None: the
    Hugging Face cache for `repo_id`). `rename_map` maps dataset keys to the policy's keys
    (LeRobot's `--rename_map` convention), e.g. {"observation.images.top": "observation.images.camera1"}.
    """

    vlm_model_name: str
    repo_id: str
    root: str | None = None
    report: dict | None = None  # what building the source measured (e.g. the expert's success rate)
    rename_map: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- metadata and features
def open_metadata(source: DataSource) -> LeRobotDatasetMetadata:
    """The dataset's metadata (features, fps, stats), with clear errors for a wrong folder or rename_map."""
    root = Path(source.root) if source.root else None
    if root is not None and not (root / "meta" / "info.json").is_file():
        raise FileNotFoundError(
            f"No LeRobotDataset at {root} (missing {root / 'meta' / 'info.json'}); point the data source's root "
            "at a folder written by LeRobotDataset.create (it holds meta/, data/ and, for video, videos/), or "
            "leave root unset to use the hub cache for repo_id"
        )
    meta = LeRobotDatasetMetadata(source.repo_id, root=root)
    check_rename_map(source.rename_map, meta.features)
    return meta


def check_rename_map(rename_map: dict[str, str], features: dict) -> None:
    """Every key renamed must be a dataset feature, and no two keys may end up with one name."""
    unknown = sorted(set(rename_map) - set(features))
    if unknown:
        raise ValueError(
            f"rename_map names keys the dataset does not have: {unknown}. Its keys are "
            f"{sorted(features)}; rename_map maps a dataset key to the policy's key ({{dataset key: policy key}})"
        )
    renamed = [rename_map.get(key, key) for key in features]
    clashes = sorted({key for key in renamed if renamed.count(key) > 1})
    if clashes:
        raise ValueError(f"rename_map {rename_map} gives several dataset keys the same name: {clashes}")


def policy_features(meta: LeRobotDatasetMetadata, rename_map: dict[str, str] | None = None) -> dict[str, PolicyFeature]:
    """The dataset's features as LeRobot policy features (images, state, action), keys renamed."""
    rename_map = rename_map or {}
    return {rename_map.get(k, k): f for k, f in dataset_to_policy_features(meta.features).items()}


def dataset_stats(meta: LeRobotDatasetMetadata, rename_map: dict[str, str] | None = None) -> dict:
    """The normalisation statistics under the policy's key names."""
    return rename_stats(meta.stats, rename_map or {})


def check_features(
    config, features: dict[str, PolicyFeature], rename_hint: str = "rename_map", quiet: bool = False
) -> list[str]:
    """The policy's cameras that the dataset feeds, after checking (before any expensive work) that
    the dataset's features, already renamed, can feed the policy `config` (a SmolVLAConfig).

    LeRobot's rule (`SmolVLAPolicy.prepare_images`): cameras the policy reads but the dataset lacks
    are left out (SmolVLA fills up to `config.empty_cameras` of them with blank images), and cameras
    the dataset has but the policy does not read are ignored. Each case gets one line (none if `quiet`).
    `rename_hint` is the gin binding to suggest, e.g. "lerobot_source.rename_map".

    Raises:
        ValueError: no camera of the policy's is in the dataset, or the state or action is missing
            or of another shape; the message lists both sides and the rename_map fix.
    """
    wanted = {**config.input_features, **config.output_features}
    cameras = [key for key in config.image_features if not key.startswith("observation.images.empty_camera_")]
    used = [key for key in cameras if key in features]
    missing = [key for key in cameras if key not in features]
    spare = [k for k, f in features.items() if f.type is FeatureType.VISUAL and k not in wanted]
    problems = []
    if not used:
        problems.append(f"the policy reads the cameras {cameras}, and the dataset has none of them")
    for key, feature in wanted.items():
        if feature.type is FeatureType.VISUAL:
            continue
        if key not in features:
            problems.append(f"the policy reads {key} ({feature.type.name}), which the dataset lacks")
        elif tuple(features[key].shape) != tuple(feature.shape):
            problems.append(
                f"{key}: the policy has shape {tuple(feature.shape)}, the dataset {tuple(features[key].shape)}"
            )
    example = dict(zip(spare, missing)) or {"<dataset camera key>": "<policy camera key>"}
    fix = f"--gin_param '{rename_hint} = {_gin_dict(example)}'"
    if problems:
        raise ValueError(
            "The dataset does not match the policy's features:\n  - "
            + "\n  - ".join(problems)
            + f"\nPolicy features:  {_describe(wanted)}\nDataset features: {_describe(features)}\n"
            f"Fix: map dataset keys to the policy's with {rename_hint} (dataset key -> policy key), e.g.\n"
            f"  {fix}\nor use a dataset recorded with the cameras, state and action the policy was trained on."
        )
    if missing and not quiet:
        filled = min(len(missing), config.empty_cameras)
        blanks = f"; SmolVLA feeds {filled} of them as blank images (empty_cameras={config.empty_cameras})"
        print(
            f"[Data] The dataset lacks the policy's cameras {missing}: they are left out, as LeRobot's SmolVLA "
            f"does{blanks if filled else ''}. A rename_map would feed them from the dataset's cameras, e.g. {fix}"
        )
    if spare and not quiet:  # LeRobot's rule too: a policy may read a subset of the cameras
        print(f"[Data] The policy does not read the dataset's cameras {spare}: they are left out")
    return used


def _describe(features: dict[str, PolicyFeature]) -> str:
    return ", ".join(f"{key} {tuple(f.shape)}" for key, f in features.items())


def _gin_dict(mapping: dict[str, str]) -> str:
    return "{" + ", ".join(f'"{k}": "{v}"' for k, v in mapping.items()) + "}"


# ----------------------------------------------------------------------------- video decoder
@cache
def video_backend() -> str:
    """torchcodec when it loads (it needs FFmpeg's shared libraries), else pyav; says so in one line
    instead of the import's traceback wall."""
    try:
        importlib.import_module("torchcodec")
        return "torchcodec"
    except (ImportError, OSError, RuntimeError) as error:
        print(
            f"[Data] Video decoder: pyav (torchcodec did not load: {_first_line(error)[:160]}; `make setup` installs "
            "Debian's ffmpeg, which torchcodec needs)"
        )
        return "pyav"


def _first_line(error: Exception) -> str:
    """An exception's first line (decoders' messages run to dozens of lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- the dataset
def load_dataset(
    source: DataSource,
    meta: LeRobotDatasetMetadata,
    chunk_size: int,
    episodes: list[int] | None = None,
    cameras: list[str] | None = None,
) -> ChunkedFrames:
    """The dataset's frames, each with the chunk of `chunk_size` actions that starts at it.

    `cameras`: the policy's camera keys to decode (after rename_map; None: every camera).
    """
    rename = source.rename_map
    if cameras is not None:  # back to the dataset's names
        inverse = {policy_key: dataset_key for dataset_key, policy_key in rename.items()}
        cameras = [inverse.get(key, key) for key in cameras if inverse.get(key, key) in meta.camera_keys]
    if source.root is not None:
        check_video_files(meta, episodes, cameras)
    backend = video_backend() if meta.video_keys else None
    dataset = LeRobotDataset(source.repo_id, root=meta.root, episodes=episodes, video_backend=backend)
    return ChunkedFrames(dataset, chunk_size, cameras=cameras, rename_map=rename)


def check_video_files(
    meta: LeRobotDatasetMetadata, episodes: list[int] | None = None, cameras: list[str] | None = None
) -> None:
    """The selected episodes' video files of `cameras` (None: all) exist, and the last frame of each
    file decodes (a truncated file loses its end). Raises naming the episode, the camera and the file."""
    keys = [key for key in meta.video_keys if cameras is None or key in cameras]
    if not keys:
        return
    wanted = set(range(meta.total_episodes) if episodes is None else episodes)
    last = {}  # file -> (latest end timestamp in it, episode, key)
    for key, ep, path, _start, end in _video_spans(meta, keys):
        if ep not in wanted:
            continue
        if not path.is_file():
            raise FileNotFoundError(
                f"Episode {ep}'s video for {key} is missing: {path}. Re-download or re-record the dataset "
                "(LeRobotDataset reads frames from this file)"
            )
        if end > last.get(path, (-1.0,))[0]:
            last[path] = (end, ep, key)
    fps, probe = meta.fps, VideoDecoderCache()  # closed below: forked workers must not inherit open decoders
    for path, (end, ep, key) in last.items():
        try:
            _decode(path, end - 1.0 / fps, 1.0 / fps / 2, video_backend(), probe)
        except Exception as error:  # any decoder failure means the same thing here
            probe.clear()
            raise RuntimeError(
                f"Cannot decode the end of {path} (episode {ep}, camera {key}, t={end - 1.0 / fps:.3f} s): "
                f"{_first_line(error)}. The file is truncated or damaged; re-download or re-encode it"
            ) from None
    probe.clear()


def _video_spans(meta: LeRobotDatasetMetadata, keys: list[str]):
    """(key, episode, absolute file path, from_timestamp, to_timestamp) for every episode and video key."""
    columns = [
        f"videos/{key}/{name}"
        for key in keys
        for name in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
    ]
    table = meta.episodes.select_columns(["episode_index", *columns]).with_format(None)[:]
    for key in keys:
        for i, ep in enumerate(table["episode_index"]):
            relative = meta.video_path.format(
                video_key=key,
                chunk_index=table[f"videos/{key}/chunk_index"][i],
                file_index=table[f"videos/{key}/file_index"][i],
            )
            yield (
                key,
                int(ep),
                Path(meta.root) / relative,
                table[f"videos/{key}/from_timestamp"][i],
                table[f"videos/{key}/to_timestamp"][i],
            )


def _decode(
    path: Path, timestamp: float, tolerance_s: float, backend: str, cache: VideoDecoderCache | None
) -> torch.Tensor:
    """One frame (3, H, W) float in [0, 1] with LeRobot's decoders (torchcodec through `cache`)."""
    if backend == "torchcodec":
        frames = decode_video_frames_torchcodec(path, [timestamp], tolerance_s, decoder_cache=cache)
    else:
        frames = decode_video_frames(path, [timestamp], tolerance_s, backend)
    return frames.squeeze(0)


def check_finite_columns(columns: dict[str, torch.Tensor], root) -> None:
    """Refuse NaN/inf in the small float columns (state, action, ...), read once at load: a NaN
    state otherwise surfaces only in the batch that holds it, and a NaN action trains silently.
    The message names the column, the episode and the frame. `columns` holds `episode_index` and
    `frame_index` (N,) and float columns (N, ...)."""
    for name, values in columns.items():
        if not values.is_floating_point():
            continue
        bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
        if bad.any():
            row = int(torch.nonzero(bad)[0])
            episode, frame = int(columns["episode_index"][row]), int(columns["frame_index"][row])
            raise ValueError(
                f"{name} holds NaN/inf values in {int(bad.sum())} frame(s) of the dataset at {root}, the first at "
                f"episode {episode}, frame {frame}: fix those values or leave the episode out"
            )


class ChunkedFrames(torch.utils.data.Dataset):
    """A LeRobotDataset, one item per frame: what `LeRobotDataset` with
    `delta_timestamps={"action": [k / fps for k < chunk]}` returns (`action` (chunk, action_dim),
    `action_is_pad` (chunk,), cameras (3, H, W) float in [0, 1], `task`, ...), keys renamed by
    `rename_map`.

    LeRobot answers each item with a query over the episode (about 12 ms per item here); the small
    columns are read in bulk instead, and only the cameras are decoded per item: video frames with
    LeRobot's video decoder (one decoder cache per process, so DataLoader workers never share the
    parent's decoders), image frames from the memory-mapped table. Chunks never cross an episode:
    past its end the last action repeats and is marked as padding.

    `cameras`: dataset camera keys to decode (None: all).
    """

    def __init__(
        self,
        dataset: LeRobotDataset,
        chunk_size: int,
        cameras: list[str] | None = None,
        rename_map: dict[str, str] | None = None,
    ):
        meta, table = dataset.meta, dataset.hf_dataset
        cameras = list(meta.camera_keys) if cameras is None else list(cameras)
        if set(cameras) & set(meta.depth_keys):
            raise ValueError(f"depth cameras are not supported: {sorted(set(cameras) & set(meta.depth_keys))}")
        small = [c for c in table.column_names if c not in meta.image_keys]
        self.columns = table.select_columns(small).with_format("torch")[:]  # name -> (N, ...) tensor
        image_keys = [k for k in cameras if k in meta.image_keys]
        self.images = table.select_columns(image_keys) if image_keys else None  # decoded per item
        self.video_keys = [k for k in cameras if k in meta.video_keys]
        # key -> episode -> (file, from_timestamp): where each episode's frames sit in the shared files
        self.videos = {key: {} for key in self.video_keys}
        for key, ep, path, start, _ in _video_spans(meta, self.video_keys):
            self.videos[key][ep] = (path, start)
        self.backend = video_backend() if self.video_keys else None
        self.tolerance_s = dataset.tolerance_s
        self.rename_map = dict(rename_map or {})
        self.tasks = list(meta.tasks.index)  # task_index -> task string
        self.chunk_size = chunk_size
        episode = self.columns["episode_index"]
        self.actions = self.columns.pop("action")  # (N, action_dim)
        check_finite_columns({**self.columns, "action": self.actions}, meta.root)
        # last row of each row's episode (rows of one episode are contiguous and in frame order)
        change = torch.nonzero(episode[1:] != episode[:-1]).flatten() + 1
        ends = torch.cat([change, torch.tensor([len(episode)])])
        self.episode_end = torch.repeat_interleave(ends, torch.diff(torch.cat([torch.tensor([0]), ends])))
        self._cache, self._cache_pid = None, None

    def __len__(self) -> int:
        return len(self.actions)

    def __getitem__(self, row: int) -> dict:
        item = {key: values[row] for key, values in self.columns.items()}
        steps = row + torch.arange(self.chunk_size)
        item["action"] = self.actions[torch.clamp(steps, max=self.episode_end[row] - 1)]
        item["action_is_pad"] = steps >= self.episode_end[row]
        item["task"] = self.tasks[int(item["task_index"])]
        if self.images is not None:
            item |= self.images[row]
        for key in self.video_keys:
            item[key] = self._frame(key, int(item["episode_index"]), item["timestamp"].item())
        return {self.rename_map.get(key, key): value for key, value in item.items()}

    def _frame(self, key: str, episode: int, timestamp: float) -> torch.Tensor:
        path, start = self.videos[key][episode]
        try:
            return _decode(path, start + timestamp, self.tolerance_s, self.backend, self._decoders())
        except Exception as error:
            raise RuntimeError(
                f"Cannot decode {key} of episode {episode} at t={timestamp:.3f} s from {path}: "
                f"{_first_line(error)}. The file may be truncated or damaged; re-download or re-encode it"
            ) from error

    def _decoders(self) -> VideoDecoderCache:
        """This process's decoder cache (a forked worker makes its own)."""
        if self._cache_pid != os.getpid():
            self._cache, self._cache_pid = VideoDecoderCache(), os.getpid()
        return self._cache

    def __getstate__(self) -> dict:  # spawned workers: decoders do not pickle
        return {**self.__dict__, "_cache": None, "_cache_pid": None}

    def without_cameras(self) -> ChunkedFrames:
        """The same items without their camera frames: nothing is decoded."""
        frames = copy.copy(self)
        frames.images, frames.video_keys = None, []
        return frames


def without_cameras(dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
    """`dataset` (ChunkedFrames, a ConcatDataset of them or a wrapper with `without_cameras`) minus its
    camera frames: for training from cached image embeddings, where decoding them is wasted work
    (a video frame costs milliseconds, a batch of them more than a cached reflow step at real size)."""
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return torch.utils.data.ConcatDataset([without_cameras(part) for part in dataset.datasets])
    return dataset.without_cameras()


def default_workers(num_workers: int | None = None) -> int:
    """`num_workers` when given, else one DataLoader worker per CPU core beyond the one the training
    process uses, at most 4 (LeRobot's default): decoding frames then overlaps with training."""
    if num_workers is not None:
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, max(cores - 1, 0))


def make_dataloader(
    dataset: torch.utils.data.Dataset, batch_size: int, seed: int, num_workers: int = 0, shuffle: bool = True
) -> torch.utils.data.DataLoader:
    """Shuffled batches without the ragged last one (constant shapes for training), or every frame
    in order (`shuffle=False`, for pair generation and evaluation). Training workers persist across
    epochs (their decoders stay open)."""
    if shuffle and batch_size > len(dataset):
        raise ValueError(
            f"batch_size={batch_size} exceeds the dataset's {len(dataset)} frames; lower the batch size "
            "or record more episodes"
        )
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        num_workers=num_workers,
        persistent_workers=shuffle and num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),  # page-locked batches: the copy to the GPU overlaps (no-op on CPU)
    )


def rows_by_index(index: list[int], where: str) -> dict[int, int]:
    """Dataset frame `index` -> row of a per-frame file (pairs, embeddings). Duplicated indices would
    silently make one frame's row serve another, so they are refused."""
    rows = {int(i): r for r, i in enumerate(index)}
    if len(rows) != len(index):
        raise ValueError(
            f"{where}: {len(index) - len(rows)} duplicated frame indices; every training frame needs its "
            "own dataset `index` (datasets added to the training set must offset theirs)"
        )
    return rows


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
