"""Disk and memory of a reflow run at scale, from the code paths that write them.

    python -m reflow_exp.bench footprint --size real --frames 1000000 --cameras 3 [--processes 8]

Each file kind is written for real, small, with the code a run uses, and its bytes are read back:
- the image embedding cache and the pair file through `RowWriter` (their writer) at the size's
  shapes, and through `ImageEmbeddingCache.prepare` / `CachedCoupling.prepare` on the tiny model (a
  check that the per-row formula holds for the files those paths write);
- a slim intermediate checkpoint and the full last one, by `Trainer.fit` on the tiny reflow model.
Sizes at N frames are projections: rows scale linearly, checkpoints with the trainable parameter
count of the size (real: SmolVLM2-500M on the meta device, nothing allocated).

`rank0_extra_ram_bytes`: the resident memory rank 0 adds while it creates the pair file for N frames
(its one step the other ranks skip); it must not grow with N. `build_share_per_rank`: the fraction
of the frames each rank embeds (the cache: rank 0 alone) and pairs (its shard).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from reflow_exp.bench.models import get_size, load_ours, make_batch, smolvla_config, teacher_checkpoint, vlm_folder

KEEP_LAST = 2  # gin/smolvla/reflow.gin: Trainer.keep_last_checkpoints (20,000 steps, a save every 2,000)
SAMPLE_FRAMES = 8
PAIRS_K = (1, 2, 4)
RAM_FRAMES = (10_000, 100_000, 1_000_000)


def run(size_name: str, frames: int, cameras: int, processes: int, cache: Path) -> dict:
    """The footprint report (see the module docstring); every byte count is an int."""
    size = get_size(size_name)
    config = smolvla_config(size, vlm_folder(size, cache))
    tokens, hidden = image_tokens_and_hidden(config.vlm_model_name)
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        work = Path(tmp)
        tiny = measure_tiny(work / "tiny", cache)
        cache_row = row_bytes(work / "cache", (tokens, hidden), torch.bfloat16)  # per frame and camera
        pair_rows = {
            k: row_bytes(work / f"pairs{k}", (k, size.chunk, size.action_dim), torch.bfloat16) for k in PAIRS_K
        }
        ram = {n: rank0_pair_file_ram(work / f"ram{n}", n, (1, size.chunk, size.action_dim)) for n in RAM_FRAMES}
    params = parameter_counts(size_name, config)
    checkpoint = project_checkpoint(tiny, params)
    full = project_full(tiny, params)
    cache_bytes = frames * cameras * cache_row
    report = {
        "size": size_name,
        "frames": frames,
        "cameras": cameras,
        "processes": processes,
        "image_tokens": tokens,
        "hidden": hidden,
        "cache_bytes_per_frame_camera": cache_row,
        "cache_bytes": cache_bytes,
        "pairs_bytes_per_frame": {str(k): v + 8 for k, v in pair_rows.items()},  # + the int64 index
        "pairs_bytes": {str(k): frames * (v + 8) for k, v in pair_rows.items()},
        "params": params,
        "checkpoint_bytes": checkpoint,
        "student_bytes": full,
        "full_smolvla_bytes": full,
        "checkpoint_vs_full_smolvla": checkpoint / full,
        "rank0_extra_ram_bytes": {str(n): v for n, v in ram.items()},
        "build_share_per_rank": build_shares(frames, processes),
        "tiny_measured": tiny,
    }
    report["run_disk_bytes"] = run_disk(cache_bytes, checkpoint, full)
    return report


# ----------------------------------------------------------------------------- shapes and counts
def image_tokens_and_hidden(vlm: str) -> tuple[int, int]:
    """Image tokens per camera and frame, and the VLM's hidden width: SmolVLM's connector turns
    (image / patch)^2 patches into that many / scale_factor^2 tokens of the text width."""
    vlm_config = AutoConfig.from_pretrained(vlm)
    vision = vlm_config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches // vlm_config.scale_factor**2, vlm_config.text_config.hidden_size


def parameter_counts(size_name: str, config) -> dict[str, int]:
    """Total and trainable parameters of the reflow student policy, built on the meta device."""
    from reflow_exp.jobs.reflow_job import report_start_up

    with contextlib.redirect_stdout(io.StringIO()):
        counts = report_start_up(config)
    return {"total": counts["total"], "trainable": counts["trainable"]}


# ----------------------------------------------------------------------------- rows through RowWriter
def row_bytes(folder: Path, row_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes one row of `row_shape` takes in a file `RowWriter` writes: a file of SAMPLE_FRAMES rows,
    written row by row, its size on disk less the header, divided by the rows."""
    from reflow_exp.embedding_cache import RowWriter

    folder.mkdir(parents=True)
    path = folder / "rows.safetensors"
    writer = RowWriter(path, {"rows": ((SAMPLE_FRAMES, *row_shape), dtype)}, {"fingerprint": "footprint"})
    for row in range(SAMPLE_FRAMES):
        writer.write("rows", row, torch.randn(1, *row_shape).to(dtype))
    writer.close()
    return (path.stat().st_size - writer.base) // SAMPLE_FRAMES


def rank0_pair_file_ram(folder: Path, frames: int, row_shape: tuple[int, ...]) -> int:
    """Resident bytes rank 0 gains while creating the pair file for `frames` frames (header and
    sparse size: what `CachedCoupling._generate` does on rank 0 alone)."""
    from reflow_exp.embedding_cache import RowWriter

    folder.mkdir(parents=True)
    before = _rss()
    shapes = {"index": ((frames,), torch.int64), "action": ((frames, *row_shape), torch.bfloat16)}
    RowWriter(folder / "pairs.safetensors", shapes, {"fingerprint": "footprint"}).close()
    extra = max(0, _rss() - before)
    shutil.rmtree(folder)
    return extra


