"""Rectified-flow math: pure functions on tensors (no gin, no nn.Module).

Time convention (SmolVLA's, everywhere): t=1 is noise z, t=0 is the action x;
x_t = t·z + (1−t)·x, the velocity is u = dx_t/dt = z − x, and sampling integrates from t=1 down to
t=0 with dt = −1/steps. Action tensors are (B, chunk, action_dim); times are (B,).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from lerobot.policies.common.flow_matching import euler_integrate
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, chunk, D), t (B,)) -> v (B, chunk, D)


def interpolate(x: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """x_t = t·z + (1−t)·x on the straight line from action x (t=0) to noise z (t=1)."""
    t = t[:, None, None]
    return t * z + (1 - t) * x


def target_velocity(x: Tensor, z: Tensor) -> Tensor:
    """The straight line's constant velocity d x_t / d t = z − x."""
    return z - x


# --- time samplers: (batch, device, generator) -> t (B,) in [0, 1]
def uniform_time(batch: int, device=None, generator: torch.Generator | None = None) -> Tensor:
    return torch.rand(batch, device=device, generator=generator)


def beta_time(batch: int, device=None, generator=None, alpha: float = 1.5, beta: float = 1.0) -> Tensor:
    """SmolVLA's sampler: Beta(1.5, 1)·0.999 + 0.001, biased towards t=1 (noise).

    Not LeRobot's `sample_time_beta` (same law, tested): that one draws from the global RNG, and
    every sampler here takes a `generator`; Beta(a, b) = Ga/(Ga + Gb) with seeded gammas."""
    gamma_a = torch._standard_gamma(torch.full((batch,), alpha), generator=generator)
    gamma_b = torch._standard_gamma(torch.full((batch,), beta), generator=generator)
    return (gamma_a / (gamma_a + gamma_b) * 0.999 + 0.001).to(device)


def u_shaped_time(batch: int, device=None, generator=None, a: float = 4.0) -> Tensor:
    """Lee et al.'s (2024) U-shaped sampler: p(t) ∝ e^{a·s} + e^{−a·s} with s = 2t − 1, dense near
    both t=0 and t=1 and symmetric, so it needs no remapping under SmolVLA's convention.
    Sampled by inverting the CDF (sinh(a·s) + sinh(a)) / (2·sinh(a))."""
    u = torch.rand(batch, device=device, generator=generator)
    s = torch.asinh((2 * u - 1) * math.sinh(a)) / a
    return (s + 1) / 2


def logit_normal_time(batch: int, device=None, generator=None, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """t = sigmoid(N(mean, std²)); a positive mean biases towards noise."""
    return torch.sigmoid(mean + std * torch.randn(batch, device=device, generator=generator))


# --- losses
def velocity_error(squared: Tensor, mask: Tensor, huber_c: float | None = None) -> Tensor:
    """Per-sample error (B,) from the squared velocity error (v − u)² (B, chunk, D) over `mask`
    (B, chunk, D) of valid entries: their mean, or with `huber_c` the pseudo-Huber
    sqrt(‖v−u‖² + c²) − c of the masked difference (Lee et al. 2024)."""
    squared = squared * mask
    if huber_c is None:
        return squared.sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp_min(1)
    return torch.sqrt(squared.sum(dim=(1, 2)) + huber_c**2) - huber_c


def huber_c_for(valid_values: int) -> float:
    """Lee et al.'s pseudo-Huber constant c = 0.00054·√d for d valid action values."""
    return 0.00054 * math.sqrt(valid_values)


def binned_means(values: Tensor, t: Tensor, bins: int = 4) -> dict[str, float]:
    """Mean of `values` (B,) per equal-width bin of t (B,): {"t0.00-0.25": ..., ...}; empty bins absent."""
    index = torch.clamp((t * bins).long(), max=bins - 1)
    out = {}
    for b in range(bins):
        chosen = values[index == b]
        if chosen.numel():
            out[f"t{b / bins:.2f}-{(b + 1) / bins:.2f}"] = chosen.mean().item()
    return out


# --- sampling and straightness
def euler(velocity: Velocity, noise: Tensor, steps: int) -> tuple[Tensor, list[Tensor]]:
    """Integrate from t=1 (noise (B, chunk, D)) to t=0 with `steps` Euler steps.

    Returns the action (B, chunk, D) and the velocity used at each step. LeRobot's own loop
    (`euler_integrate`, SmolVLA's sampler), so the grid is LeRobot's: t_k = 1 − k/steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    velocities = []

    def recorded(x_t: Tensor, t: Tensor) -> Tensor:  # LeRobot's loop returns only the end point
        velocities.append(velocity(x_t, t))
        return velocities[-1]

    return euler_integrate(recorded, noise, steps), velocities


def straightness(velocities: list[Tensor], noise: Tensor, action: Tensor) -> Tensor:
    """How far a sampled path bends: mean over steps of ‖v_k − (z − x)‖² / ‖z − x‖², per sample (B,).

    Zero for a straight path (constant velocity equal to the end-to-end displacement).
    """
    chord = noise - action
    norm = (chord**2).sum(dim=(1, 2)).clamp_min(1e-12)
    return torch.stack([((v - chord) ** 2).sum(dim=(1, 2)) / norm for v in velocities]).mean(0)
