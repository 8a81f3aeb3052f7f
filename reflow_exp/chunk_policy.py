"""The policies evaluation rolls out, behind one interface (`ChunkPolicy`).

A policy here is anything with the `ChunkPolicy` interface:

    n_action_steps: int                      actions executed from each chunk before re-planning
    reset(seeds: list[int]) -> None          a batch of episodes starts, one env seed per row
    predict_chunk(batch, num_steps) -> (B, chunk, action_dim) unnormalised actions

where `batch` is LeRobot's env-side format (what `lerobot_eval.py` feeds its preprocessor):
`observation.image` (B, 3, H, W) float in [0, 1], `observation.state` (B, state_dim), `task`
(list of B strings). `SmolVLAChunkPolicy` puts both our `Policy` and LeRobot's `SmolVLAPolicy`
(+ its processors) behind it; `ScriptedChunkPolicy` does the same for the sandbox's expert, so the
rollout loop itself can be checked against a policy known to succeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from reflow_exp import heads
from reflow_exp.sandbox import ScriptedExpert


class ChunkPolicy(Protocol):
    """What the rollout needs from a policy (see the module docstring)."""

    n_action_steps: int

    def reset(self, seeds: list[int]) -> None: ...

    def predict_chunk(self, batch: dict, num_steps: int) -> Tensor: ...


class SmolVLAChunkPolicy:
    """Our `Policy` or LeRobot's `SmolVLAPolicy`, with their pre/post-processors, as a ChunkPolicy.

    Each call normalises and tokenises the batch, samples a chunk from explicit noise
    (B, chunk_size, max_action_dim) drawn per row from a generator seeded in `reset`, and
    unnormalises it: (B, chunk_size, action_dim) on the CPU.
    """

    def __init__(self, model, preprocessor, postprocessor):
        if preprocessor is None or postprocessor is None:
            raise ValueError(
                "the policy has no pre/post-processors; build it with them (Policy(backbone, head, pre, post)) "
                "or load it from a folder (Policy.from_pretrained / SmolVLAChunkPolicy.from_pretrained)"
            )
        self.model = model
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.config = model.config
        self.n_action_steps = self.config.n_action_steps
        self._generators: list[torch.Generator] = []

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SmolVLAChunkPolicy:
        """Load a LeRobot SmolVLA folder with LeRobot's own loader and processors."""
        from lerobot.policies.factory import make_pre_post_processors
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

        model = SmolVLAPolicy.from_pretrained(str(path)).eval()
        # LeRobot's eval script overrides the processors' device: a checkpoint saved elsewhere keeps its own.
        device = {"device_processor": {"device": str(model.config.device)}}
        pre, post = make_pre_post_processors(model.config, pretrained_path=str(path), preprocessor_overrides=device)
        return cls(model, pre, post)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self, seeds: list[int]) -> None:
        self._generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def predict_chunk(self, batch: dict, num_steps: int) -> Tensor:
        self._check_inputs(batch)
        noise = self._noise(len(batch["task"]))  # (B, chunk_size, max_action_dim)
        processed = self.preprocessor(dict(batch))
        with torch.no_grad():
            actions = self._sample(processed, noise, num_steps)  # (B, chunk_size, action_dim), normalised
        return self.postprocessor(actions)

    def _noise(self, batch_size: int) -> Tensor:
        if len(self._generators) != batch_size:
            raise ValueError(f"reset(seeds) was given {len(self._generators)} seeds for a batch of {batch_size}")
        shape = (self.config.chunk_size, self.config.max_action_dim)
        noise = torch.stack([torch.randn(shape, generator=g) for g in self._generators])
        return noise.to(self.device)

    def _sample(self, batch: dict, noise: Tensor, num_steps: int) -> Tensor:
        from reflow_exp.policy import Policy

        if isinstance(self.model, Policy):
            return self.model.predict_action_chunk(batch, noise=noise, num_steps=num_steps)
        with heads.num_steps(self.config, num_steps):  # LeRobot's SmolVLAPolicy
            return self.model.predict_action_chunk(batch, noise=noise)

    def _check_inputs(self, batch: dict) -> None:
        problem = feature_mismatch(self.config, {k: tuple(v.shape[1:]) for k, v in batch.items() if k != "task"})
        if problem:
            raise ValueError(f"{problem}; evaluate it in an env whose observations match the policy's input_features")


def feature_mismatch(config, observations: dict[str, tuple], action_dim: int | None = None) -> str | None:
    """Why a SmolVLA policy (`config`) cannot act in an env whose observation batch has the keys and
    per-row shapes `observations` and whose actions have `action_dim` values (None: not checked);
    None when it can. LeRobot's rule for cameras: at least one of the policy's, the rest left out."""
    cameras = [key for key in config.image_features if not key.startswith("observation.images.empty_camera_")]
    given = sorted(observations)
    if cameras and not any(key in observations for key in cameras):
        return f"the policy reads the cameras {cameras}, the env gives {given}"
    state = config.robot_state_feature
    if state is not None and observations.get("observation.state", ()) != tuple(state.shape):
        found = observations.get("observation.state", "no observation.state")
        return f"the policy reads observation.state {tuple(state.shape)}, the env gives {found}"
    wanted = config.action_feature.shape[0]
    if action_dim is not None and action_dim != wanted:
        return f"the policy acts with {wanted} action values, the env takes {action_dim}"
    return None


class ScriptedChunkPolicy:
    """The sandbox's ScriptedExpert as a ChunkPolicy: one expert per row, chunks of one action.

    It sees only the batch (agent position, image, instruction), like a learnt policy, and chooses
    its route with a coin seeded by the episode's env seed.
    """

    n_action_steps = 1

    def __init__(self, route: str | None = None):
        self.route = route
        self.experts: list[ScriptedExpert] = []

    def reset(self, seeds: list[int]) -> None:
        self.experts = [ScriptedExpert(seed=int(seed), route=self.route) for seed in seeds]
        for expert in self.experts:
            expert.reset()

    def predict_chunk(self, batch: dict, num_steps: int) -> Tensor:
        state = batch["observation.state"].numpy()  # (B, 2)
        # (B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8; exact, the image was uint8 / 255.
        pixels = (batch["observation.image"] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        actions = [
            expert.act({"agent_pos": state[i], "pixels": pixels[i]}, batch["task"][i])
            for i, expert in enumerate(self.experts)
        ]
        return torch.from_numpy(np.stack(actions))[:, None]  # (B, 1, 2)


def as_chunk_policy(policy) -> ChunkPolicy:
    """Our `Policy` -> SmolVLAChunkPolicy with its own processors; a ChunkPolicy passes through."""
    from reflow_exp.policy import Policy

    if isinstance(policy, Policy):
        return SmolVLAChunkPolicy(policy, policy.preprocessor, policy.postprocessor)
    if hasattr(policy, "predict_chunk") and hasattr(policy, "reset"):
        return policy
    raise TypeError(
        f"cannot evaluate a {type(policy).__name__}; pass a reflow_exp Policy or a ChunkPolicy, e.g. "
        "SmolVLAChunkPolicy(smolvla_policy, preprocessor, postprocessor) or SmolVLAChunkPolicy.from_pretrained(dir)"
    )
