"""LeRobot policy plugin: `--policy.type=smolvla_reflow` runs reflow_exp's reflow in `lerobot-train`.

LeRobot's CLIs import this package by its distribution Name; importing the configuration registers the
policy type (the factory then finds `modeling_smolvla_reflow` and `processor_smolvla_reflow` by name).
"""

from .configuration_smolvla_reflow import SmolVLAReflowConfig

__all__ = ["SmolVLAReflowConfig"]
