"""Frozen image embeddings computed once per dataset frame and camera, read back memory-mapped.

In reflow the backbone is frozen and, without image augmentation, a frame's vision encoder +
connector output never changes; at SmolVLA's real size that encoder is most of a prefix pass. The
cache stores, per camera, what `vlm_with_expert.embed_image` returns for each training frame
(before `embed_prefix` scales it by sqrt(hidden)), in one safetensors file:

    <camera key>: (frames, image_tokens, hidden) bfloat16     index: (frames,) int64 (dataset `index`)

Storage is bfloat16 by default (`ImageEmbeddingCache.dtype`): at SmolVLM2-500M's 64 tokens x 960
hidden that is 122,880 bytes per frame and camera instead of 245,760 in float32; the tiny student's
loss moved by 1.2e-6 relative (tests/test_embedding_cache.py bounds it at 1e-2). A lookup casts back
to the weights' dtype.

The file carries a fingerprint of the VLM's vision weights, SmolVLA's image preprocessing, the
storage dtype and the dataset; a file whose fingerprint differs, or that is unreadable, truncated,
of the wrong shape, disagrees with a fresh computation of its first batch, or holds non-finite
values in a bounded sample of its rows, is rebuilt (and a non-finite row a batch looks up is an
error). Before writing, the free space of its folder is checked. It is written batch by batch
(never whole in memory) and read through `safe_open`, which maps the file: a batch's lookup reads
only its own rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import time
from pathlib import Path
from typing import Annotated

import lerobot
import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

import gin
from reflow_exp import prefix
from reflow_exp.config_types import WritesFolder
from reflow_exp.data import rows_by_index
from reflow_exp.files import atomic_path, remove_stale_temp_files
from reflow_exp.heads import ActionHead

RECIPE = "SmolVLA prepare_images + vlm_with_expert.embed_image (vision encoder + connector), unscaled; v2"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CACHE_SPACE_FIX = (
    "free some space, point ImageEmbeddingCache.folder at a larger disk, or turn the cache off with "
    "reflow.image_embedding_cache = False"
)
_SAMPLE_ROWS = 256  # rows checked for non-finite values when a file is reused (first, last, random)
_SPOT_CHECK_RTOL = 1e-2


@gin.configurable
class ImageEmbeddingCache:
    """Per-frame image embeddings for the shared prefix (`Reflow.encode` looks a batch up here).

    Args:
        folder: where the file goes; None: the run folder. A shared folder lets runs on the same
            teacher VLM and data reuse one file (the fingerprint decides).
        required: raise when the cache is not valid for the run (image augmentation on, cameras
            the dataset lacks that SmolVLA would fill with blank images); otherwise say why and leave it off.
        dtype: storage precision, "bfloat16" (default: half of float32's bytes, float32's range),
            "float16" or "float32". Lookups cast to the compute dtype either way.
    """

    FILE = "image_embeddings.safetensors"

    def __init__(
        self,
        folder: Annotated[str | None, WritesFolder("the image embedding cache is written there")] = None,
        required: bool = False,
        dtype: str = "bfloat16",
    ):
        if dtype not in DTYPES:
            raise ValueError(f"ImageEmbeddingCache.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.folder, self.required, self.storage = folder, required, DTYPES[dtype]
        self.path: Path | None = None
        self.cameras: list[str] = []
        self.tensors: dict[str, Tensor] = {}
        self.row: dict[int, int] = {}
        self.dtype = torch.float32
        self.report: dict = {}

    @property
    def active(self) -> bool:
        return bool(self.tensors)

    # ------------------------------------------------------------------ build or reuse
    @torch.no_grad()
    def prepare(self, head: ActionHead, loader, preprocess, run_path: Path, data_fingerprint: dict) -> bool:
        """Open the cache for every frame of `loader` (in order, raw batches with an `index` column),
        building it first when missing, stale or corrupt. Returns whether the cache is on."""
        batch = preprocess(next(iter(loader)))
        reason = why_invalid(head, loader.dataset, batch)
        if reason:
            if self.required:
                raise ValueError(f"reflow.image_embedding_cache=True but {reason}; set it to False or None")
            print(f"[Reflow] Image embedding cache off: {reason}")
            return False
        self.path = Path(self.folder or run_path) / self.FILE
        for stale in remove_stale_temp_files(self.path.parent) if self.path.parent.is_dir() else []:
            print(f"[Reflow] Removed {stale}, left by a process that died while writing it")
        key = fingerprint(head, data_fingerprint, self.storage)
        first = {k: v[:1] for k, v in batch.items() if isinstance(v, Tensor)}  # the first frame
        fresh = prefix.image_embeddings(head, first)  # computed now: a spot check of the stored one
        problem = self._problem(key, len(loader.dataset), first, fresh)
        if problem is None:
            print(f"[Reflow] Reusing image embeddings {self.path}")
        else:
            print(f"[Reflow] Building image embeddings into {self.path} ({problem})")
            self.tensors, self.row = {}, {}
            start = time.perf_counter()
            _build(self.path, head, loader, preprocess, len(loader.dataset), key, self.storage)
            seconds = time.perf_counter() - start
            self._open(key)
            self.report = {"build_s": seconds, "build_s_per_frame": seconds / len(loader.dataset)}
        self.dtype = next(head.lerobot.model.vlm_with_expert.get_vlm_model().connector.parameters()).dtype
        self.report |= {
            "file": str(self.path),
            "frames": len(self.row),
            "file_bytes": self.path.stat().st_size,
            "bytes_per_frame": sum(t[0].nbytes for t in self.tensors.values()),
        }  # all cameras
        print(
            f"[Reflow] Image embeddings: {len(self.row)} frames x {len(self.cameras)} camera(s), "
            f"{self.report['bytes_per_frame'] / 1024:.1f} KiB per frame"
        )
        return True

    def _problem(self, key: str, frames: int, first: dict, fresh: prefix.ImageEmbeddings) -> str | None:
        """Why the file cannot be reused as is (None: it can)."""
        if not self.path.is_file():
            return "no cache yet"
        try:
            found = self._open(None)
        except Exception as error:  # safetensors raises its own error type for a damaged file
            return f"unreadable: {error}"
        if found != key:
            return "the VLM, image preprocessing or data changed"
        if len(self.row) != frames:
            return f"it holds {len(self.row)} frames, the data {frames}"
        try:
            stored = self.lookup(first)
        except ValueError as error:
            return str(error)
        for camera, old, new in zip(self.cameras, stored.embeddings, fresh.embeddings):
            if old.shape != new.shape:
                return f"{camera}: stored shape {tuple(old.shape[1:])}, now {tuple(new.shape[1:])}"
            # relative: another device's kernels (TF32 convolutions) differ by ~1e-3, stale data by ~1
            if (old.cpu() - new.float().cpu()).norm() > _SPOT_CHECK_RTOL * new.float().norm():
                return f"{camera}: stored embeddings differ from a fresh computation"
        rows = sample_rows(len(self.row))
        for camera in self.cameras:
            if not torch.isfinite(self.tensors[camera][rows]).all():
                return f"{camera}: non-finite values"
        return None

    def _open(self, expected_key: str | None) -> str | None:
        """Map the file; returns its fingerprint. `expected_key`: raise unless it matches."""
        self.tensors, self.row = {}, {}
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            self.cameras = json.loads(metadata.get("cameras", "[]"))
            tensors = {name: f.get_tensor(name) for name in ["index", *self.cameras]}  # mapped, not read
        if expected_key is not None and metadata.get("fingerprint") != expected_key:
            raise RuntimeError(f"{self.path} was just written with another fingerprint")
        index = tensors.pop("index")
        if any(len(t) != len(index) for t in tensors.values()):
            raise ValueError(f"{self.path}: cameras and index have different lengths")
        self.row = rows_by_index(index.tolist(), str(self.path))
        self.tensors = tensors
        return metadata.get("fingerprint")

    # ------------------------------------------------------------------ use
    def lookup(self, batch: dict) -> prefix.ImageEmbeddings | None:
        """The batch's image embeddings, per camera (B, image_tokens, hidden) on the batch's device,
        and SmolVLA's camera masks; None while the cache is off."""
        if not self.active:
            return None
        if "index" not in batch:
            raise ValueError(
                "the batch has no `index` column (the dataset's frame index), by which the image "
                "embedding cache finds its frames"
            )
        try:
            rows = torch.tensor([self.row[i] for i in batch["index"].tolist()])
        except KeyError as error:
            raise ValueError(
                f"frame index {error.args[0]} is not in the image embedding cache {self.path}; "
                "it covers the training frames only"
            ) from None
        device = batch["action"].device
        stored = [self.tensors[camera][rows] for camera in self.cameras]  # (B, tokens, hidden), storage dtype
        for camera, values in zip(self.cameras, stored):
            if not torch.isfinite(values).all():  # the start-up check samples rows; this sees every row used
                raise ValueError(
                    f"{self.path}: non-finite embeddings for {camera} at frames {batch['index'].tolist()}; "
                    "delete the file to rebuild it"
                )
        embeddings = [values.to(device, self.dtype, non_blocking=True) for values in stored]  # the weights' dtype
        return prefix.ImageEmbeddings(embeddings, [_camera_mask(batch, camera, len(rows)) for camera in self.cameras])


