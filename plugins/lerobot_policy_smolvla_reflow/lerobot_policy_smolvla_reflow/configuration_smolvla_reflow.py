"""`--policy.type=smolvla_reflow`: reflow_exp's reflow (2-rectified flow) inside `lerobot-train`.

The config is SmolVLA's, plus the reflow settings. A new config (one parsed from the command line)
takes its architecture, features and chunking from the teacher's config.json, because the student
starts as a copy of the teacher's weights and LeRobot builds the dataset's chunk indices from this
config before any policy exists. A config read back from a checkpoint already carries them.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

from reflow_exp import flow
from reflow_exp.policy import check_smolvla_folder, resolve_policy_folder

TIME_SAMPLERS = {
    "uniform": flow.uniform_time,
    "beta": flow.beta_time,
    "u_shaped": flow.u_shaped_time,
    "logit_normal": flow.logit_normal_time,
}

# Fields the student may set itself; every other SmolVLA field comes from the teacher.
OWN_FIELDS = {
    "num_steps",
    "freeze_vision_encoder",
    "load_vlm_weights",
    "train_expert_only",
    "device",
    "use_amp",
    "use_peft",
    "push_to_hub",
    "repo_id",
    "private",
    "tags",
    "license",
    "pretrained_path",
    "pretrained_revision",
    "compile_model",
    "compile_mode",
    "rtc_config",
}
OWN_FIELDS |= {f.name for f in dataclasses.fields(SmolVLAConfig) if f.name.startswith(("optimizer_", "scheduler_"))}


class SmolVLAReflowConfigError(Exception):
    """A bad smolvla_reflow setting. Not a ValueError: draccus, which parses LeRobot's command line,
    replaces a ValueError's message from a config by "Couldn't instantiate class ..."."""


_AUTOMATIC = {
    "load_vlm_weights": "the VLM weights are read once from the teacher checkpoint",
    "train_expert_only": "only the student head is trained; the backbone and the teacher head are frozen",
}


@PreTrainedConfig.register_subclass("smolvla_reflow")
@dataclass
class SmolVLAReflowConfig(SmolVLAConfig):
    """SmolVLA's config with reflow's settings (the gin names of `reflow_exp.jobs.reflow` in brackets).

    teacher_model_path: the teacher's LeRobot SmolVLA folder (…/pretrained_model) or a run folder of
        reflow_exp [reflow.teacher]. Required.
    num_steps: the student's sampling steps [reflow.student_steps]; the default is 1, not SmolVLA's 10.
    teacher_steps: Euler steps of the teacher's ODE that makes each pair [OnlineCoupling.teacher_steps].
    time_sampler: uniform | beta | u_shaped | logit_normal [reflow.time_sampler].
    huber: pseudo-Huber loss instead of squared error [reflow.huber].
    shared_prefix: one VLM prefix pass per batch for both heads [reflow.shared_prefix].
    use_reflow: accepted for the seed script's flag; false is refused (train with --policy.type=smolvla).
    load_vlm_weights, train_expert_only: automatic; passing either only warns.
    """

    # -- reflow
    teacher_model_path: str | None = None
    use_reflow: bool = True
    num_steps: int = 1
    teacher_steps: int = 10
    time_sampler: str = "u_shaped"
    huber: bool = False
    shared_prefix: bool = True

    # -- automatic (None: not given)
    load_vlm_weights: bool | None = None
    train_expert_only: bool | None = None

    # -- LeRobot: a student is not pushed to the hub unless asked
    push_to_hub: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._check_reflow_settings()
        for flag, value in (("load_vlm_weights", self.load_vlm_weights), ("train_expert_only", self.train_expert_only)):
            if value is not None:
                warnings.warn(
                    f"--policy.{flag}={value} is ignored: smolvla_reflow handles it automatically ({_AUTOMATIC[flag]})"
                )
                setattr(self, flag, None)
        if not self.input_features:  # a new config: take the teacher's architecture
            self._adopt_teacher()

    def _check_reflow_settings(self) -> None:
        if not self.use_reflow:
            raise SmolVLAReflowConfigError(
                "--policy.use_reflow=false: --policy.type=smolvla_reflow always runs reflow; "
                "to train a plain SmolVLA use --policy.type=smolvla"
            )
        if not self.teacher_model_path:
            raise SmolVLAReflowConfigError(
                "--policy.type=smolvla_reflow needs --policy.teacher_model_path=<the teacher's LeRobot SmolVLA "
                "folder, e.g. outputs/teacher/checkpoints/last/pretrained_model>"
            )
        if self.time_sampler not in TIME_SAMPLERS:
            raise SmolVLAReflowConfigError(
                f"--policy.time_sampler={self.time_sampler!r} is unknown; choose one of {sorted(TIME_SAMPLERS)}"
            )
        for name in ("num_steps", "teacher_steps"):
            if getattr(self, name) < 1:
                raise SmolVLAReflowConfigError(f"--policy.{name} must be >= 1, got {getattr(self, name)}")

    def _adopt_teacher(self) -> None:
        """Copy every SmolVLA field but OWN_FIELDS from the teacher's config.json (a file read, no weights).

        Refuses a teacher of another policy type with reflow_exp's own message.
        """
        folder = self.teacher_folder()
        try:
            check_smolvla_folder(folder)  # reflow_exp's own refusal of another policy type
        except ValueError as error:
            raise SmolVLAReflowConfigError(str(error)) from None
        teacher = PreTrainedConfig.from_pretrained(folder)
        for f in dataclasses.fields(SmolVLAConfig):
            if f.name not in OWN_FIELDS:
                setattr(self, f.name, copy.deepcopy(getattr(teacher, f.name)))

    def teacher_folder(self) -> Path:
        """The teacher's policy folder (a run folder of ours resolves to its checkpoint)."""
        try:
            return resolve_policy_folder(self.teacher_model_path)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--policy.teacher_model_path={self.teacher_model_path}: {error}") from None

    def head_config(self, num_steps: int) -> SmolVLAConfig:
        """A plain SmolVLA config of this architecture sampling with `num_steps` steps: the config of
        the teacher and student heads, and of the exported student (VLM weights come from the file)."""
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(SmolVLAConfig) if f.init}
        values |= {"num_steps": num_steps, "load_vlm_weights": False, "train_expert_only": True, "push_to_hub": False}
        values |= {"pretrained_path": None}
        return SmolVLAConfig(**values)

    @property
    def sampler(self):
        """The time sampler function of reflow_exp.flow."""
        return TIME_SAMPLERS[self.time_sampler]
