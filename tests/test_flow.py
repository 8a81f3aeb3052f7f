"""Analytic checks of the rectified-flow math (time convention: t=1 noise, t=0 action)."""

import math

import pytest
import torch

from reflow_exp import flow


def test_interpolation_endpoints_and_velocity():
    x, z = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    assert torch.allclose(flow.interpolate(x, z, torch.zeros(3)), x)
    assert torch.allclose(flow.interpolate(x, z, torch.ones(3)), z)
    # d x_t / dt by finite differences equals the target velocity
    t, h = torch.full((3,), 0.3), 1e-3
    fd = (flow.interpolate(x, z, t + h) - flow.interpolate(x, z, t)) / h
    assert torch.allclose(fd, flow.target_velocity(x, z), atol=1e-3)


def test_constant_velocity_integrates_exactly():
    noise, v = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    for steps in (1, 3, 10):
        x, _ = flow.euler(lambda x_t, t: v, noise, steps)
        assert torch.allclose(x, noise - v, atol=1e-6)


def test_straight_flow_same_in_one_step_as_in_ten():
    """The velocity field of the straight line to a fixed target x: v(x_t, t) = (x_t − x)/t."""
    target, noise = torch.randn(2, 4, 2), torch.randn(2, 4, 2)

    def velocity(x_t, t):
        return (x_t - target) / t[:, None, None]

    one, v1 = flow.euler(velocity, noise, 1)
    ten, v10 = flow.euler(velocity, noise, 10)
    assert torch.allclose(one, target, atol=1e-5) and torch.allclose(ten, target, atol=1e-5)
    assert flow.straightness(v10, noise, ten).max() < 1e-8


def test_curved_flow_is_not_straight_and_one_step_misses():
    noise = torch.randn(64, 1, 2)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])

    def velocity(x_t, t):  # rotation by 3 rad over the path: clearly curved
        return 3 * x_t @ rot.T

    one, _ = flow.euler(velocity, noise, 1)
    fine, vs = flow.euler(velocity, noise, 50)
    assert (one - fine).abs().mean() > 0.1
    assert flow.straightness(vs, noise, fine).mean() > 0.05


@pytest.mark.parametrize("sampler", [flow.uniform_time, flow.beta_time, flow.u_shaped_time, flow.logit_normal_time])
def test_time_samplers_in_unit_interval_and_seeded(sampler):
    a = sampler(4000, generator=torch.Generator().manual_seed(0))
    b = sampler(4000, generator=torch.Generator().manual_seed(0))
    assert a.shape == (4000,) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_u_shaped_density_matches_formula():
    a = 4.0
    t = flow.u_shaped_time(200_000, generator=torch.Generator().manual_seed(1), a=a)
    hist = torch.histc(t, bins=10, min=0, max=1) / t.numel()
    edges = torch.linspace(0, 1, 11)
    s = 2 * edges - 1
    expected = (torch.sinh(a * s[1:]) - torch.sinh(a * s[:-1])) / (2 * math.sinh(a))
    assert torch.allclose(hist, expected, atol=3e-3)
    assert hist[0] > 4 * hist[5] and hist[-1] > 4 * hist[4]  # U-shaped, symmetric


def test_beta_time_matches_smolvla_mean():
    t = flow.beta_time(100_000, generator=torch.Generator().manual_seed(2))
    assert abs(t.mean().item() - (0.6 * 0.999 + 0.001)) < 5e-3  # E[Beta(1.5, 1)] = 0.6


def test_velocity_error_masks_and_huber():
    v, u = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    mask = torch.zeros(2, 3, 4)
    mask[:, :2, :2] = 1
    u[:, 2:, :] = 100.0  # masked-out entries must not count
    squared = (v - u) ** 2
    assert torch.allclose(flow.velocity_error(squared, mask), torch.ones(2))
    c = flow.huber_c_for(4)
    huber = flow.velocity_error(squared, mask, huber_c=c)
    assert torch.allclose(huber, torch.full((2,), math.sqrt(4 + c**2) - c))


def test_binned_means():
    values = torch.tensor([1.0, 2.0, 3.0, 5.0])
    t = torch.tensor([0.1, 0.2, 0.9, 1.0])
    assert flow.binned_means(values, t, bins=2) == {"t0.00-0.50": 1.5, "t0.50-1.00": 4.0}


# -- parity with LeRobot's flow-matching primitives (lerobot.policies.common.flow_matching) -------


def test_euler_is_lerobots_loop_with_the_velocities_recorded():
    from lerobot.policies.common.flow_matching import euler_integrate

    noise, rot = torch.randn(3, 4, 2), torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    seen = []

    def velocity(x_t, t):
        seen.append(t.clone())
        return 3 * x_t @ rot.T * t[:, None, None]  # curved and time-dependent

    for steps in (1, 2, 4, 10):
        seen.clear()
        x, velocities = flow.euler(velocity, noise, steps)
        ours_times = [t[0].item() for t in seen]
        seen.clear()
        assert torch.equal(x, euler_integrate(velocity, noise, steps))
        assert ours_times == [t[0].item() for t in seen] == pytest.approx([1 - k / steps for k in range(steps)])
        # The recorded velocities are the ones along the path: replaying them gives the same end point.
        replay = noise
        for v in velocities:
            replay = replay + (-1.0 / steps) * v
        assert len(velocities) == steps and torch.equal(replay, x)


def test_beta_time_has_the_law_of_lerobots_sample_time_beta():
    """Same Beta(1.5, 1)·0.999 + 0.001 law (two-sample Kolmogorov-Smirnov, 50k draws each)."""
    from lerobot.policies.common.flow_matching import sample_time_beta

    n = 50_000
    ours = flow.beta_time(n, generator=torch.Generator().manual_seed(3)).sort().values
    torch.manual_seed(4)  # LeRobot's sampler draws from the global RNG
    theirs = sample_time_beta(n, "cpu", alpha=1.5, beta=1.0, scale=0.999, offset=0.001).sort().values
    grid = torch.linspace(0, 1, 2001)
    cdf = lambda s: torch.searchsorted(s, grid).float() / n  # noqa: E731
    ks = (cdf(ours) - cdf(theirs)).abs().max().item()
    assert ks < 0.012, ks  # the 0.1% critical value is 1.95·sqrt(2/n) = 0.0123
    # A different law is told apart at this size (the test can fail).
    uniform = flow.uniform_time(n, generator=torch.Generator().manual_seed(5)).sort().values
    assert (cdf(ours) - cdf(uniform)).abs().max().item() > 0.05
