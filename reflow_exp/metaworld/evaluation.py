"""Policies rolled out on each MetaWorld task, and the mean over tasks (the benchmark's table).

Each task runs through the project's `Evaluator` on `FastMetaworldEnv` (env id "metaworld", the
task passed in `env_kwargs`), at the Evaluator's seeds, which never meet a recording seed. The mean
over tasks pools every (task, seed) episode: its rate is the mean of the per-task rates (each task
plays the same number of episodes) and its 95% Wilson interval is over the pooled episodes; paired
comparisons (exact McNemar) pair episodes by (task, seed).
"""

from __future__ import annotations

import statistics

from reflow_exp.evaluate import Evaluator, as_chunk_policy
from reflow_exp.jobs.report import paired_comparisons
from reflow_exp.stats import wilson_interval

from .env import STATES
from .tasks import check_task


def evaluate_tasks(policies: dict, tasks, out_dir=None) -> dict:
    """Roll out `policies` ({name: (policy, step counts)}) on every task in `tasks`.

    Returns {"tasks": {task: {name: {steps: Evaluator metrics}}}, "mean": {name: {steps: pooled
    metrics}}, "paired": {"student@1 vs teacher@10": ..., ...} (pooled), "paired_by_task": {task:
    {...}}}. Every task's Evaluator is the gin-configured one with the task added to its `env_kwargs`;
    those (image_size, state) must match the recording's, which is checked against each policy's
    input features.
    """
    tasks = [check_task(task) for task in tasks]
    base = Evaluator(env_id="metaworld")
    for name, (policy, _) in policies.items():
        config = getattr(as_chunk_policy(policy), "config", None)  # scripted policies have none
        if config is not None:
            check_config_fits(name, config, base.env_kwargs)
    per_task = {}
    for task in tasks:
        evaluator = Evaluator(env_id="metaworld", env_kwargs=base.env_kwargs | {"task": task})
        per_task[task] = {
            name: evaluator.run(policy, steps, out_dir=out_dir, tag=f"{task}_{name}")
            for name, (policy, steps) in policies.items()
            if steps
        }
    pooled = {
        name: {k: pool([per_task[t][name][k] for t in tasks], tasks) for k in by_steps}
        for name, by_steps in per_task[tasks[0]].items()
    }
    return {
        "tasks": per_task,
        "mean": pooled,
        "paired": paired_comparisons(pooled),
        "paired_by_task": {task: paired_comparisons(per_task[task]) for task in tasks},
        "protocol": base.protocol | {"tasks": tasks, "env_kwargs": base.env_kwargs},
    }


def pool(results: list[dict], tasks: list[str]) -> dict:
    """Evaluator metrics of several tasks (same step count) as one: rates over all episodes,
    latency the median of the tasks' medians; episodes named "task:seed" for pairing."""
    success = [s for r in results for s in r["episode_success"]]
    episodes = sum(r["episodes"] for r in results)
    low, high = wilson_interval(sum(success), len(success))
    metrics = {
        "success_rate": sum(success) / len(success),
        "ci_low": low,
        "ci_high": high,
        "episodes": episodes,
        "mean_length": sum(r["mean_length"] * r["episodes"] for r in results) / episodes,
        "mean_return": sum(r["mean_return"] * r["episodes"] for r in results) / episodes,
        "episode_seeds": [f"{t}:{s}" for t, r in zip(tasks, results) for s in r["episode_seeds"]],
        "episode_success": success,
    }
    if all("latency_ms" in r for r in results):
        metrics["latency_ms"] = statistics.median(r["latency_ms"] for r in results)
    return metrics


def check_config_fits(name: str, config, env_kwargs: dict) -> None:
    """The env must show policy `name` (its SmolVLA `config`) what the recording showed it: the same
    state size and image size; ValueError naming the setting to change otherwise."""
    state = env_kwargs.get("state", "objects")
    size = env_kwargs.get("image_size", 64)
    features = config.input_features
    if "observation.state" in features and features["observation.state"].shape[0] != STATES[state]:
        raise ValueError(
            f"policy {name!r} takes a state of {features['observation.state'].shape[0]} values but the env gives "
            f"state={state!r} ({STATES[state]}); set Evaluator.env_kwargs' state to the one it was recorded with"
        )
    if "observation.image" in features and tuple(features["observation.image"].shape[-2:]) != (size, size):
        raise ValueError(
            f"policy {name!r} takes {features['observation.image'].shape} images but the env renders {size} px; "
            "set Evaluator.env_kwargs' image_size to the recording's"
        )
