"""ActionHead: SmolVLA's action expert and its projections, on a borrowed backbone.

A head is LeRobot's own `SmolVLAPolicy` whose VLM is *borrowed* from the shared `Backbone`: LeRobot's
forward and sampling code reach it as `model.vlm_with_expert.vlm`, but it is not registered as a
submodule, so the head's parameters and state dict are the expert and projections only (state_proj,
action_in/out_proj, the action-time MLP). Several heads can borrow one backbone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Iterator

import torch
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from torch import nn

from reflow_exp.backbone import Backbone


class ActionHead(nn.Module):
    """Expert + projections of one SmolVLA policy.

    Args:
        config: the SmolVLA configuration (architecture, chunk size, features, `num_steps`).
        backbone: the shared frozen VLM this head attends to.
        state_dict: head weights in LeRobot's key format (`model.state_proj.weight`, ...); a fresh
            initialisation when None. Tensors are copied, never shared with the source.
    """

    def __init__(self, config: SmolVLAConfig, backbone: Backbone, state_dict: dict | None = None):
        super().__init__()
        device = next(backbone.parameters()).device
        # The VLM LeRobot would build here is replaced by the backbone: build it on meta (free).
        with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
            policy = SmolVLAPolicy(dataclasses.replace(config, load_vlm_weights=False))
        vlm_with_expert = policy.model.vlm_with_expert
        # Borrowed, not registered: LeRobot's code reads `vlm_with_expert.vlm`, but as a submodule the
        # shared ~350M-parameter VLM would be in every head's parameters(), state_dict() and `.to()`
        # (optimizer groups, checkpoints and counts per head). nn.Module.__setattr__ registers any
        # Module, hence object.__setattr__. LeRobot's save needs it registered: `with_vlm_registered`.
        del vlm_with_expert._modules["vlm"]
        object.__setattr__(vlm_with_expert, "vlm", backbone.vlm)

        if state_dict is None:
            policy.to_empty(device=device)
            _initialise(policy)
        else:
            state = {k: v.to(device, copy=True) for k, v in state_dict.items()}
            policy.load_state_dict(state, strict=True, assign=True)
        _rebuild_rotary_buffers(vlm_with_expert.lm_expert, device)
        self.lerobot = policy
        self.config = policy.config

    @contextlib.contextmanager
    def with_vlm_registered(self) -> Iterator[SmolVLAPolicy]:
        """Temporarily make the borrowed VLM a submodule, so LeRobot's save writes a whole policy."""
        vlm_with_expert = self.lerobot.model.vlm_with_expert
        vlm = vlm_with_expert.__dict__.pop("vlm")
        vlm_with_expert._modules["vlm"] = vlm
        try:
            yield self.lerobot
        finally:
            del vlm_with_expert._modules["vlm"]
            object.__setattr__(vlm_with_expert, "vlm", vlm)

    def num_steps(self, steps: int | None):
        """Sample with `steps` Euler steps inside the block (see `num_steps`)."""
        return num_steps(self.config, steps)


@contextlib.contextmanager
def num_steps(config: SmolVLAConfig, steps: int | None) -> Iterator[None]:
    """Set `config.num_steps` to `steps` inside the block (LeRobot's SmolVLA reads its step count
    from there); None leaves it as is."""
    saved = config.num_steps
    if steps is not None:
        if steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {steps}")
        config.num_steps = steps
    try:
        yield
    finally:
        config.num_steps = saved


def _initialise(policy: SmolVLAPolicy) -> None:
    """A fresh head: Hugging Face's init for the expert, PyTorch's for the projections."""
    expert = policy.model.vlm_with_expert.lm_expert
    expert.apply(expert._init_weights)
    for module in policy.model.children():
        if isinstance(module, nn.Linear):
            module.reset_parameters()


def _rebuild_rotary_buffers(expert: nn.Module, device: torch.device) -> None:
    """The expert's rotary embedding keeps non-persistent buffers that no state dict carries;
    recompute them on `device` (SmolVLA applies its own RoPE, but nothing may stay on meta)."""
    rotary = getattr(expert, "rotary_emb", None)
    if rotary is not None:
        with torch.device(device):
            expert.rotary_emb = type(rotary)(config=rotary.config)
    leftover = [n for n, t in expert.named_buffers() if t.is_meta]
    if leftover and torch.device(device).type != "meta":
        raise RuntimeError(f"Expert buffers left without values: {leftover}")
