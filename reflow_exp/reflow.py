"""Reflow: a frozen teacher head and a trainable student head on one frozen backbone.

2-rectified flow (Liu et al. 2022): draw noise z, let the teacher integrate it to an action x, and
train the student's velocity at x_t = t·z + (1−t)·x towards the straight line's z − x (t=1 noise,
t=0 action). Pairs live in the padded, normalised action space the heads see:
(B, chunk, max_action_dim).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from reflow_exp import distributed, flow, prefix
from reflow_exp.backbone import Backbone
from reflow_exp.heads import ActionHead
from reflow_exp.policy import Policy


class Reflow(nn.Module):
    """The trainer's model for reflow. Only the student head has trainable parameters.

    Args:
        coupling: where (z, x) pairs come from (`reflow_exp.coupling`).
        time_sampler: (batch, device) -> t (B,), e.g. `flow.u_shaped_time`.
        huber: pseudo-Huber instead of squared error (c from the number of valid action values).
        shared_prefix: one VLM prefix pass per batch for both heads (False: LeRobot's own
            per-head passes, kept as the reference path).
        image_cache: an `embedding_cache.ImageEmbeddingCache`: the shared prefix takes each frame's
            image embeddings from it instead of running the vision encoder (None, or a cache that
            is off: the encoder runs).
        teacher_reference: what names the frozen part (backbone + teacher head) on disk, e.g.
            ``{"teacher_sha256": <model.safetensors digest>}``; with it the trainer's
            intermediate checkpoints hold only the student's training state (`frozen_reference`).
    """

    def __init__(
        self,
        backbone: Backbone,
        teacher: ActionHead,
        student: ActionHead,
        coupling,
        time_sampler: Callable[..., Tensor] = flow.u_shaped_time,
        huber: bool = False,
        shared_prefix: bool = True,
        preprocessor=None,
        postprocessor=None,
        image_cache=None,
        teacher_reference: dict | None = None,
    ):
        super().__init__()
        self.backbone, self.teacher, self.student = backbone, teacher, student
        self.teacher.requires_grad_(False)
        self.coupling = coupling
        self.time_sampler = time_sampler
        self.huber = huber
        self.shared_prefix = shared_prefix
        self.preprocessor, self.postprocessor = preprocessor, postprocessor
        self.image_cache = image_cache
        self.teacher_reference = teacher_reference
        self.action_dim = student.config.action_feature.shape[0]

    def train(self, mode: bool = True) -> Reflow:
        super().train(mode)
        self.teacher.eval()  # frozen, always in inference mode
        return self

    def student_policy(self) -> Policy:
        return Policy(self.backbone, self.student, self.preprocessor, self.postprocessor)

    def teacher_policy(self) -> Policy:
        return Policy(self.backbone, self.teacher, self.preprocessor, self.postprocessor)

    def frozen_reference(self) -> dict | None:
        """The trainer's fingerprint of everything it does not checkpoint (None: save in full)."""
        return self.teacher_reference

    def save_pretrained(self, path) -> None:
        """The student as an ordinary LeRobot SmolVLA folder (its num_steps is the distilled count)."""
        self.student_policy().save_pretrained(path)

    # ------------------------------------------------------------------ the two heads
    def encode(self, batch: dict) -> prefix.Prefix | None:
        """The shared image+language prefix, or None on the plain path."""
        if not self.shared_prefix:
            return None
        images = self.image_cache.lookup(batch) if self.image_cache is not None else None
        return prefix.encode(self.teacher, batch, images)

    @torch.no_grad()
    def teacher_actions(self, batch: dict, noise: Tensor, steps: int, shared: prefix.Prefix | None) -> Tensor:
        """Teacher's ODE from noise (t=1) to actions (t=0), (B, chunk, max_action_dim)."""
        if shared is not None:
            return prefix.sample(self.teacher, prefix.extend(self.teacher, shared, batch), noise, steps)[0]
        with self.teacher.num_steps(steps):
            return self.teacher.lerobot.model.sample_actions(*lerobot_inputs(self.teacher, batch), noise=noise)

    def student_squared_error(
        self, batch: dict, noise: Tensor, action: Tensor, t: Tensor, shared: prefix.Prefix | None
    ) -> Tensor:
        """(v − u)² (B, chunk, max_action_dim) of the student's velocity v at x_t against u = z − x."""
        if shared is None:  # LeRobot's joint forward returns exactly this
            return self.student.lerobot.model.forward(*lerobot_inputs(self.student, batch), action, noise, t)
        v = prefix.velocity(
            self.student, prefix.extend(self.student, shared, batch), flow.interpolate(action, noise, t), t
        )
        return (v - flow.target_velocity(action, noise)) ** 2

    # ------------------------------------------------------------------ the objective
    def valid_mask(self, like: Tensor) -> Tensor:
        """1 on the real action dims of every chunk step, (B, chunk, max_action_dim).

        The dataset's `action_is_pad` is not applied: it marks steps past the episode's end, where
        the *dataset* has no action, but the teacher's chunk exists at every step, so every step of
        a pair is real supervision.
        """
        mask = torch.zeros_like(like)
        mask[:, :, : self.action_dim] = 1
        return mask

    def loss(self, batch: dict) -> tuple[Tensor, dict[str, float]]:
        """Velocity MSE (or pseudo-Huber) against z − x; metrics: the loss binned by t."""
        shared = self.encode(batch)
        noise, action = self.coupling.pairs(self, batch, shared)
        t = distributed.rank_rows(lambda n: self.time_sampler(n, device=noise.device), noise.shape[0])
        squared = self.student_squared_error(batch, noise, action, t, shared)
        mask = self.valid_mask(squared)
        # c from d = the supervised values: every chunk step's real action dims
        huber_c = flow.huber_c_for(self.action_dim * squared.shape[1]) if self.huber else None
        per_sample = flow.velocity_error(squared, mask, huber_c)
        loss = per_sample.mean()
        binned = flow.binned_means(per_sample.detach(), t)
        return loss, {f"loss_{k}": v for k, v in binned.items()}


def lerobot_inputs(head: ActionHead, batch: dict) -> tuple:
    """LeRobot's model inputs from a preprocessed batch: images, masks, tokens, token mask, state."""
    images, img_masks = head.lerobot.prepare_images(batch)
    return (
        images,
        img_masks,
        batch["observation.language.tokens"],
        batch["observation.language.attention_mask"],
        head.lerobot.prepare_state(batch),
    )
