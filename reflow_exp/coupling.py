"""Couplings: where reflow's (noise z, teacher action x) pairs come from.

Both give pairs in the padded, normalised action space the heads see, (B, chunk, max_action_dim);
x is the teacher's Euler solution from z (t=1) to t=0 with `teacher_steps` steps.
- `OnlineCoupling`: fresh noise and a teacher ODE every batch (unlimited pairs, teacher cost per step).
- `CachedCoupling`: K pairs per training frame generated once into a safetensors file in the run
  folder and reused every epoch; regenerated when the teacher, the data or the settings change,
  and when the file is damaged (truncated, unreadable) or holds NaN/inf values.
  With several processes each writes the pairs of its own shard of the frames into its rows of one
  preallocated file, and every process maps it. A frame's noise depends only on (seed, frame
  index): it is regenerated, not stored, and the file's content is the same whatever the number of
  processes (rows in shard order).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm import tqdm

from reflow_exp import distributed
from reflow_exp.checkpoint import file_problem
from reflow_exp.data import rows_by_index
from reflow_exp.embedding_cache import DTYPES, RowWriter, sample_rows
from reflow_exp.files import fsync_dir, fsync_file


class OnlineCoupling:
    """Per batch: z ~ N(0, I), x = teacher(obs, z)."""

    def __init__(self, teacher_steps: int = 10):
        if teacher_steps < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {teacher_steps}")
        self.teacher_steps = teacher_steps

    def prepare(self, model, loader, preprocess, run_path: Path, fingerprint: dict) -> None:
        """Nothing to precompute."""

    def pairs(self, model, batch: dict, shared) -> tuple[Tensor, Tensor]:
        b, chunk, dim = batch["action"].shape[0], model.student.config.chunk_size, model.student.config.max_action_dim
        noise = distributed.rank_rows(lambda n: torch.randn(n, chunk, dim, device=batch["action"].device), b)
        return noise, model.teacher_actions(batch, noise, self.teacher_steps, shared)


class CachedCoupling:
    """K = `pairs_per_sample` pairs per dataset frame, looked up by the frame's `index`.

    The file holds, per frame, only what cannot be recomputed cheaply:

        index: (N,) int64        action: (N, K, chunk, action_dim) in `dtype` (default bfloat16)

    The noise is regenerated from (seed, frame index) at lookup, and the action is stored at the
    data's real action dimension and zero-padded back to max_action_dim (padded dims are zeros, as in
    the data SmolVLA is trained on). At chunk 50, 6-D actions, bfloat16: 600 bytes per pair instead of
    12,800 with float32 noise and action at 32 dims. Rows are written in place into a preallocated
    file, each process its own share: nothing gathers the pairs in memory.
    """

    FILE = "reflow_pairs.safetensors"

    def __init__(self, pairs_per_sample: int = 1, teacher_steps: int = 10, seed: int = 0, dtype: str = "bfloat16"):
        if pairs_per_sample < 1 or teacher_steps < 1:
            raise ValueError(
                f"pairs_per_sample and teacher_steps must be >= 1, got {pairs_per_sample}, {teacher_steps}"
            )
        if dtype not in DTYPES:
            raise ValueError(f"CachedCoupling.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.pairs_per_sample, self.teacher_steps, self.seed = pairs_per_sample, teacher_steps, seed
        self.storage = DTYPES[dtype]
        self.action = self.row = None
        self.chunk = self.max_action_dim = None

    def prepare(self, model, loader, preprocess, run_path: Path, fingerprint: dict) -> None:
        """Map the pair file if its fingerprint matches, else generate it (progress bar) atomically.

        `loader` yields this process's share of the training frames (all of them for one process);
        every process must call this, as they wait for each other.
        """
        path = Path(run_path) / self.FILE
        config = model.student.config
        self.chunk, self.max_action_dim = config.chunk_size, config.max_action_dim
        action_dim = config.action_feature.shape[0]
        key = self._fingerprint(fingerprint)
        why = _from_rank_0(_why_not_reusable(path, key) if distributed.is_main() else None)  # one decision
        if why is None:
            print(f"[Reflow] Reusing cached pairs {path}")
        else:
            print(f"[Reflow] Generating {self.pairs_per_sample} teacher pair(s) per frame into {path} ({why})")
            self._generate(model, loader, preprocess, path, key, action_dim)
        self.row, self.action = _open(path)

    def pairs(self, model, batch: dict, shared) -> tuple[Tensor, Tensor]:
        """(noise, teacher action), each (B, chunk, max_action_dim) float32 on the batch's device."""
        if self.action is None:
            raise RuntimeError("CachedCoupling.prepare() must run before training")
        frames = [int(i) for i in batch["index"]]
        rows = torch.tensor([self.row[i] for i in frames])
        k = distributed.rank_rows(lambda n: torch.randint(self.pairs_per_sample, (n,)), len(rows))
        noise = torch.stack([self._frame_noise(i)[j] for i, j in zip(frames, k.tolist())])
        stored = self.action[rows, k]  # (B, chunk, action_dim), storage dtype
        if not stored.isfinite().all():
            raise ValueError(f"the pair file holds NaN/inf actions for frames {frames}; delete it to regenerate")
        action = torch.zeros_like(noise)
        action[..., : stored.shape[-1]] = stored.float()
        device = batch["action"].device
        return noise.to(device, non_blocking=True), action.to(device, non_blocking=True)

    @torch.no_grad()
    def _generate(self, model, loader, preprocess, path: Path, key: str, action_dim: int) -> None:
        """Every process writes the pairs of its frames into its own rows of one preallocated file,
        which rank 0 then publishes (renames into place)."""
        rank = distributed.rank_and_world()[0]
        offset, total = _shard_rows(len(loader.dataset))
        tmp = path.with_name(f".{path.name}.tmp-build")
        shapes = {
            "index": ((total,), torch.int64),
            "action": ((total, self.pairs_per_sample, self.chunk, action_dim), self.storage),
        }
        metadata = {"fingerprint": key, "max_action_dim": str(self.max_action_dim)}
        space = ("the pair file", "free some space or use reflow.coupling = @OnlineCoupling()")
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            RowWriter(tmp, shapes, metadata, True, *space).close()  # header, size checked and reserved
        distributed.barrier()
        writer, row = RowWriter(tmp, shapes, metadata, False), offset
        for raw in tqdm(loader, desc="teacher pairs", unit="batch", disable=not distributed.is_main()):
            batch = preprocess(raw)
            shared = model.encode(batch)
            z = torch.stack([self._frame_noise(int(i)) for i in raw["index"]])  # (B, K, chunk, max_action_dim)
            x = torch.stack(
                [
                    model.teacher_actions(batch, z[:, k].to(batch["action"].device), self.teacher_steps, shared).cpu()
                    for k in range(self.pairs_per_sample)
                ],
                dim=1,
            )[..., :action_dim]
            if not x.isfinite().all():
                raise ValueError("the teacher produced NaN/inf actions; its weights or the data are broken")
            writer.write("index", row, raw["index"].to(torch.int64))
            writer.write("action", row, x.to(self.storage))
            row += len(raw["index"])
        writer.close()
        distributed.barrier()  # every share is written
        if rank == 0:
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        distributed.barrier()  # the file is published

    def _frame_noise(self, index: int) -> Tensor:
        """The K noise draws of one frame, (K, chunk, max_action_dim): a function of (seed, frame index) only."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.pairs_per_sample, self.chunk, self.max_action_dim, generator=generator)

    def _fingerprint(self, fingerprint: dict) -> str:
        settings = {
            "pairs_per_sample": self.pairs_per_sample,
            "teacher_steps": self.teacher_steps,
            "seed": self.seed,
            "storage": str(self.storage),
            "layout": "v2: action at action_dim, noise from (seed, index)",
        }
        return hashlib.sha256(json.dumps({**fingerprint, **settings}, sort_keys=True).encode()).hexdigest()


def _from_rank_0(value):
    """Rank 0's `value` in every process (each checks a different random sample of rows otherwise)."""
    if distributed.rank_and_world()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _shard_rows(frames: int) -> tuple[int, int]:
    """(first row of this process's share, total rows): the shares lie in rank order."""
    rank, world = distributed.rank_and_world()
    if world == 1:
        return 0, frames
    counts = [None] * world
    torch.distributed.all_gather_object(counts, frames)
    return sum(counts[:rank]), sum(counts)


def _why_not_reusable(path: Path, key: str) -> str | None:
    """Why the pair file must be (re)generated: missing, damaged, another fingerprint, NaN/inf in a
    sample of its rows; None when it can be reused."""
    if not path.is_file():
        return "no pair file yet"
    problem = file_problem(path)  # truncated or empty: safetensors' own error names no file
    if problem is not None:
        return f"the pair file is damaged: {problem}"
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != key:
                return "the teacher, the data or the settings changed"
            action = f.get_tensor("action")  # mapped, not read
    except (SafetensorError, OSError) as e:
        return f"the pair file is unreadable: {e}"
    if not action[sample_rows(len(action))].isfinite().all():
        return "the pair file holds NaN/inf values"
    return None


def _open(path: Path) -> tuple[dict[int, int], Tensor]:
    """(dataset index -> row, actions (N, K, chunk, action_dim) mapped from the file)."""
    with safe_open(str(path), framework="pt") as f:
        index, action = f.get_tensor("index"), f.get_tensor("action")
    return rows_by_index(index.tolist(), str(path)), action
