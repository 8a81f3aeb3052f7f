"""One reflow training step: teacher ODE (10 Euler steps) + student forward/backward/AdamW update.

- ours: `Reflow(shared_prefix=True).loss(batch)`: one no-grad prefix pass over images + language,
  shared by the teacher's ODE and the student's velocity; only the student's state token goes
  through the VLM with gradients.
- naive: LeRobot's `SmolVLAPolicy` objects composed as a user would: `teacher.predict_action_chunk`
  (its own prefix pass, then 10 steps), then `student.forward` on the teacher's actions (LeRobot's
  joint prefix+suffix forward; the backward runs through the whole VLM prefix because the trainable
  `state_proj` feeds the state token into it).

Both sides train the same parameters (the student's expert and projections) from the same weights
with the same optimizer; the naive objects alias our frozen VLM tensors to save RAM.

A third, what-if side, `ours_cached_vision`, is ours with the image embeddings (SigLIP encoder +
connector output) computed once beforehand: what caching the frozen encoder's output per dataset
frame would give. Reported as `step_ratio_cached_vision`; it is not a training path of reflow_exp.
"""

from __future__ import annotations

from pathlib import Path

from reflow_exp.bench import common

TARGETS = {"step_ratio": ("<=", 0.6)}


def run(size: str, repeats: int, cache: Path, batch: int | None = None, teacher_steps: int = 10,
        device: str = "cpu", amp=None, budget_s: float | None = None, warmup: int = 1) -> dict:
    """Time `repeats` alternating steps of each side after `warmup` untimed ones (allocator, optimizer
    state, first-call overheads); no new repeat starts after `budget_s`."""
    import torch

    from reflow_exp.bench.models import get_size, make_batch
    from reflow_exp.coupling import OnlineCoupling
    from reflow_exp.reflow import Reflow

    spec = get_size(size)
    batch = batch or spec.train_batch
    machine = common.machine_info()
    teacher, student, naive_teacher, naive_student = load_sides(spec, cache, device)
    ours = Reflow(teacher.backbone, teacher.head, student, OnlineCoupling(teacher_steps), shared_prefix=True)
    ours.train()
    data = make_batch(teacher.config, spec, batch, device=device)
    steps = {"ours": _ours_step(ours, data, amp),
             "naive": _naive_step(naive_teacher, naive_student, data, teacher_steps, amp)}
    steps["ours_cached_vision"] = _with_cached_vision(steps["ours"], teacher.head, data)
    sync = torch.cuda.synchronize if device != "cpu" else None
    for _ in range(warmup):
        common.alternate(steps, 1, sync)
    times, cpu = common.alternate(steps, repeats, sync, budget_s)
    med = {side: common.median(t) for side, t in times.items()}
    med_cpu = {side: common.median(t) for side, t in cpu.items()}
    result = {
        "bench": "train_step", "size": size, "device": device, "amp": str(amp), "batch": batch,
        "teacher_steps": teacher_steps, "repeats": len(times["ours"]), "warmup": warmup,
        "step_ratio": common.ratio(med["ours"], med["naive"]),
        "step_ratio_paired": common.paired_ratio(times["ours"], times["naive"]),
        "step_ratio_cpu": common.ratio(med_cpu["ours"], med_cpu["naive"]),
        "step_ratio_cached_vision": common.ratio(med["ours_cached_vision"], med["naive"]),
        "ours_s": med["ours"], "naive_s": med["naive"], "times": times, "cpu_times": cpu,
        "machine": machine | {"load_average_end": common.load_average()}, "command": common.command_line(),
    }
    result["met"] = common.check(TARGETS, result)
    rows = [["step, wall (s)", med["ours"], med["naive"], result["step_ratio"]],
            ["step, CPU time (s)", med_cpu["ours"], med_cpu["naive"], result["step_ratio_cpu"]],
            ["median of paired ratios", "", "", result["step_ratio_paired"]],
            ["what-if: ours, image embeddings cached (wall)", med["ours_cached_vision"], "",
             result["step_ratio_cached_vision"]]]
    title = f"train_step ({size}, batch {batch}, {teacher_steps} teacher steps, {device}, median of {result['repeats']})"
    common.print_table(title, ["", "ours", "naive", "ours/naive"], rows, TARGETS, result["met"])
    return result


def load_sides(spec, cache: Path, device: str):
    """Our teacher policy and student head on one backbone, and LeRobot's two policies on the same
    weights (same trainable parameter count, checked)."""
    from reflow_exp.bench.models import lerobot_policy, load_ours, trainable_count

    teacher, student = load_ours(spec, cache, device)
    head_state = teacher.head.lerobot.state_dict()
    naive_teacher = lerobot_policy(teacher.config, teacher.backbone, head_state, trainable=False)
    naive_student = lerobot_policy(student.config, teacher.backbone, head_state, trainable=True)
    if trainable_count(student) != trainable_count(naive_student):
        raise RuntimeError(
            f"sides train different parameters: {trainable_count(student)} vs {trainable_count(naive_student)}")
    return teacher, student, naive_teacher, naive_student


def _ours_step(model, batch: dict, amp):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with _autocast(batch, amp):
            loss, _ = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _naive_step(teacher, student, batch: dict, teacher_steps: int, amp):
    import torch

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    teacher.config.num_steps = teacher_steps
    student.train()
    chunk, dim = student.config.chunk_size, student.config.max_action_dim

    def step():
        noise = torch.randn(batch["action"].shape[0], chunk, dim, device=batch["action"].device)
        with _autocast(batch, amp):
            actions = teacher.predict_action_chunk(dict(batch), noise=noise)  # no_grad inside
            loss, _ = student.forward({**batch, "action": actions.float()}, noise=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _with_cached_vision(step, head, batch: dict):
    """`step` with the head's image encoder replaced by its output on `batch`, computed here once
    (`prefix.encode` reaches the encoder through this head's `vlm_with_expert.embed_image`)."""
    import torch

    from reflow_exp.bench.models import image_embeddings

    vlm_with_expert = head.lerobot.model.vlm_with_expert
    with torch.no_grad():
        cached = image_embeddings(head, batch)

    def cached_step():
        queue = list(cached)
        vlm_with_expert.embed_image = lambda image: queue.pop(0)  # an instance attribute shadows the method
        try:
            step()
        finally:
            del vlm_with_expert.embed_image

    return cached_step


def _autocast(batch: dict, amp):
    """bf16 autocast on the batch's device when `amp` is a dtype, else nothing."""
    import contextlib

    import torch

    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=batch["action"].device.type, dtype=amp)
