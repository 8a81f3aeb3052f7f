"""Statistics of success rates: Wilson intervals, the exact McNemar test, paired differences.

Pure Python (no scipy, no numpy): the numbers are counts of successful episodes, and every
formula here is a few lines that tests check against hand-computed values.

- `wilson_interval(k, n)`: 95% score interval of a success rate k/n (Wilson 1927). Unlike the
  normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n.
- `mcnemar_exact(b, c)`: two-sided exact p-value that two policies evaluated on the same seeds
  succeed equally often, from the discordant seeds only (b: only the first succeeded, c: only the
  second); under the null each discordant seed goes either way with probability 1/2.
- `paired_comparison(a, b)`: the difference of two success rates on the same seeds, its 95%
  interval (Newcombe 1998, method 10: Wilson intervals combined with the phi correlation of the
  pairs) and the McNemar p-value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval of the success rate `successes / n`."""
    _check_counts(successes=successes, n=n)
    if successes > n:
        raise ValueError(f"successes={successes} exceeds n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for `b` and `c` discordant pairs:
    min(1, 2 * P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2); 1.0 when there are none."""
    _check_counts(b=b, c=c)
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers until this one division


def paired_comparison(first: Sequence[bool], second: Sequence[bool], z: float = Z95) -> dict:
    """Compare two policies' per-episode outcomes on the same seeds (same order).

    Returns {"n", "difference" (rate of `first` minus rate of `second`), "ci_low", "ci_high"
    (Newcombe's interval of the difference), "p_value" (exact McNemar), "both", "first_only",
    "second_only", "neither" (the 2x2 counts)}.
    """
    if len(first) != len(second) or not first:
        raise ValueError(
            f"paired outcomes need the same non-zero number of episodes, got {len(first)} and {len(second)}"
        )
    both = sum(bool(x) and bool(y) for x, y in zip(first, second))
    first_only = sum(bool(x) and not y for x, y in zip(first, second))
    second_only = sum(not x and bool(y) for x, y in zip(first, second))
    n = len(first)
    neither = n - both - first_only - second_only
    low, high = newcombe_paired_interval(both, first_only, second_only, neither, z)
    return {
        "n": n,
        "difference": (first_only - second_only) / n,
        "ci_low": low,
        "ci_high": high,
        "p_value": mcnemar_exact(first_only, second_only),
        "both": both,
        "first_only": first_only,
        "second_only": second_only,
        "neither": neither,
    }


def newcombe_paired_interval(
    both: int, first_only: int, second_only: int, neither: int, z: float = Z95
) -> tuple[float, float]:
    """Interval of p1 - p2 for paired binary outcomes (Newcombe 1998, method 10).

    p1 = (both + first_only) / n and p2 = (both + second_only) / n each get a Wilson interval
    (l1, u1), (l2, u2); phi is the correlation of the pairs, which narrows the interval when the
    two policies tend to succeed on the same seeds:
        low  = d - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        high = d + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)
    """
    _check_counts(both=both, first_only=first_only, second_only=second_only, neither=neither)
    n = both + first_only + second_only + neither
    if n == 0:
        raise ValueError("no paired outcomes: every count is 0")
    k1, k2 = both + first_only, both + second_only
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson_interval(k1, n, z)
    l2, u2 = wilson_interval(k2, n, z)
    margins = k1 * (n - k1) * k2 * (n - k2)
    phi = (both * neither - first_only * second_only) / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return max(-1.0, d - math.sqrt(max(below, 0.0))), min(1.0, d + math.sqrt(max(above, 0.0)))


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    if "n" in counts and counts["n"] < 1:
        raise ValueError(f"n must be >= 1 episodes, got {counts['n']}")
