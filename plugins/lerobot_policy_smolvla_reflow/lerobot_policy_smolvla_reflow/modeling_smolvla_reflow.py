"""SmolVLAReflowPolicy: reflow_exp's `Reflow` model (frozen backbone, frozen teacher head, trainable
student head) as a LeRobot policy, so `lerobot-train` trains it and `lerobot-eval` rolls out its student.

Nothing of reflow is written here: the objective (`Reflow.loss`), the coupling (`OnlineCoupling`),
the time samplers (`reflow_exp.flow`), the shared prefix (`reflow_exp.prefix`), the teacher loading and
the student copy (`reflow_exp.jobs.reflow_job`) are reflow_exp's own.

Two ways to build one:
- new (`lerobot-train` without a checkpoint): the teacher is loaded from `teacher_model_path` (the VLM
  read once) and the student head is copied from it;
- from a checkpoint (`lerobot-train --resume=true`, `lerobot-eval --policy.path=...`): backbone, teacher
  head and student head are all read from the checkpoint's model.safetensors, once; the teacher folder
  is not needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.pretrained import PreTrainedPolicy
from torch import Tensor

from reflow_exp.backbone import Backbone
from reflow_exp.coupling import OnlineCoupling
from reflow_exp.heads import ActionHead
from reflow_exp.jobs.reflow_job import load_teacher_and_student, report_params
from reflow_exp.policy import Policy, load_weights
from reflow_exp.reflow import Reflow

from .configuration_smolvla_reflow import SmolVLAReflowConfig

# Where the parts live in this policy's state dict (and so in its model.safetensors).
VLM_KEYS = "reflow.backbone.vlm."
TEACHER_KEYS = "reflow.teacher.lerobot."
STUDENT_KEYS = "reflow.student.lerobot."


class SmolVLAReflowPolicy(PreTrainedPolicy):
    """Training: `forward` is reflow_exp's reflow loss. Inference: the student, through LeRobot's own
    SmolVLA `select_action` (its action queue) with `config.num_steps` steps."""

    config_class = SmolVLAReflowConfig
    name = "smolvla_reflow"

    def __init__(self, config: SmolVLAReflowConfig, state_dict: dict[str, Tensor] | None = None, **kwargs):
        """`state_dict`: this policy's own weights (from a checkpoint); None loads the teacher.
        LeRobot's other keyword arguments (dataset_stats, dataset_meta) are not needed: the
        normalisation is the teacher's (processor_smolvla_reflow)."""
        super().__init__(config)
        if state_dict is None:
            self.reflow = _from_teacher(config)
        else:
            self.reflow = _from_state_dict(config, state_dict)
        report_params(self.reflow)

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path, *, config: PreTrainedConfig | None = None, **kwargs):
        """A checkpoint folder of this policy: every weight read once from its model.safetensors
        (LeRobot's default would build the policy from the teacher first, then overwrite it)."""
        folder = Path(pretrained_name_or_path)
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder} holds no model.safetensors; pass a local checkpoint folder of smolvla_reflow, e.g. "
                "outputs/reflow/checkpoints/last/pretrained_model"
            )
        config = config or PreTrainedConfig.from_pretrained(folder)
        policy = cls(config, state_dict=load_weights(folder / "model.safetensors"))
        policy.to(config.device)
        return policy.eval()

    # -- training
    def get_optim_params(self):
        """Only the student head trains."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, batch: dict[str, Tensor], reduction: str = "mean") -> tuple[Tensor, dict]:
        """reflow_exp's loss on a batch preprocessed by the teacher's processors; metrics: the loss
        binned by t."""
        if reduction != "mean":
            raise ValueError(f"smolvla_reflow computes the batch mean only, got reduction={reduction!r}")
        return self.reflow.loss(batch)

    # -- inference: the student
    @property
    def student(self):
        """The student as LeRobot's own SmolVLAPolicy (its VLM borrowed from the shared backbone)."""
        return self.reflow.student.lerobot

    def reset(self):
        self.student.reset()

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        return self.student.select_action(batch, **kwargs)

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        return self.student.predict_action_chunk(batch, **kwargs)

    def student_policy(self, preprocessor=None, postprocessor=None) -> Policy:
        """The student (backbone + student head) as reflow_exp's Policy, which exports a plain SmolVLA folder."""
        return Policy(self.reflow.backbone, self.reflow.student, preprocessor, postprocessor)


def _reflow(config: SmolVLAReflowConfig, backbone: Backbone, teacher: ActionHead, student: ActionHead) -> Reflow:
    return Reflow(
        backbone,
        teacher,
        student,
        OnlineCoupling(config.teacher_steps),
        config.sampler,
        config.huber,
        config.shared_prefix,
    )


def _from_teacher(config: SmolVLAReflowConfig) -> Reflow:
    """reflow_exp's start-up: the teacher loaded (VLM once), the student copied from it."""
    teacher, student = load_teacher_and_student(
        config.teacher_model_path,
        config.teacher_folder(),
        config.device,
        config.num_steps,
        config.freeze_vision_encoder,
    )
    return _reflow(config, teacher.backbone, teacher.head, student)


def _from_state_dict(config: SmolVLAReflowConfig, state: dict[str, Tensor]) -> Reflow:
    """Backbone, teacher and student heads from this policy's own state dict (one VLM load)."""
    parts = {prefix: {} for prefix in (VLM_KEYS, TEACHER_KEYS, STUDENT_KEYS)}
    for key, value in state.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"unexpected weight {key!r} in a smolvla_reflow checkpoint")
        parts[prefix][key.removeprefix(prefix)] = value
    backbone = Backbone.from_state_dict(
        config.vlm_model_name, config.num_vlm_layers, parts[VLM_KEYS], "the smolvla_reflow checkpoint"
    ).to(config.device)
    teacher = ActionHead(config.head_config(config.teacher_steps), backbone, parts[TEACHER_KEYS])
    student = ActionHead(config.head_config(config.num_steps), backbone, parts[STUDENT_KEYS])
    teacher.requires_grad_(False)
    return _reflow(config, backbone, teacher, student)
