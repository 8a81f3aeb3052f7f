"""One reflow training step: teacher ODE (10 Euler steps) + student forward/backward/AdamW update.

Sides, timed alternating in one invocation (all train the same parameters from the same weights
with the same optimizer):
- `ours`, the product: `Reflow(shared_prefix=True, image_cache=...)`: one no-grad prefix pass over
  images + language shared by the teacher's ODE and the student's velocity, the image embeddings
  read from an `ImageEmbeddingCache` file (built here, memory-mapped) instead of the vision encoder;
  only the student's state token goes through the VLM with gradients.
- `naive`: LeRobot's `SmolVLAPolicy` objects as is: `teacher.predict_action_chunk` (its own prefix
  pass, then 10 steps), then `student.forward` on the teacher's actions (LeRobot's joint
  prefix+suffix forward; the backward runs through the whole VLM prefix because the trainable
  `state_proj` feeds the state token into it). The naive objects alias our frozen VLM tensors.
- `naive_same_cache`: the naive side with the same cache: both policies' `embed_image` return the
  frame's cached embeddings (LeRobot's code otherwise): what sharing the prefix buys apart from caching.
- `ours_no_cache`: ours with the vision encoder run every step (shared prefix alone).
- `ours_cached_pairs`: ours with `CachedCoupling` (teacher pairs precomputed, K=1): the step runs no
  teacher ODE. `pair_generation` times making one batch of pairs (cached prefix + 10-step ODE); over
  `pair_epochs` epochs each pair is reused that many times, so a step's amortised share is
  `pair_generation / pair_epochs`.

Ratios: `step_ratio` = ours / naive (the product row), `step_ratio_same_cache` = ours /
naive_same_cache, `step_ratio_no_cache` = ours_no_cache / naive, `step_ratio_cached_pairs` =
(ours_cached_pairs + pair_generation / pair_epochs) / naive. The cache's file size per frame and its
build time per frame (over `CACHE_FRAMES` frames) are reported with them.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from reflow_exp.bench import common

TARGETS = {"step_ratio": ("<=", 0.5)}
PAIR_EPOCHS = 10  # epochs over which one generated pair per frame is reused (amortised pair cost)
CACHE_FRAMES = 4  # frames in the bench's embedding cache (build time per frame is measured over them)
SIDES = ("ours", "naive", "naive_same_cache", "ours_no_cache", "ours_cached_pairs", "pair_generation")


def run(
    size: str,
    repeats: int,
    cache: Path,
    batch: int | None = None,
    teacher_steps: int = 10,
    device: str = "cpu",
    amp=None,
    budget_s: float | None = None,
    warmup: int = 1,
    pair_epochs: int = PAIR_EPOCHS,
) -> dict:
    """Time `repeats` alternating steps of each side after `warmup` untimed ones (allocator, optimizer
    state, first-call overheads); no new repeat starts after `budget_s`."""
    import torch

    from reflow_exp.bench.models import get_size, make_batch

    spec = get_size(size)
    batch = batch or spec.train_batch
    machine = common.machine_info()
    teacher, student, naive_teacher, naive_student = load_sides(spec, cache, device)
    frames = make_batch(teacher.config, spec, max(batch, CACHE_FRAMES), device=device)
    frames["index"] = torch.arange(len(frames["action"]), device=device)
    data = {k: v[:batch] for k, v in frames.items()}
    sync = torch.cuda.synchronize if device != "cpu" else None
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as folder:
        models = _reflow_models(teacher, student, teacher_steps, frames, Path(folder))
        image_cache = models["ours"].image_cache
        steps = {
            "ours": _ours_step(models["ours"], data, amp),
            "naive": _naive_step(naive_teacher, naive_student, data, teacher_steps, amp),
        }
        steps["naive_same_cache"] = _with_cached_images(
            steps["naive"], [naive_teacher, naive_student], image_cache, data
        )
        _check_same_cache(naive_teacher, image_cache, data)
        steps["ours_no_cache"] = _ours_step(models["ours_no_cache"], data, amp)
        steps["ours_cached_pairs"] = _ours_step(models["ours_cached_pairs"], data, amp)
        steps["pair_generation"] = _pair_generation(models["ours"], data, teacher_steps, amp)
        for _ in range(warmup):
            common.alternate(steps, 1, sync)
        times, cpu = common.alternate(steps, repeats, sync, budget_s)
    med = {side: common.median(t) for side, t in times.items()}
    med_cpu = {side: common.median(t) for side, t in cpu.items()}
    amortised = med["ours_cached_pairs"] + med["pair_generation"] / pair_epochs
    amortised_cpu = med_cpu["ours_cached_pairs"] + med_cpu["pair_generation"] / pair_epochs
    result = {
        "bench": "train_step",
        "size": size,
        "device": device,
        "amp": str(amp),
        "batch": batch,
        "teacher_steps": teacher_steps,
        "repeats": len(times["ours"]),
        "warmup": warmup,
        "pair_epochs": pair_epochs,
        "step_ratio": common.ratio(med["ours"], med["naive"]),
        "step_ratio_same_cache": common.ratio(med["ours"], med["naive_same_cache"]),
        "step_ratio_no_cache": common.ratio(med["ours_no_cache"], med["naive"]),
        "step_ratio_cached_pairs": common.ratio(amortised, med["naive"]),
        "step_ratio_paired": common.paired_ratio(times["ours"], times["naive"]),
        "step_ratio_cpu": common.ratio(med_cpu["ours"], med_cpu["naive"]),
        # CPU time: robust to the machine's load with --threads 1 (no thread waits on another)
        "step_ratio_same_cache_cpu": common.ratio(med_cpu["ours"], med_cpu["naive_same_cache"]),
        "step_ratio_no_cache_cpu": common.ratio(med_cpu["ours_no_cache"], med_cpu["naive"]),
        "step_ratio_cached_pairs_cpu": common.ratio(amortised_cpu, med_cpu["naive"]),
        "ours_s": med["ours"],
        "naive_s": med["naive"],
        "cached_pairs_amortised_s": amortised,
        "median_s": med,
        "median_cpu_s": med_cpu,
        "cache_bytes_per_frame": image_cache.report["bytes_per_frame"],
        "cache_build_s_per_frame": image_cache.report["build_s_per_frame"],
        "cache_frames": len(frames["index"]),
        "times": times,
        "cpu_times": cpu,
        "machine": machine | {"load_average_end": common.load_average()},
        "command": common.command_line(),
    }
    result["met"] = common.check(TARGETS, result)
    _print(result)
    return result


def _print(result: dict) -> None:
    med, naive = result["median_s"], result["median_s"]["naive"]
    epochs = result["pair_epochs"]
    rows = [
        ["naive: LeRobot as is", naive, 1.0, ""],
        ["ours: shared prefix + image embedding cache", med["ours"], result["step_ratio"], "step_ratio"],
        [
            "naive with the same cache",
            med["naive_same_cache"],
            naive and med["naive_same_cache"] / naive,
            f"ours / this = {result['step_ratio_same_cache']:.3f} (step_ratio_same_cache)",
        ],
        [
            "ours without the cache (shared prefix alone)",
            med["ours_no_cache"],
            result["step_ratio_no_cache"],
            "step_ratio_no_cache",
        ],
        ["ours with cached teacher pairs (no ODE)", med["ours_cached_pairs"], med["ours_cached_pairs"] / naive, ""],
        [
            f"  + pair generation / {epochs} epochs",
            result["cached_pairs_amortised_s"],
            result["step_ratio_cached_pairs"],
            "step_ratio_cached_pairs",
        ],
        ["ours, CPU time", result["median_cpu_s"]["ours"], result["step_ratio_cpu"], "step_ratio_cpu"],
    ]
    title = (
        f"train_step ({result['size']}, batch {result['batch']}, {result['teacher_steps']} teacher steps, "
        f"{result['device']}, median of {result['repeats']})"
    )
    common.print_table(title, ["", "seconds", "/ naive", ""], rows, TARGETS, result["met"])
    print(
        f"  image embedding cache: {result['cache_bytes_per_frame'] / 1024:.1f} KiB per frame, built in "
        f"{result['cache_build_s_per_frame']:.3f} s per frame ({result['cache_frames']} frames)"
    )


def _reflow_models(teacher, student, teacher_steps: int, frames: dict, folder: Path) -> dict:
    """Our three variants on one backbone and one student head; the image cache and the teacher-pair
    file are built from `frames` (a preprocessed batch with an `index` column) into `folder`."""
    import torch

    from reflow_exp.coupling import CachedCoupling, OnlineCoupling
    from reflow_exp.embedding_cache import ImageEmbeddingCache
    from reflow_exp.reflow import Reflow

    per_frame = [{k: v[i] for k, v in frames.items()} for i in range(len(frames["index"]))]
    loader = torch.utils.data.DataLoader(per_frame, batch_size=len(per_frame))
    image_cache = ImageEmbeddingCache(folder=str(folder), required=True, dtype="float32")  # exact: _check_same_cache
    image_cache.prepare(teacher.head, loader, lambda b: b, folder, {"bench": "train_step"})
    pairs = CachedCoupling(pairs_per_sample=1, teacher_steps=teacher_steps)
    models = {
        "ours": Reflow(teacher.backbone, teacher.head, student, OnlineCoupling(teacher_steps), image_cache=image_cache),
        "ours_no_cache": Reflow(teacher.backbone, teacher.head, student, OnlineCoupling(teacher_steps)),
        "ours_cached_pairs": Reflow(teacher.backbone, teacher.head, student, pairs, image_cache=image_cache),
    }
    pairs.prepare(models["ours_cached_pairs"], loader, lambda b: b, folder, {"bench": "train_step"})
    for model in models.values():
        model.train()
    return models


def load_sides(spec, cache: Path, device: str):
    """Our teacher policy and student head on one backbone, and LeRobot's two policies on the same
    weights (same trainable parameter count, checked)."""
    from reflow_exp.bench.models import lerobot_policy, load_ours
    from reflow_exp.torch_utils import count_params

    teacher, student = load_ours(spec, cache, device)
    head_state = teacher.head.lerobot.state_dict()
    naive_teacher = lerobot_policy(teacher.config, teacher.backbone, head_state, trainable=False)
    naive_student = lerobot_policy(student.config, teacher.backbone, head_state, trainable=True)
    ours, theirs = count_params(student, trainable_only=True), count_params(naive_student, trainable_only=True)
    if ours != theirs:
        raise RuntimeError(f"sides train different parameters: {ours} vs {theirs}")
    return teacher, student, naive_teacher, naive_student


def _ours_step(model, batch: dict, amp):
    import torch

    from reflow_exp.torch_utils import autocast

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with autocast(batch["action"].device.type, amp):
            loss, _ = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _naive_step(teacher, student, batch: dict, teacher_steps: int, amp):
    import torch

    from reflow_exp.torch_utils import autocast

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    teacher.config.num_steps = teacher_steps
    student.train()
    chunk, dim = student.config.chunk_size, student.config.max_action_dim

    def step():
        noise = torch.randn(batch["action"].shape[0], chunk, dim, device=batch["action"].device)
        with autocast(batch["action"].device.type, amp):
            actions = teacher.predict_action_chunk(dict(batch), noise=noise)  # no_grad inside
            loss, _ = student.forward({**batch, "action": actions.float()}, noise=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _with_cached_images(step, policies, image_cache, batch: dict):
    """`step` with each LeRobot policy's image encoder replaced by a lookup in `image_cache` (read
    every step, as ours does): `embed_prefix` calls `embed_image` once per camera, in camera order."""
    import contextlib

    from reflow_exp.prefix import embed_image_replaced

    def cached_step():
        cameras = itertools.cycle(image_cache.lookup(batch).embeddings)
        with contextlib.ExitStack() as stack:
            for policy in policies:
                stack.enter_context(embed_image_replaced(policy.model.vlm_with_expert, lambda image: next(cameras)))
            step()

    return cached_step


def _check_same_cache(policy, image_cache, batch: dict) -> None:
    """LeRobot's chunk with the cached embeddings equals its chunk with the encoder (else the
    same-cache row would time something else)."""
    import torch

    noise = torch.randn(
        batch["action"].shape[0], policy.config.chunk_size, policy.config.max_action_dim, device=batch["action"].device
    )
    got = []
    expected = policy.predict_action_chunk(dict(batch), noise=noise)
    _with_cached_images(
        lambda: got.append(policy.predict_action_chunk(dict(batch), noise=noise)), [policy], image_cache, batch
    )()
    if not torch.allclose(got[0], expected, rtol=1e-4, atol=1e-4):
        raise RuntimeError("LeRobot's chunk from the cached image embeddings differs from its own")


def _pair_generation(model, batch: dict, teacher_steps: int, amp):
    """One batch of `CachedCoupling`'s work: the (cached) shared prefix and the teacher's ODE."""
    import torch

    from reflow_exp.torch_utils import autocast

    chunk, dim = model.student.config.chunk_size, model.student.config.max_action_dim

    @torch.no_grad()
    def generate():
        noise = torch.randn(batch["action"].shape[0], chunk, dim, device=batch["action"].device)
        with autocast(batch["action"].device.type, amp):
            model.teacher_actions(batch, noise, teacher_steps, model.encode(batch))

    return generate
