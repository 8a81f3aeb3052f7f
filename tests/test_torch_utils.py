"""CUDA-only speed settings (TF32, bfloat16 autocast for the frozen passes) are no-ops on the CPU."""

import contextlib

import torch

from reflow_exp.torch_utils import cuda_inference_autocast, enable_tf32


def test_cuda_only_speed_settings_leave_the_cpu_alone():
    """TF32 and bfloat16 autocast are CUDA-only: on the CPU nothing changes (bit-identical runs)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert enable_tf32() == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (matmul, cudnn)
    assert isinstance(cuda_inference_autocast("cpu"), contextlib.nullcontext)
    with cuda_inference_autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
