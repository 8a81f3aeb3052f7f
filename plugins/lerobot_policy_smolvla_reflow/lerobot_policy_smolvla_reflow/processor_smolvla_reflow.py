"""The pre/post-processors of smolvla_reflow: the teacher's own.

Reflow's pairs live in the teacher's normalised action space and the student is exported with the
teacher's processors, so the normalisation statistics are the teacher's, not the training dataset's
(LeRobot passes those; they are not used). A checkpoint of this policy carries the processors it was
trained with, and LeRobot loads them from there on resume and in lerobot-eval.
"""

from __future__ import annotations

from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import make_pre_post_processors

from .configuration_smolvla_reflow import SmolVLAReflowConfig


def make_smolvla_reflow_pre_post_processors(config: SmolVLAReflowConfig, dataset_stats=None):
    """The teacher's processors, sending batches to `config.device` (`dataset_stats`: see the module)."""
    folder = config.teacher_folder()
    return make_pre_post_processors(
        PreTrainedConfig.from_pretrained(folder),
        pretrained_path=str(folder),
        preprocessor_overrides={"device_processor": {"device": str(config.device)}},
    )
