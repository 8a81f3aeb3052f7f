"""Small torch helpers used across reflow_exp: parameter counts, optional autocast, CUDA speed settings.

Everything CUDA-only here is a no-op on the CPU, so CPU runs stay bit-identical.
"""

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


def cuda_inference_autocast(device: torch.device | str):
    """bfloat16 autocast for no-grad passes of the frozen teacher and backbone (pair generation, the
    image cache build, offline metrics) on a CUDA device with bfloat16 (compute capability >= 8.0);
    nothing on the CPU or an older GPU. A real run is bf16 on GPUs anyway (Trainer.mixed_precision)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def enable_tf32() -> bool:
    """TF32 for float32 matmuls and convolutions on CUDA (Ampere and later: ~1e-3 relative, several
    times faster); returns whether CUDA is there. Nothing changes on the CPU."""
    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True
