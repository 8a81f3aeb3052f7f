"""Roll out an exported policy through LeRobot's own evaluation loop, on the sandbox's seeds.

    python -m reflow_exp.lerobot_check runs/sandbox-reflow/student --split report --episodes 500 [--ours]
    python -m reflow_exp.lerobot_check runs/sandbox-reflow/student --teacher runs/sandbox-teacher --split report

A new user of a distilled student would load it with LeRobot alone: `SmolVLAPolicy.from_pretrained`,
`make_pre_post_processors` (device override as in `lerobot_eval.py`), and `select_action` with its
action queue. This script does exactly that through `lerobot.scripts.lerobot_eval.rollout` (the loop
`lerobot-eval` runs), on the env seeds our `Evaluator` uses for the same split, seed and layouts,
and prints the success rate with its 95% Wilson interval. `--ours` also runs our Evaluator on the
same seeds, so the two loops can be compared: their intervals should overlap. LeRobot draws its
noise from the global torch generator, seeded here per batch with the batch's first env seed; ours
draws from one generator per env seed. With `--n_envs 1` the two are the same noise and the loops
must agree episode by episode; with batches they agree in distribution only.

`--teacher FOLDER` instead rolls out student@1, student@2 and teacher@1, @2, @10, all through LeRobot's
loop on the same seeds, and applies the sandbox's quality bar (the paired tests included) to them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.envs.utils import freeze_after_episode_end
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.processor import PolicyProcessorPipeline
from lerobot.scripts.lerobot_eval import rollout

from reflow_exp.evaluate import Evaluator, SmolVLAChunkPolicy
from reflow_exp.policy import resolve_policy_folder
from reflow_exp.sandbox import ENV_ID
from reflow_exp.sandbox.task import LAYOUT_SETS, MAX_EPISODE_STEPS, eval_seeds
from reflow_exp.stats import paired_comparison, wilson_interval


def load_lerobot_policy(path: str | Path, device: str = "cpu", num_steps: int | None = None):
    """(policy, preprocessor, postprocessor) as LeRobot loads them, on `device`; `num_steps`
    overrides the saved sampling step count (None: the folder's own)."""
    folder = resolve_policy_folder(path)
    config = PreTrainedConfig.from_pretrained(folder)
    if config.type != "smolvla":
        raise ValueError(f"{folder} holds a '{config.type}' policy; this check loads SmolVLA policies")
    config.device = device
    if num_steps is not None:
        config.num_steps = num_steps
    policy = SmolVLAPolicy.from_pretrained(str(folder), config=config).eval()
    pre, post = make_pre_post_processors(
        config, pretrained_path=str(folder), preprocessor_overrides={"device_processor": {"device": device}}
    )
    return policy, pre, post


def lerobot_rollouts(
    policy, preprocessor, postprocessor, seeds: list[int], n_envs: int = 10
) -> tuple[list[int], list[int]]:
    """Success (0/1) and length (env steps) of each seed's episode, through LeRobot's `rollout`
    (`select_action`), `n_envs` episodes per batch. Each batch seeds torch's global generator
    (LeRobot's noise source) with its first env seed, so a run is reproducible; with `n_envs=1`
    the noise is the very noise our Evaluator draws for that seed."""
    identity = PolicyProcessorPipeline(steps=[]), PolicyProcessorPipeline(steps=[])  # the sandbox's env processors
    successes, lengths = [], []
    for start in range(0, len(seeds), n_envs):
        batch = seeds[start : start + n_envs]
        make = freeze_after_episode_end(lambda: gym.make(ENV_ID, max_episode_steps=MAX_EPISODE_STEPS))
        env = gym.vector.SyncVectorEnv([make for _ in batch])
        try:
            torch.manual_seed(batch[0])
            data = rollout(env, policy, *identity, preprocessor, postprocessor, seeds=list(batch))
        finally:
            env.close()
        # An episode succeeded if it did on any step up to its first `done` (later steps are padding).
        done_at = data["done"].int().argmax(dim=1)  # (B,): `done` is cumulative
        steps = torch.arange(data["success"].shape[1])
        successes += (data["success"] & (steps[None] <= done_at[:, None])).any(dim=1).int().tolist()
        lengths += (done_at + 1).tolist()
    return successes, lengths


def rate(successes: list[int]) -> dict:
    """{"success_rate", "ci_low", "ci_high", "episodes"} of 0/1 outcomes."""
    low, high = wilson_interval(sum(successes), len(successes))
    return {"success_rate": sum(successes) / len(successes), "ci_low": low, "ci_high": high, "episodes": len(successes)}


def check(
    path: str,
    split: str = "report",
    episodes: int = 500,
    seed: int = 0,
    layouts: str = "all",
    num_steps: int | None = None,
    n_envs: int = 10,
    device: str = "cpu",
    ours: bool = False,
) -> dict:
    """Run the check; returns {"protocol", "lerobot": rate + "episode_success", and with `ours`
    "ours" the same and "paired": LeRobot's loop vs ours on the same seeds, "agree": whether the
    two 95% intervals overlap}."""
    seeds = eval_seeds(episodes, seed, split, layouts)  # validates before anything is loaded
    policy, pre, post = load_lerobot_policy(path, device, num_steps)
    steps = policy.config.num_steps
    result = {
        "protocol": {
            "policy": str(path),
            "split": split,
            "seed": seed,
            "layouts": layouts,
            "episodes": episodes,
            "num_steps": steps,
            "n_action_steps": policy.config.n_action_steps,
        },
        "seeds": seeds,
    }
    successes, lengths = lerobot_rollouts(policy, pre, post, seeds, n_envs)
    result["lerobot"] = rate(successes) | {"mean_length": sum(lengths) / len(lengths), "episode_success": successes}
    if ours:
        evaluator = Evaluator(
            episodes=episodes, seed=seed, split=split, layouts=layouts, n_envs=n_envs, videos=0, latency_calls=0
        )
        if evaluator.seeds != seeds:
            raise RuntimeError("our Evaluator chose other seeds than this check; both must use sandbox.task.eval_seeds")
        theirs = evaluator.run(SmolVLAChunkPolicy(policy, pre, post), step_counts=(steps,))[steps]
        result["ours"] = rate(theirs["episode_success"]) | {
            "mean_length": theirs["mean_length"],
            "episode_success": theirs["episode_success"],
        }
        result["paired"] = paired_comparison(successes, theirs["episode_success"])
        result["agree"] = (
            result["lerobot"]["ci_low"] <= result["ours"]["ci_high"]
            and result["ours"]["ci_low"] <= result["lerobot"]["ci_high"]
        )
    return result


TARGET_ROWS = (("student", 1), ("student", 2), ("teacher", 1), ("teacher", 2), ("teacher", 10))


def targets(
    student: str,
    teacher: str,
    split: str = "report",
    episodes: int = 500,
    seed: int = 0,
    layouts: str = "all",
    n_envs: int = 10,
    device: str = "cpu",
) -> dict:
    """TARGET_ROWS through LeRobot's loop on one set of seeds: {"protocol", "rows": {"head@steps":
    rate}, "paired": the three paired comparisons, "quality_bar": `jobs.quality_bar` of them}."""
    from reflow_exp.jobs.report import PAIRS, quality_bar

    seeds = eval_seeds(episodes, seed, split, layouts)
    folders = {"student": student, "teacher": teacher}
    outcomes = {}
    for head, steps in TARGET_ROWS:
        policy, pre, post = load_lerobot_policy(folders[head], device, steps)
        outcomes[(head, steps)] = lerobot_rollouts(policy, pre, post, seeds, n_envs)[0]
        print(f"LeRobot select_action  {head}@{steps}: success {sum(outcomes[head, steps]) / len(seeds):.3f}")
    summary = {head: {} for head in folders}  # {head: {steps: rate}}, as summary.json's `eval`
    for (head, steps), successes in outcomes.items():
        summary[head][str(steps)] = rate(successes)
    rows = {f"{head}@{steps}": r for head, by_steps in summary.items() for steps, r in by_steps.items()}
    paired = {f"{a}@{i} vs {b}@{j}": paired_comparison(outcomes[a, i], outcomes[b, j]) for a, i, b, j in PAIRS}
    return {
        "protocol": {
            "student": student,
            "teacher": teacher,
            "split": split,
            "seed": seed,
            "layouts": layouts,
            "episodes": episodes,
        },
        "rows": rows,
        "paired": paired,
        "quality_bar": quality_bar(summary, paired),
    }


def targets_report(result: dict) -> str:
    """The printed lines of `targets`."""
    lines = [
        f"{name:<12} success {r['success_rate']:.3f}  95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}"
        for name, r in result["rows"].items()
    ]
    lines += [
        f"{name:<24} {d['difference']:+.3f} (95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}), "
        f"McNemar p = {d['p_value']:.4f}"
        for name, d in result["paired"].items()
    ]
    lines.append(
        "Quality bar: "
        + "; ".join(f"{check}: {'PASS' if ok else 'FAIL'}" for check, ok in result["quality_bar"].items())
    )
    return "\n".join(lines)


def report(result: dict) -> str:
    """The printed lines of a check."""
    p = result["protocol"]
    lines = [
        f"{p['policy']} @{p['num_steps']} steps, {p['n_action_steps']} actions per re-plan; "
        f"{p['episodes']} episodes, split {p['split']!r} (seed {p['seed']}), layouts {p['layouts']!r}"
    ]
    for loop in ("lerobot", "ours"):
        if loop in result:
            r = result[loop]
            name = "LeRobot select_action" if loop == "lerobot" else "reflow_exp Evaluator"
            lines.append(f"{name:<22} success {r['success_rate']:.3f}  95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}")
    if "paired" in result:
        d = result["paired"]
        lines.append(
            f"LeRobot - ours: {d['difference']:+.3f} (95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}), "
            f"McNemar p = {d['p_value']:.4f}; intervals {'overlap' if result['agree'] else 'DO NOT overlap'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reflow_exp.lerobot_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("policy", help="a LeRobot SmolVLA folder, or a run folder of ours")
    parser.add_argument("--split", choices=("dev", "report"), default="report")
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed in [0, 1000)")
    parser.add_argument("--layouts", choices=LAYOUT_SETS, default="all")
    parser.add_argument("--num_steps", type=int, default=None, help="sampling steps (default: the policy's own)")
    parser.add_argument("--n_envs", type=int, default=10, help="episodes per batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ours", action="store_true", help="also run reflow_exp's Evaluator on the same seeds")
    parser.add_argument(
        "--teacher",
        default=None,
        help="the teacher folder: roll out student@1,2 and teacher@1,2,10 and apply the quality bar",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.n_envs < 1 or (args.num_steps is not None and args.num_steps < 1):
        parser.error("--episodes, --n_envs and --num_steps must be >= 1")
    if args.teacher is not None:
        if args.ours or args.num_steps is not None:
            parser.error("--teacher runs its own step counts through LeRobot's loop; drop --ours and --num_steps")
        result = targets(
            args.policy, args.teacher, args.split, args.episodes, args.seed, args.layouts, args.n_envs, args.device
        )
        print(targets_report(result))
    else:
        options = {k: v for k, v in vars(args).items() if k not in ("policy", "out", "teacher")}
        result = check(args.policy, **options)
        print(report(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