def _rss() -> int:
    """This process's resident set now, in bytes (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def build_shares(frames: int, processes: int) -> dict[str, list[float]]:
    """Fraction of the frames each rank processes: the cache is built by rank 0 (`main_first`), the
    pairs by every rank on its shard (`distributed.shard`: every N-th frame from its rank)."""
    return {
        "image_embedding_cache": [1.0] + [0.0] * (processes - 1),
        "pairs": [len(range(rank, frames, processes)) / frames for rank in range(processes)],
    }


# ----------------------------------------------------------------------------- the tiny run
def measure_tiny(folder: Path, cache: Path) -> dict:
    """Bytes of every kind of file as the run's own code writes it, on the tiny model: the image cache
    and pair files for SAMPLE_FRAMES frames, a slim checkpoint (step 1) and the full last one (step 2)."""
    from reflow_exp.coupling import CachedCoupling, OnlineCoupling
    from reflow_exp.embedding_cache import ImageEmbeddingCache
    from reflow_exp.files import file_digest
    from reflow_exp.reflow import Reflow

    size = get_size("tiny")
    teacher, student = load_ours(size, cache)
    batch = make_batch(teacher.config, size, SAMPLE_FRAMES) | {"index": torch.arange(SAMPLE_FRAMES)}
    samples = [{k: v[i] for k, v in batch.items()} for i in range(SAMPLE_FRAMES)]
    loader = torch.utils.data.DataLoader(samples, batch_size=4)
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        images = ImageEmbeddingCache(folder=str(folder / "cache"))
        images.prepare(teacher.head, loader, lambda b: b, folder, {"bench": "footprint"})
        out["cache_bytes_per_frame_camera"] = images.report["bytes_per_frame"]  # one camera at tiny
        for k in PAIRS_K:
            pairs = CachedCoupling(pairs_per_sample=k, teacher_steps=2)
            model = Reflow(teacher.backbone, teacher.head, student, pairs)
            pairs.prepare(model, loader, lambda b: b, folder / f"pairs{k}", {"bench": "footprint"})
            out[f"pairs_file_bytes_k{k}"] = (folder / f"pairs{k}" / CachedCoupling.FILE).stat().st_size
    reference = {"teacher_sha256": file_digest(teacher_checkpoint(size, cache) / "model.safetensors")}
    model = Reflow(teacher.backbone, teacher.head, student, OnlineCoupling(2), teacher_reference=reference)
    out |= _checkpoint_bytes(model, loader, folder / "run")
    out["trainable"] = sum(p.numel() for p in student.parameters() if p.requires_grad)
    out["total"] = sum(p.numel() for p in model.student_policy().parameters())
    return out


def _checkpoint_bytes(model, loader, run_path: Path) -> dict:
    """Train 2 steps saving each: step 1 is slim, step 2 (the last) full. Bytes per part."""
    from reflow_exp.rundir import RunDir
    from reflow_exp.tracking import Tracker
    from reflow_exp.trainer import Trainer

    trainer = Trainer(steps=2, save_every=1, warmup_steps=0, log_every=1)
    with (
        contextlib.redirect_stderr(io.StringIO()),
        RunDir(run_path, seed=0, tracker=Tracker(run_path, enabled=False)) as run,
    ):
        trainer.fit(model, loader, run)
    slim, last = run_path / "checkpoints" / "000001", run_path / "checkpoints" / "000002"
    scaling = ["trainable_params.safetensors", "optimizer_state.safetensors"]  # grow with the trainable count
    state = slim / "training_state"
    return {
        "slim_checkpoint_bytes": _folder_bytes(slim),
        "slim_scaling_bytes": sum((state / name).stat().st_size for name in scaling),
        "full_checkpoint_bytes": _folder_bytes(last),
        "pretrained_model_bytes": _folder_bytes(last / "pretrained_model"),
        "pretrained_weights_bytes": (last / "pretrained_model" / "model.safetensors").stat().st_size,
    }


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- projections
def project_checkpoint(tiny: dict, params: dict) -> int:
    """A slim save at `params`: its fixed files as measured, the parameter and AdamW state files
    scaled by the trainable count (float32 values: 4 bytes each, 3 per parameter)."""
    fixed = tiny["slim_checkpoint_bytes"] - tiny["slim_scaling_bytes"]
    per_param = tiny["slim_scaling_bytes"] / tiny["trainable"]
    return int(fixed + per_param * params["trainable"])


def project_full(tiny: dict, params: dict) -> int:
    """A LeRobot `pretrained_model/` at `params`: config and processors as measured, float32 weights."""
    fixed = tiny["pretrained_model_bytes"] - tiny["pretrained_weights_bytes"]
    per_param = tiny["pretrained_weights_bytes"] / tiny["total"]
    return int(fixed + per_param * params["total"])


def run_disk(cache_bytes: int, checkpoint: int, full: int) -> int:
    """The shipped config's run folder at its end (20,000 steps, a save every 2,000, the last 2 kept;
    online pairs): the image cache, the exported student, the full last checkpoint (pretrained_model
    and a training state) and one slim one. No earlier moment holds more: before the end there is no
    student and no full save, and a save in flight adds one slim save to the two kept."""
    last = full + checkpoint
    return cache_bytes + full + last + (KEEP_LAST - 1) * checkpoint
