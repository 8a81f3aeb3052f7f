"""The three benchmarks on a CUDA device in bf16 at the real architecture, in a few minutes.

- startup: the same fresh-process comparison, the models moved to the GPU once loaded (weights stay
  float32, as in the checkpoint); peak GPU memory is reported next to peak RSS.
- train_step and latency: float32 weights under `torch.autocast(bfloat16)` (what the trainer's
  `mixed_precision="bf16"` does), larger batches, CUDA-synchronised timings.

Without a CUDA device it prints that it skipped and returns `{"skipped": True, "reason": ...}`.
"""

from __future__ import annotations

import time
from pathlib import Path

from reflow_exp.bench import latency, startup, train_step

BUDGET_S = 300  # the whole GPU run should take under 5 minutes


def run(size: str, repeats: int, cache: Path, plot: Path | None = None) -> dict:
    """All three on `cuda:0`, or a skip record when there is no CUDA device."""
    import torch

    from reflow_exp.bench.__main__ import HEADLINE

    if not torch.cuda.is_available():
        reason = "no CUDA device (torch.cuda.is_available() is False)"
        print(f"gpu: skipped: {reason}")
        return {"bench": "gpu", "skipped": True, "reason": reason}
    start = time.perf_counter()
    result = {
        "bench": "gpu",
        "skipped": False,
        "size": size,
        "gpu": torch.cuda.get_device_name(0),
        "startup": startup.run(size, max(1, repeats // 2), cache, device="cuda"),
        "train_step": train_step.run(size, repeats, cache, batch=8, device="cuda", amp=torch.bfloat16),
        "latency": latency.run(size, repeats, cache, throughput_batch=64, device="cuda", amp=torch.bfloat16, plot=plot),
    }
    result["wall_s"] = time.perf_counter() - start
    result["within_budget"] = result["wall_s"] <= BUDGET_S
    for part in ("startup", "train_step", "latency"):
        result |= {name: result[part][name] for name in HEADLINE[part]}
    print(f"\ngpu: all three in {result['wall_s']:.0f} s (budget {BUDGET_S} s)")
    return result
