"""Two small torch helpers used across reflow_exp: parameter counts and optional autocast."""

from __future__ import annotations

import contextlib

import torch


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `module` (only those with requires_grad when `trainable_only`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def autocast(device_type: str, dtype: torch.dtype | None):
    """`torch.autocast(device_type, dtype)`, or no autocast when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
