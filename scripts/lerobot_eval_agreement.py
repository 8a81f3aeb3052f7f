"""Does LeRobot's own `lerobot-eval` (with our env plugin) agree with reflow_exp's `evaluate_policies`?

    python scripts/lerobot_eval_agreement.py runs/sandbox-reflow/student --episodes 100 --out docs/bench/x.json

Both run as real processes on the same report-range seeds: `lerobot-eval --env.type=reflow_sandbox
--seed=<first report seed>` (LeRobot plays seeds S, S+1, ...: exactly `eval_seeds(n, 0, "report")`),
and `python -m reflow_exp.run --gin_file gin/sandbox/eval.gin` with the policy alone at its own step
count. Prints both success rates with 95% Wilson intervals, the paired difference (exact McNemar), and
whether LeRobot's rate lies inside evaluate_policies' interval. The two loops draw their noise
differently (LeRobot: the global generator; ours: one generator per env seed), so they agree in
distribution, not episode by episode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from reflow_exp.policy import resolve_policy_folder
from reflow_exp.sandbox.task import eval_seeds
from reflow_exp.stats import paired_comparison, wilson_interval

REPO = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def lerobot_eval(policy: Path, seeds: list[int], batch_size: int, work: Path) -> list[int]:
    """Per-episode success (0/1) of `lerobot-eval` on `seeds` (consecutive, as LeRobot plays them)."""
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError("lerobot-eval plays consecutive seeds; use the 'all' layouts of a split")
    out = work / "lerobot-eval"
    argv = [
        str(Path(sys.executable).parent / "lerobot-eval"),
        f"--policy.path={policy}",
        "--env.type=reflow_sandbox",
        f"--eval.n_episodes={len(seeds)}",
        f"--eval.batch_size={batch_size}",
        "--policy.device=cpu",
        f"--seed={seeds[0]}",
        f"--output_dir={out}",
    ]
    subprocess.run(argv, env=ENV, check=True, stdout=subprocess.DEVNULL)
    successes = json.loads((out / "eval_info.json").read_text())["per_task"][0]["metrics"]["successes"]
    return [int(s) for s in successes]


def evaluate_policies(policy: Path, steps: int, episodes: int, n_envs: int, work: Path) -> tuple[list[int], list[int]]:
    """(seeds, per-episode success) of reflow_exp's evaluate_policies job on the report range."""
    bindings = [
        f'evaluate_policies.policies = {{"policy": ("{policy}", [{steps}])}}',
        f"Evaluator.episodes = {episodes}",
        f"Evaluator.n_envs = {n_envs}",
        "Evaluator.videos = 0",
        "Evaluator.latency_calls = 0",
        'Evaluator.split = "report"',
        f'run.runs_dir = "{work}"',
        'run.name = "evaluate_policies"',
        "Tracker.enabled = False",
    ]
    argv = [sys.executable, "-m", "reflow_exp.run", "--gin_file", "gin/sandbox/eval.gin"]
    for binding in bindings:
        argv += ["--gin_param", binding]
    subprocess.run(argv, cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL)
    episodes_file = json.loads((work / "evaluate_policies" / "eval_episodes.json").read_text())
    row = episodes_file["policy"][str(steps)]
    return row["seeds"], row["success"]


def rate(successes: list[int]) -> dict:
    low, high = wilson_interval(sum(successes), len(successes))
    return {"success_rate": sum(successes) / len(successes), "ci_low": low, "ci_high": high, "episodes": len(successes)}


def agreement(policy: str | Path, episodes: int = 100, batch_size: int = 10) -> dict:
    """Run both loops on the first `episodes` report-range seeds; see the module docstring."""
    folder = resolve_policy_folder(policy)
    steps = json.loads((folder / "config.json").read_text())["num_steps"]
    seeds = eval_seeds(episodes, 0, "report")
    with tempfile.TemporaryDirectory() as tmp:
        theirs = lerobot_eval(folder, seeds, batch_size, Path(tmp))
        our_seeds, ours = evaluate_policies(folder, steps, episodes, batch_size, Path(tmp))
    if our_seeds != seeds:
        raise RuntimeError("evaluate_policies played other seeds than lerobot-eval")
    result = {
        "policy": str(policy),
        "num_steps": steps,
        "split": "report",
        "seeds": [seeds[0], seeds[-1]],
        "lerobot_eval": rate(theirs) | {"episode_success": theirs},
        "evaluate_policies": rate(ours) | {"episode_success": ours},
        "paired": paired_comparison(theirs, ours),
    }
    ours_rate = result["evaluate_policies"]
    result["lerobot_eval_within_evaluate_policies_ci"] = (
        ours_rate["ci_low"] <= result["lerobot_eval"]["success_rate"] <= ours_rate["ci_high"]
    )
    return result


def report(result: dict) -> str:
    lines = [
        f"{result['policy']} @{result['num_steps']} steps, report seeds {result['seeds'][0]}..{result['seeds'][1]}"
    ]
    for name in ("lerobot_eval", "evaluate_policies"):
        r = result[name]
        lines.append(
            f"{name:<18} success {r['success_rate']:.3f}  95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}"
            f"  ({r['episodes']} episodes)"
        )
    d = result["paired"]
    lines.append(
        f"lerobot-eval - evaluate_policies: {d['difference']:+.3f} (95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}), "
        f"McNemar p = {d['p_value']:.4f}"
    )
    inside = result["lerobot_eval_within_evaluate_policies_ci"]
    lines.append(f"lerobot-eval's rate {'lies' if inside else 'does NOT lie'} within evaluate_policies' 95% interval")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("policy", help="a LeRobot SmolVLA folder (e.g. the exported student) or a run folder of ours")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=10, help="episodes side by side, in both loops")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = agreement(args.policy, args.episodes, args.batch_size)
    print(report(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["lerobot_eval_within_evaluate_policies_ci"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
