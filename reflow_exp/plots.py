"""Figures of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs, CI and the dashboard's workers have no display

import matplotlib.pyplot as plt  # noqa: E402

STYLES = {"teacher": {"color": "tab:blue", "marker": "o"}, "student": {"color": "tab:orange", "marker": "s"}}


def success_latency_plot(results: dict[str, dict], path: str | Path) -> Path:
    """Success rate and latency against the number of sampling steps, one line per head.

    results: {"teacher": {steps: metrics}, "student": {steps: metrics}} as `Evaluator.run` returns
        (or summary.json's "eval", whose step keys are strings); metrics need "success_rate" and may
        have "ci_low"/"ci_high" (drawn as error bars: the 95% Wilson interval) and "latency_ms".
        Other heads (e.g. "expert") are drawn too.
    Writes one PNG with two panels side by side and returns its path.
    """
    if not results:
        raise ValueError("results is empty; pass {'teacher': {steps: metrics}, 'student': {...}}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (success_ax, latency_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    all_steps = set()
    for head, by_steps in results.items():
        points = sorted((int(k), metrics) for k, metrics in by_steps.items())
        all_steps.update(k for k, _ in points)
        style = STYLES.get(head, {"marker": "^"})
        steps = [k for k, _ in points]
        rates = [m["success_rate"] for _, m in points]
        # Error bars (rate - low, high - rate); a point without an interval gets none.
        errors = [
            [r - m.get("ci_low", r) for r, (_, m) in zip(rates, points)],
            [m.get("ci_high", r) - r for r, (_, m) in zip(rates, points)],
        ]
        success_ax.errorbar(steps, rates, yerr=errors, capsize=3, label=head, **style)
        timed = [(k, m["latency_ms"]) for k, m in points if "latency_ms" in m]
        if timed:
            latency_ax.plot(*zip(*timed), label=head, **style)
    ticks = sorted(all_steps)
    for ax in (success_ax, latency_ax):
        ax.set_xscale("log")  # 1, 2, 4, 10 steps: evenly spread
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps (Euler)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    success_ax.set_ylim(-0.05, 1.05)
    success_ax.set_ylabel("success rate (bars: 95% Wilson interval)")
    success_ax.set_title("Success")
    latency_ax.set_ylim(bottom=0)
    latency_ax.set_ylabel("latency per action chunk, batch 1 (ms)")
    latency_ax.set_title("Latency")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
