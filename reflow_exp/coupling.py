"""Couplings: where reflow's (noise z, teacher action x) pairs come from.

Both give pairs in the padded, normalised action space the heads see, (B, chunk, max_action_dim);
x is the teacher's Euler solution from z (t=1) to t=0 with `teacher_steps` steps.
- `OnlineCoupling`: fresh noise and a teacher ODE every batch (unlimited pairs, teacher cost per step).
- `CachedCoupling`: K pairs per training frame generated once into a safetensors file in the run
  folder and reused every epoch; regenerated when the teacher, the data or the settings change,
  and when the file is damaged (truncated, unreadable) or holds NaN/inf values.
  With several processes each makes the pairs of its own shard of the frames, rank 0 merges the
  parts into the one file, and every process loads it. A frame's noise depends only on (seed,
  frame index), so the file is the same whatever the number of processes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from reflow_exp import distributed
from reflow_exp.checkpoint import file_problem
from reflow_exp.data import rows_by_index
from reflow_exp.files import atomic_path


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
    """K = `pairs_per_sample` pairs per dataset frame, looked up by the frame's `index`."""

    FILE = "reflow_pairs.safetensors"

    def __init__(self, pairs_per_sample: int = 1, teacher_steps: int = 10, seed: int = 0):
        if pairs_per_sample < 1 or teacher_steps < 1:
            raise ValueError(
                f"pairs_per_sample and teacher_steps must be >= 1, got {pairs_per_sample}, {teacher_steps}"
            )
        self.pairs_per_sample, self.teacher_steps, self.seed = pairs_per_sample, teacher_steps, seed
        self.noise = self.action = self.row = None

    def prepare(self, model, loader, preprocess, run_path: Path, fingerprint: dict) -> None:
        """Load the pair file if its fingerprint matches, else generate it (progress bar) atomically.

        `loader` yields this process's share of the training frames (all of them for one process);
        every process must call this, as they wait for each other.
        """
        path = Path(run_path) / self.FILE
        key = self._fingerprint(fingerprint)
        rank, world = distributed.rank_and_world()
        tensors, why = _load_cached(path, key)  # nobody writes the file before the barriers below
        if tensors is not None:
            print(f"[Reflow] Reusing cached pairs {path}")
        else:
            print(f"[Reflow] Generating {self.pairs_per_sample} teacher pair(s) per frame into {path} ({why})")
            tensors = self._generate(model, loader, preprocess)  # this process's share of the frames
            if not (tensors["action"].isfinite().all() and tensors["noise"].isfinite().all()):
                raise ValueError("the teacher produced NaN/inf actions; its weights or the data are broken")
            if world == 1:
                _save_durably(tensors, path, key)
            else:
                _save_durably(tensors, _part_path(path, rank), key)
                distributed.barrier()  # every part is written
                if rank == 0:
                    parts = [load_file(str(_part_path(path, r))) for r in range(world)]
                    _save_durably({name: torch.cat([p[name] for p in parts]) for name in parts[0]}, path, key)
                    for r in range(world):
                        _part_path(path, r).unlink()
                tensors = None
        distributed.barrier()  # the file is complete
        if tensors is None:
            tensors = load_file(str(path))
        self.noise, self.action = tensors["noise"], tensors["action"]  # (N, K, chunk, D)
        # dataset index -> row of the file
        self.row = rows_by_index(tensors["index"].tolist(), str(path))

    def pairs(self, model, batch: dict, shared) -> tuple[Tensor, Tensor]:
        if self.noise is None:
            raise RuntimeError("CachedCoupling.prepare() must run before training")
        rows = torch.tensor([self.row[int(i)] for i in batch["index"]])
        k = distributed.rank_rows(lambda n: torch.randint(self.pairs_per_sample, (n,)), len(rows))
        device = batch["action"].device
        return self.noise[rows, k].to(device), self.action[rows, k].to(device)

    @torch.no_grad()
    def _generate(self, model, loader, preprocess) -> dict[str, Tensor]:
        chunk, dim = model.student.config.chunk_size, model.student.config.max_action_dim
        index, noise, action = [], [], []
        for raw in tqdm(loader, desc="teacher pairs", unit="batch", disable=not distributed.is_main()):
            batch = preprocess(raw)
            shared = model.encode(batch)
            z = torch.stack([self._frame_noise(int(i), chunk, dim) for i in raw["index"]])  # (B, K, chunk, D)
            x = torch.stack(
                [
                    model.teacher_actions(batch, z[:, k].to(batch["action"].device), self.teacher_steps, shared).cpu()
                    for k in range(self.pairs_per_sample)
                ],
                dim=1,
            )
            index.append(raw["index"])
            noise.append(z)
            action.append(x)
        return {"index": torch.cat(index), "noise": torch.cat(noise), "action": torch.cat(action)}

    def _frame_noise(self, index: int, chunk: int, dim: int) -> Tensor:
        """The K noise draws of one frame: a function of (seed, frame index) only."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.pairs_per_sample, chunk, dim, generator=generator)

    def _fingerprint(self, fingerprint: dict) -> str:
        settings = {"pairs_per_sample": self.pairs_per_sample, "teacher_steps": self.teacher_steps, "seed": self.seed}
        return hashlib.sha256(json.dumps({**fingerprint, **settings}, sort_keys=True).encode()).hexdigest()


def _part_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.part{rank}{path.suffix}")


def _load_cached(path: Path, key: str) -> tuple[dict[str, Tensor] | None, str]:
    """The pair file's tensors if it is whole, made for ``key`` and finite; else (None, why not)."""
    if not path.is_file():
        return None, "no pair file yet"
    problem = file_problem(path)  # truncated or empty: safetensors' own error names no file
    if problem is not None:
        return None, f"the pair file is damaged: {problem}"
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != key:
                return None, "the teacher, the data or the settings changed"
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        return None, f"the pair file is unreadable: {e}"
    if not all(tensors[k].isfinite().all() for k in ("noise", "action")):
        return None, "the pair file holds NaN/inf values"
    return tensors, ""


def _save_durably(tensors: dict[str, Tensor], path: Path, key: str) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"fingerprint": key})
