"""Offline quality metrics: how close few-step sampling gets to the teacher's 10-step solution.

On held-out frames and shared noise: the error of student@k and of teacher@k against teacher@N
(N = `reference_steps`), and the straightness of both heads' N-step paths (0 = a straight line).
Errors are mean squared differences over the real action dims of every chunk step (the teacher's
chunk exists past an episode's end too), in the normalised action space.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from reflow_exp import flow, prefix


@torch.no_grad()
def offline_metrics(model, batches, steps=(1, 2, 4), reference_steps: int = 10, seed: int = 0) -> dict:
    """`model` is a `Reflow`; `batches` preprocessed held-out batches. Returns
    {"teacher": {"1": {"error": e}, ...}, "student": {...}, "straightness": {"teacher": s, "student": s}}."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums, count = defaultdict(float), 0
    for batch in batches:
        shared = prefix.encode(model.teacher, batch)  # both heads sample from the shared prefix here
        heads = {"teacher": model.teacher, "student": model.student}
        prefixes = {name: prefix.extend(head, shared, batch) for name, head in heads.items()}
        b, chunk, dim = batch["action"].shape[0], model.student.config.chunk_size, model.student.config.max_action_dim
        noise = torch.randn(b, chunk, dim, generator=generator).to(batch["action"].device)
        reference, teacher_velocities = prefix.sample(model.teacher, prefixes["teacher"], noise, reference_steps)
        mask = model.valid_mask(reference)
        for name, head in heads.items():
            for k in steps:
                x, _ = prefix.sample(head, prefixes[name], noise, k)
                sums[(name, k)] += flow.velocity_error((x - reference) ** 2, mask).sum().item()
        student_end, student_velocities = prefix.sample(model.student, prefixes["student"], noise, reference_steps)
        sums["straight_teacher"] += flow.straightness(teacher_velocities, noise, reference).sum().item()
        sums["straight_student"] += flow.straightness(student_velocities, noise, student_end).sum().item()
        count += b
    model.train(was_training)
    if count == 0:
        raise ValueError("offline_metrics got no held-out batches; set reflow.holdout_episodes >= 1")
    return {
        **{name: {str(k): {"error": sums[(name, k)] / count} for k in steps} for name in ("teacher", "student")},
        "straightness": {"teacher": sums["straight_teacher"] / count, "student": sums["straight_student"] / count},
    }
