"""The shared frozen SmolVLM backbone: vision encoder + connector + the first N text layers.

A process builds it once and every head borrows it. Each time VLM weights are materialised
(from a pretrained folder or from a checkpoint's state dict) the process-wide counter goes up, so a
run can prove it loaded the VLM exactly once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, SmolVLMForConditionalGeneration

VLM_PREFIX = "model.vlm_with_expert.vlm."  # where LeRobot's SmolVLAPolicy keeps the VLM weights

_load_count = 0


def vlm_load_count() -> int:
    """How many times this process has materialised VLM weights."""
    return _load_count


def _count_load(source: str) -> None:
    global _load_count
    _load_count += 1
    print(f"Loading {source} weights ...", flush=True)


class Backbone(nn.Module):
    """Frozen SmolVLM cut to `num_layers` text layers; always in eval mode.

    `vlm` is the same module LeRobot's `SmolVLMWithExpertModel.vlm` holds, so heads can borrow it.
    """

    def __init__(self, vlm: SmolVLMForConditionalGeneration, num_layers: int):
        super().__init__()
        text = vlm.model.text_model
        if num_layers > 0:
            text.layers = text.layers[:num_layers]
        self.vlm = vlm
        self.num_layers = len(text.layers)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)  # frozen: dropout and norms stay in inference mode

    def unfreeze(self) -> Backbone:
        """Let the optimiser update the VLM's weights (it stays in eval mode: no dropout).

        Only for training a teacher on a VLM that was never pretrained (the sandbox's); reflow
        always keeps the backbone frozen.
        """
        return self.requires_grad_(True)

    @classmethod
    def from_pretrained_vlm(cls, name_or_path: str | Path, num_layers: int, dtype=torch.float32) -> Backbone:
        """Load a SmolVLM (hub id or local folder) and cut it to `num_layers`; counts one load."""
        _count_load(str(name_or_path))
        vlm = AutoModelForImageTextToText.from_pretrained(str(name_or_path), dtype=dtype)
        return cls(vlm, num_layers)

    @classmethod
    def from_state_dict(
        cls, vlm_name: str, num_layers: int, state_dict: dict[str, torch.Tensor], source: str
    ) -> Backbone:
        """Build the architecture without weights and assign `state_dict` (keys without
        `VLM_PREFIX`) to it: the weights are materialised once, no random init first."""
        _count_load(source)
        backbone = cls.on_meta(vlm_name, num_layers)
        backbone.vlm.load_state_dict(state_dict, strict=True, assign=True)
        backbone.requires_grad_(False)  # assign=True brings the tensors' own requires_grad
        return backbone

    @classmethod
    def on_meta(cls, vlm_name: str, num_layers: int) -> Backbone:
        """The architecture with its parameters on the meta device (counts, dry runs); not a load.
        Buffers (rotary frequencies, position ids) are computed for real: no state dict holds them."""
        with init_empty_weights(include_buffers=False):
            return cls(SmolVLMForConditionalGeneration(AutoConfig.from_pretrained(vlm_name)), num_layers)
