"""The evaluation jobs, and the rollouts every job ends with: Evaluator runs -> metrics, summary.json,
per-episode outcomes, plot and videos in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import gin
from reflow_exp import distributed
from reflow_exp.evaluate import Evaluator
from reflow_exp.jobs.report import eval_table, paired_comparisons, paired_table, quality_bar
from reflow_exp.plots import success_latency_plot
from reflow_exp.policy import Policy
from reflow_exp.rundir import RunDir

EPISODES_FILE = "eval_episodes.json"  # per-episode outcomes by seed, beside summary.json


def evaluate_rollouts(run: RunDir, step: int, policies: dict) -> dict:
    """Roll out each `name: (policy, step_counts)` with the gin-configured Evaluator; log to
    metrics.jsonl/Aim (contexts head, steps), write `eval`, `eval_protocol` and `paired` into
    summary.json and each episode's outcome into eval_episodes.json, the success/latency plot and
    the rollout videos into the run folder, and print the tables. When the env does not fit a policy
    (`Evaluator.mismatch`), nothing is rolled out: one line says why and summary.json keeps it as
    `eval_skipped`."""
    policies = {name: value for name, value in policies.items() if value[1]}
    if not policies:
        return {}
    evaluator = Evaluator()
    for name, (policy, _) in policies.items():
        problem = evaluator.mismatch(policy.config) if hasattr(policy, "config") else None  # scripted: none
        if problem:  # e.g. an SO-100 teacher and the default sandbox env: say so once, fail nothing
            print(
                f"[Eval] Skipping the rollouts: {problem} (the {name} policy). Set Evaluator.env_id to an env "
                "with the policy's cameras, state and action, or the *_eval_steps bindings to () to skip them."
            )
            run.update_summary({"eval_skipped": problem})
            return {}
    results = {
        name: evaluator.run(policy, steps, out_dir=run.path, tag=name) for name, (policy, steps) in policies.items()
    }
    for name, by_steps in results.items():
        for k, metrics in by_steps.items():
            keys = ("success_rate", "ci_low", "ci_high", "mean_return", "mean_length", "latency_ms")
            numbers = {key: metrics[key] for key in keys if key in metrics}
            run.log_metrics(step, numbers, subset="eval", head=name, steps=k)
            if metrics.get("gif"):
                run.tracker.track_image("rollout", metrics["gif"], step, {"head": name, "steps": k})
    plot = success_latency_plot(results, run.path / "eval_plot.png")
    run.tracker.track_image("success_latency", plot, step)
    summary = {
        name: {str(k): _relative(m, run.path) for k, m in by_steps.items()} for name, by_steps in results.items()
    }
    paired = paired_comparisons(results)
    run.update_summary({"eval": summary, "eval_protocol": evaluator.protocol, "paired": paired})
    _write_episodes(run.path / EPISODES_FILE, results)
    protocol = evaluator.protocol
    print(
        f"Evaluation: {protocol['episodes']} episodes per row, split {protocol['split']!r} "
        f"(seed {protocol['seed']}), layouts {protocol['layouts']!r}, {protocol['env_id']}"
    )
    print(eval_table(summary))
    if paired:
        print(paired_table(paired))
    bar = quality_bar(summary, paired)
    if bar is not None:
        run.update_summary({"quality_bar": bar})
        print("Quality bar: " + "; ".join(f"{check}: {'PASS' if ok else 'FAIL'}" for check, ok in bar.items()))
    return results


def _write_episodes(path: Path, results: dict) -> None:
    """{head: {steps: {"seeds": [...], "success": [0/1, ...]}}}: what paired tests are computed from."""
    episodes = {
        name: {str(k): {"seeds": m["episode_seeds"], "success": m["episode_success"]} for k, m in by_steps.items()}
        for name, by_steps in results.items()
    }
    path.write_text(json.dumps(episodes) + "\n")


def _relative(metrics: dict, root) -> dict:
    """Paths under the run folder relative to it, so the folder can move; per-episode lists
    stay out of summary.json (they go to EPISODES_FILE)."""

    def rel(path):
        return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else str(path)

    dropped = ("videos", "gif", "episode_seeds", "episode_success")
    out = {k: v for k, v in metrics.items() if k not in dropped}
    out["videos"] = [rel(p) for p in metrics.get("videos", [])]
    if metrics.get("gif"):
        out["gif"] = rel(metrics["gif"])
    return out


@gin.configurable
def evaluate_policies(run: RunDir, policies: dict = gin.REQUIRED, dry_run: bool = False) -> None:
    """Evaluate saved policies: `policies = {"name": ("<policy folder or run folder>", [steps, ...])}`."""
    if dry_run:
        print(f"[Eval] would evaluate {sorted(policies)} with {Evaluator().protocol}")
        return
    if not run.is_main:  # rollouts are rank 0's alone
        return
    device = distributed.device()
    loaded = {name: (Policy.from_pretrained(path, device), tuple(steps)) for name, (path, steps) in policies.items()}
    evaluate_rollouts(run, 0, loaded)


@gin.configurable
def evaluate_metaworld(run: RunDir, policies: dict = gin.REQUIRED, tasks=gin.REQUIRED, dry_run: bool = False) -> None:
    """`evaluate_policies` on every MetaWorld task in `tasks` (`metaworld.evaluation.evaluate_tasks`):
    summary.json gets `tasks` ({task: {head: {steps: metrics}}}), `mean` (pooled over tasks), `paired`
    (pooled, by task and seed), `paired_by_task` and `eval_protocol`; each step count of each head is
    logged with the pooled numbers."""
    from reflow_exp.metaworld.evaluation import evaluate_tasks

    if dry_run:
        protocol = Evaluator(env_id="metaworld").protocol
        print(f"[Eval] would evaluate {sorted(policies)} on {list(tasks)} with {protocol}")
        return
    loaded = {name: (Policy.from_pretrained(path), tuple(steps)) for name, (path, steps) in policies.items()}
    results = evaluate_tasks(loaded, tasks, out_dir=run.path)
    keys = ("success_rate", "ci_low", "ci_high", "mean_length", "latency_ms")
    for name, by_steps in results["mean"].items():
        for k, m in by_steps.items():
            run.log_metrics(0, {key: m[key] for key in keys if key in m}, subset="eval", head=name, steps=k)
    per_task = {task: _summary_table(heads, run.path) for task, heads in results["tasks"].items()}
    mean = _summary_table(results["mean"], run.path)
    run.update_summary(
        {
            "tasks": per_task,
            "mean": mean,
            "paired": results["paired"],
            "paired_by_task": results["paired_by_task"],
            "eval_protocol": results["protocol"],
        }
    )
    for task, heads in per_task.items():
        print(f"{task}\n{eval_table(heads)}")
    print(f"mean over {len(per_task)} tasks\n{eval_table(mean)}")
    if results["paired"]:
        print(paired_table(results["paired"]))


def _summary_table(results: dict, root: Path) -> dict:
    """{head: {steps: Evaluator metrics}} as summary.json stores it (see `_relative`)."""
    return {name: {str(k): _relative(m, root) for k, m in by_steps.items()} for name, by_steps in results.items()}
