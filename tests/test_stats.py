"""Statistics: Wilson intervals, exact McNemar, Newcombe's paired interval, against hand-computed values."""

import math
import random

import pytest

from reflow_exp.stats import mcnemar_exact, newcombe_paired_interval, paired_comparison, wilson_interval


def test_wilson_known_values():
    # By hand, z = 1.96: 0/10 -> centre = half = (z^2/20) / (1 + z^2/10) = 0.13877, so (0, 0.2775).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    # 5/10: centre 0.5, half = z / (1 + z^2/10) * sqrt(0.025 + z^2/400) = 0.26341.
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # 88/100: the textbook formula written out once more, independently.
    z, n, p = 1.959963984540054, 100, 0.88
    centre = (2 * n * p + z * z) / (2 * (n + z * z))
    half = z * math.sqrt(4 * n * p * (1 - p) + z * z) / (2 * (n + z * z))
    assert wilson_interval(88, 100) == pytest.approx((centre - half, centre + half), abs=1e-12)


def test_wilson_narrows_with_more_episodes_and_covers_the_rate():
    low_50, high_50 = wilson_interval(44, 50)
    low_500, high_500 = wilson_interval(440, 500)
    assert low_50 < low_500 < 0.88 < high_500 < high_50


@pytest.mark.parametrize("args, match", [((11, 10), "exceeds"), ((0, 0), "n must be >= 1"), ((-1, 5), "successes")])
def test_wilson_refuses_impossible_counts(args, match):
    with pytest.raises(ValueError, match=match):
        wilson_interval(*args)


def test_mcnemar_exact_known_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * P(X = 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * (1 + 10) / 1024)  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    assert mcnemar_exact(3, 3) == 1.0  # the doubled tail exceeds 1: capped
    assert mcnemar_exact(4, 6) == mcnemar_exact(6, 4) == pytest.approx(2 * (1 + 10 + 45 + 120 + 210) / 1024)
    # Hundreds of discordant pairs stay exact (integers) and tiny but positive.
    assert 0 < mcnemar_exact(0, 1000) == pytest.approx(2.0**-999)


def test_paired_comparison_counts_and_difference():
    first = [1, 1, 1, 1, 0, 1, 0, 1, 1, 0]
    second = [1, 0, 1, 0, 0, 0, 1, 1, 1, 0]
    result = paired_comparison(first, second)
    assert (result["both"], result["first_only"], result["second_only"], result["neither"]) == (4, 3, 1, 2)
    assert result["n"] == 10 and result["difference"] == pytest.approx(0.2)
    assert result["p_value"] == pytest.approx(mcnemar_exact(3, 1)) == pytest.approx(2 * 5 / 16)
    assert result["ci_low"] < 0.2 < result["ci_high"]
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_comparison([1, 0], [1])


def test_newcombe_interval_by_hand_when_uncorrelated():
    # phi = 0 (both * neither == first_only * second_only): the interval is the two Wilson margins
    # combined in quadrature, which is also Newcombe's interval for independent samples.
    both, first_only, second_only, neither = 20, 20, 10, 10  # 20*10 - 20*10 = 0
    l1, u1 = wilson_interval(40, 60)
    l2, u2 = wilson_interval(30, 60)
    d = 10 / 60
    expected = (d - math.hypot(40 / 60 - l1, u2 - 30 / 60), d + math.hypot(u1 - 40 / 60, 30 / 60 - l2))
    assert newcombe_paired_interval(both, first_only, second_only, neither) == pytest.approx(expected, abs=1e-12)


def test_newcombe_interval_is_narrower_for_correlated_pairs_and_symmetric():
    # Same margins (90 and 80 of 100), once with phi = 0 (72 * 2 == 18 * 8), once correlated.
    uncorrelated = newcombe_paired_interval(72, 18, 8, 2)
    correlated = newcombe_paired_interval(80, 10, 0, 10)
    assert correlated[1] - correlated[0] < uncorrelated[1] - uncorrelated[0]
    low, high = newcombe_paired_interval(50, 7, 7, 36)
    assert low == pytest.approx(-high) and high > 0


def test_newcombe_interval_covers_the_true_difference_95_percent_of_the_time():
    """Monte Carlo: correlated pairs (phi ~ 0.49), n = 200, 2,000 draws; coverage must be near 0.95
    (the standard error of a 0.95 coverage estimate is 0.005 here)."""
    rng = random.Random(0)
    cells = ((1, 1), (1, 0), (0, 1), (0, 0))
    weights = (0.75, 0.10, 0.05, 0.10)  # p1 = 0.85, p2 = 0.80
    covered = 0
    for _ in range(2000):
        pairs = rng.choices(cells, weights, k=200)
        result = paired_comparison([a for a, _ in pairs], [b for _, b in pairs])
        covered += result["ci_low"] <= 0.05 <= result["ci_high"]
    assert 0.93 <= covered / 2000 <= 0.97