# ----------------------------------------------------------------------------- validity and fingerprint
def why_invalid(head: ActionHead, dataset, batch: dict) -> str | None:
    """Why cached embeddings would differ from the encoder's output on this data (None: they do not)."""
    augmentation = image_augmentation(dataset)
    if augmentation is not None:
        return f"image augmentation is on ({augmentation!r}): a frame's embeddings change every epoch"
    missing = [key for key in head.config.image_features if key not in batch]
    if missing and head.config.empty_cameras:  # the blank images are not in the cache
        return f"the data lacks the teacher's camera(s) {missing}, which SmolVLA feeds as blank images"
    return None


def image_augmentation(dataset):
    """The per-item image transform a dataset applies: LeRobotDataset's `image_transforms`, on the
    dataset or on a dataset it holds as an attribute. reflow_exp itself adds no augmentation."""
    candidates = [dataset, *(v for v in getattr(dataset, "__dict__", {}).values() if hasattr(v, "image_transforms"))]
    return next((c.image_transforms for c in candidates if getattr(c, "image_transforms", None) is not None), None)


def sample_rows(frames: int, count: int = _SAMPLE_ROWS) -> Tensor:
    """At most `count` row numbers of a file of `frames` rows: the first, the last and random others
    (a new draw each start). Checking these instead of every row keeps a reuse at ~`count` rows'
    reads whatever the size (a full scan of a 1M-frame, 3-camera file reads ~370 GB)."""
    if frames <= count:
        return torch.arange(frames)
    random = torch.randint(1, frames - 1, (count - 2,), generator=torch.Generator().manual_seed(time.time_ns()))
    return torch.cat([torch.tensor([0, frames - 1]), random]).unique()


