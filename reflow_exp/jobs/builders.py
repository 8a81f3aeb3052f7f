"""The policy pieces the jobs build: SmolVLA's config (gin: `smolvla_config.*`), the student head
copied from a teacher, and the parameter counts of summary.json."""

from __future__ import annotations

import dataclasses

from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

import gin
from reflow_exp.architectures import make_smolvla_config
from reflow_exp.heads import ActionHead
from reflow_exp.policy import Policy
from reflow_exp.torch_utils import count_params


@gin.configurable
def smolvla_config(
    vlm_model_name: str,
    features: dict,
    chunk_size: int = 50,
    n_action_steps: int | None = None,
    num_steps: int = 10,
    num_vlm_layers: int = 16,
    expert_width_multiplier: float = 0.75,
    resize_imgs_with_padding: tuple[int, int] = (512, 512),
    max_state_dim: int = 32,
    max_action_dim: int = 32,
    freeze_vision_encoder: bool = True,
    train_state_proj: bool = True,
    tokenizer_max_length: int = 48,
) -> SmolVLAConfig:
    """SmolVLA's configuration for `features` (LeRobot PolicyFeatures); defaults are SmolVLA's.

    `n_action_steps`: actions executed from each chunk before re-planning (None: the whole chunk).
    """
    return make_smolvla_config(
        vlm_model_name,
        features,
        chunk_size=chunk_size,
        n_action_steps=chunk_size if n_action_steps is None else n_action_steps,
        num_steps=num_steps,
        num_vlm_layers=num_vlm_layers,
        expert_width_multiplier=expert_width_multiplier,
        resize_imgs_with_padding=tuple(resize_imgs_with_padding),
        max_state_dim=max_state_dim,
        max_action_dim=max_action_dim,
        freeze_vision_encoder=freeze_vision_encoder,
        train_expert_only=True,  # the backbone is always frozen here
        train_state_proj=train_state_proj,
        tokenizer_max_length=tokenizer_max_length,
    )


def student_head(teacher: Policy, student_steps: int, freeze_vision_encoder: bool | None) -> ActionHead:
    """A copy of the teacher head on the same backbone, configured to sample with `student_steps`."""
    overrides = {"num_steps": student_steps}
    if freeze_vision_encoder is not None:
        overrides["freeze_vision_encoder"] = freeze_vision_encoder
    config = dataclasses.replace(teacher.config, **overrides)
    return ActionHead(config, teacher.backbone, teacher.head.lerobot.state_dict())


def param_summary(policy: Policy, head_key: str) -> dict[str, int]:
    """Counts for summary.json (DESIGN.md §5); `head_key` is "teacher_head" or "student_head"."""
    return {
        "total": count_params(policy),
        "trainable": count_params(policy, trainable_only=True),
        "backbone": count_params(policy.backbone),
        head_key: count_params(policy.head),
    }
