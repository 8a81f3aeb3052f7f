"""The sandbox task (`reflow_exp/Sandbox-v0`) as a LeRobot `EnvConfig`.

Observations: `pixels` (64, 64, 3) uint8 → `observation.image`; `agent_pos` (2,) → `observation.state`;
the instruction through `task_description`. Success is the env's `info["is_success"]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.envs.utils import freeze_after_episode_end
from lerobot.utils.constants import ACTION, OBS_IMAGE, OBS_STATE

from reflow_exp.sandbox import ENV_ID
from reflow_exp.sandbox.task import IMAGE_SIZE, MAX_EPISODE_STEPS


@EnvConfig.register_subclass("reflow_sandbox")
@dataclass
class ReflowSandboxEnv(EnvConfig):
    """`episode_length`: env steps before an episode is cut (the sandbox's own limit by default)."""

    task: str | None = "Sandbox-v0"
    fps: int = 10
    episode_length: int = MAX_EPISODE_STEPS
    features: dict[str, PolicyFeature] = field(
        default_factory=lambda: {
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(2,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(2,)),
            "pixels": PolicyFeature(type=FeatureType.VISUAL, shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
        }
    )
    features_map: dict[str, str] = field(
        default_factory=lambda: {ACTION: ACTION, "agent_pos": OBS_STATE, "pixels": OBS_IMAGE}
    )

    @property
    def package_name(self) -> str:
        return "reflow_exp.sandbox"  # importing it registers ENV_ID with gymnasium

    @property
    def gym_id(self) -> str:
        return ENV_ID

    @property
    def gym_kwargs(self) -> dict:
        return {"max_episode_steps": self.episode_length}

    def create_envs(self, n_envs: int, use_async_envs: bool = False) -> dict[str, dict[int, gym.vector.VectorEnv]]:
        """`n_envs` sandboxes stepped in one process (the task is cheap: worker processes only cost),
        each frozen once its episode ends, as LeRobot's own async envs are."""
        import reflow_exp.sandbox  # noqa: F401  registers ENV_ID

        def make() -> gym.Env:
            return gym.make(self.gym_id, disable_env_checker=self.disable_env_checker, **self.gym_kwargs)

        vector = gym.vector.SyncVectorEnv(
            [freeze_after_episode_end(make) for _ in range(n_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        )
        return {self.type: {0: vector}}