def fingerprint(head: ActionHead, data_fingerprint: dict, storage: torch.dtype = torch.bfloat16) -> str:
    """Changes with the vision encoder's and connector's weights, SmolVLA's image preprocessing
    (resize, cameras and their shapes, LeRobot's version), the storage dtype and the data
    (`data_fingerprint`)."""
    config = head.config
    description = {
        "recipe": RECIPE,
        "storage": str(storage),
        "lerobot": lerobot.__version__,
        "vision_weights": vision_digest(head),
        "resize_imgs_with_padding": list(config.resize_imgs_with_padding or []),
        "cameras": {key: list(feature.shape) for key, feature in config.image_features.items()},
        "data": data_fingerprint,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def vision_digest(head: ActionHead) -> str:
    """sha256 over the vision encoder's and connector's tensors (names and bytes)."""
    vlm = head.lerobot.model.vlm_with_expert.get_vlm_model()
    digest = hashlib.sha256()
    for part in (vlm.vision_model, vlm.connector):
        for name, tensor in part.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the file
def _build(path: Path, head: ActionHead, loader, preprocess, frames: int, key: str, storage: torch.dtype) -> None:
    """Embed every frame of `loader` and write the file atomically (rows in the loader's order),
    the embeddings in `storage` precision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer, row = None, 0
        try:
            for raw in tqdm(loader, desc="image embeddings", unit="batch"):
                batch = preprocess(raw)
                embedded = prefix.image_embeddings(head, batch)
                cameras = [key for key in head.config.image_features if key in batch]
                if writer is None:
                    shapes = {
                        "index": ((frames,), torch.int64),
                        **{c: ((frames, *e.shape[1:]), storage) for c, e in zip(cameras, embedded.embeddings)},
                    }
                    metadata = {"fingerprint": key, "cameras": json.dumps(cameras), "recipe": RECIPE}
                    writer = RowWriter(tmp, shapes, metadata)
                    print(f"[Reflow] {frames} frames x {len(cameras)} camera(s): {writer.size / 2**30:.2f} GiB on disk")
                writer.write("index", row, raw["index"].to(torch.int64))
                for camera, embedding in zip(cameras, embedded.embeddings):
                    if not torch.isfinite(embedding).all():
                        raise ValueError(f"non-finite image embeddings for {camera} at frames {raw['index'].tolist()}")
                    writer.write(camera, row, embedding.cpu().to(storage))
                row += len(raw["index"])
            if writer is None or row != frames:
                raise ValueError(f"the loader gave {row} frames, its dataset has {frames}; use one without drop_last")
        finally:  # at once, not when collected: on a full disk its blocks are what frees space
            if writer is not None:
                writer.close()


class RowWriter:
    """A safetensors file written in pieces: the header first (shapes known up front), then each
    tensor's rows at their place, so the whole file never sits in memory. Refuses to start when the
    folder has less free space than the file needs (`check_free_space`).

    `create=False` reopens a file another process created with the same shapes and metadata (so
    the same layout), to write its own rows into it (`coupling.CachedCoupling` with N processes).
    `what` and `fix` name the file and the way out in the free-space error."""

    DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}

    def __init__(
        self,
        path: Path,
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
        metadata: dict[str, str],
        create: bool = True,
        what: str = "the image embedding cache",
        fix: str = CACHE_SPACE_FIX,
    ):
        """shapes: {name: (shape, dtype)}; every shape's first dimension is its row count."""
        header, offset, self.start, self.row_bytes = {"__metadata__": metadata}, 0, {}, {}
        for name, (shape, dtype) in shapes.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": self.DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.start[name], self.row_bytes[name] = offset, nbytes // shape[0]
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.base = 8 + len(text)
        self.size = self.base + offset
        if not create:
            self.file = open(path, "r+b")
            return
        check_free_space(Path(path).parent, self.size, what, fix)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.file.truncate(self.size)

    def write(self, name: str, row: int, values: Tensor) -> None:
        """Rows `row, row+1, ...` of tensor `name` (values: (rows, *shape[1:]), the tensor's dtype)."""
        self.file.seek(self.base + self.start[name] + row * self.row_bytes[name])
        self.file.write(values.contiguous().view(torch.uint8).numpy().tobytes())  # bf16 has no numpy dtype

    def close(self) -> None:
        self.file.close()


def check_free_space(folder: Path, needed: int, what: str, fix: str) -> None:
    """Raise `OSError` when `folder` has fewer than `needed` free bytes, before anything is written:
    the file is sized up front as a sparse file, so a full disk would otherwise show up mid-build.
    `what` names the file in the message, `fix` says what to do."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(f"{what} needs {needed:,} bytes in {folder}, which has {free:,} free; {fix}")


def _camera_mask(batch: dict, camera: str, size: int) -> Tensor:
    """SmolVLA's per-camera mask (B,): the batch's `<camera>_padding_mask` if any, else all real."""
    device = batch["action"].device
    mask = batch.get(f"{camera}_padding_mask")
    return mask.bool().to(device) if mask is not None else torch.ones(size, dtype=torch.bool, device=device)
