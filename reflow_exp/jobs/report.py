"""Evaluation reports: paired comparisons, the plain-text tables and the sandbox's quality bar."""

from __future__ import annotations

from reflow_exp.stats import paired_comparison

# (first head, steps, second head, steps): compared on the same seeds, paired (exact McNemar).
PAIRS = (("student", 1, "teacher", 10), ("student", 1, "teacher", 1), ("student", 2, "teacher", 2))


def paired_comparisons(results: dict) -> dict[str, dict]:
    """PAIRS found in `results` ({head: {steps: Evaluator metrics}}), compared seed by seed:
    {"student@1 vs teacher@10": stats.paired_comparison(...), ...}. Difference: first minus second."""
    paired = {}
    for head_a, steps_a, head_b, steps_b in PAIRS:
        a, b = results.get(head_a, {}).get(steps_a), results.get(head_b, {}).get(steps_b)
        if a is None or b is None:
            continue
        if a["episode_seeds"] != b["episode_seeds"]:
            raise ValueError(f"{head_a}@{steps_a} and {head_b}@{steps_b} were evaluated on different seeds")
        name = f"{head_a}@{steps_a} vs {head_b}@{steps_b}"
        paired[name] = paired_comparison(a["episode_success"], b["episode_success"])
    return paired


def eval_table(summary: dict) -> str:
    """A plain-text table of summary.json's `eval` section (success with its 95% Wilson interval)."""
    lines = [
        f"{'head':<8} {'steps':>5} {'success':>8} {'95% CI':>13} {'return':>8} {'length':>7} "
        f"{'latency ms':>11} {'routes L/R/none':>16}"
    ]
    for name, by_steps in summary.items():
        for k, m in sorted(by_steps.items(), key=lambda item: int(item[0])):
            latency = f"{m['latency_ms']:.1f}" if "latency_ms" in m else "-"
            routes = "/".join(str(m["routes"][r]) for r in ("left", "right", "none")) if "routes" in m else "-"
            interval = f"{m['ci_low']:.3f}-{m['ci_high']:.3f}" if "ci_low" in m else "-"
            lines.append(
                f"{name:<8} {k:>5} {m['success_rate']:>8.3f} {interval:>13} {m['mean_return']:>8.3f} "
                f"{m['mean_length']:>7.1f} {latency:>11} {routes:>16}"
            )
    return "\n".join(lines)


def paired_table(paired: dict) -> str:
    """A plain-text table of summary.json's `paired` section."""
    lines = [
        f"{'paired (same seeds)':<24} {'difference':>10} {'95% CI':>17} {'p (McNemar)':>11} "
        f"{'n':>5} {'only 1st/only 2nd':>17}"
    ]
    for name, p in paired.items():
        interval = f"{p['ci_low']:+.3f} to {p['ci_high']:+.3f}"
        discordant = f"{p['first_only']}/{p['second_only']}"
        lines.append(
            f"{name:<24} {p['difference']:>+10.3f} {interval:>17} {p['p_value']:>11.4f} {p['n']:>5} {discordant:>17}"
        )
    return "\n".join(lines)


_SLACK = 1e-9  # rates are k/n: 0.86 >= 0.66 + 0.20 must hold despite float rounding


def quality_bar(summary: dict, paired: dict | None = None) -> dict[str, bool] | None:
    """The sandbox's bar (issue 12): teacher@10 >= 0.80 (a teacher worth distilling); student@1
    >= 0.97 x teacher@10 and not significantly worse than it (paired exact McNemar, p > 0.05, or
    better); student@1 >= teacher@1 + 0.20 (reflow, not an easy task, makes one step work);
    student@2 >= teacher@2 - 0.02 when both were evaluated. None without teacher@10, teacher@1 and
    student@1."""
    try:
        t10 = summary["teacher"]["10"]["success_rate"]
        t1 = summary["teacher"]["1"]["success_rate"]
        s1 = summary["student"]["1"]["success_rate"]
    except KeyError:
        return None
    bar = {
        "teacher@10 >= 0.80": t10 >= 0.80,
        "student@1 >= 0.97 x teacher@10": s1 >= 0.97 * t10 - _SLACK,
    }
    versus_t10 = (paired or {}).get("student@1 vs teacher@10")
    if versus_t10 is not None:
        bar["student@1 not significantly worse than teacher@10 (p > 0.05)"] = (
            versus_t10["difference"] >= 0 or versus_t10["p_value"] > 0.05
        )
    bar["student@1 >= teacher@1 + 0.20"] = s1 >= t1 + 0.20 - _SLACK
    s2, t2 = summary["student"].get("2"), summary["teacher"].get("2")
    if s2 is not None and t2 is not None:
        bar["student@2 >= teacher@2 - 0.02"] = s2["success_rate"] >= t2["success_rate"] - 0.02 - _SLACK
    return bar
