"""Issue 12's ablation on the development range: each reflow lever alone, then combined.

    .venv/bin/python scripts/ablation.py [--jobs 2] [--episodes 300] [--only NAME ...]

Every variant is `gin/sandbox/reflow.gin` plus its own bindings, run as a `python -m reflow_exp.run`
process in `runs/ablation/<name>` (a finished variant is only re-read, an unfinished one resumed).
The student is rolled out at 1 and 2 steps on the DEVELOPMENT range (the report range is never used
for choosing), and the teacher once at 1, 2 and 10 steps on the same seeds, so every row
is compared with its base and with teacher@10 seed by seed (exact McNemar). Writes
`runs/ablation/ablation.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from reflow_exp.stats import paired_comparison

ROOT = Path("runs/ablation")
TEACHER = "runs/sandbox-teacher"
# name -> bindings over BASELINE (the reflow defaults before the ablation). The first group varies the
# baseline; pairs from teacher@2 won there (and cost about a quarter per step), so the "@2 + ..." group
# varies that instead. The last row combines what helped; it is the default of gin/sandbox/reflow.gin now.
T2 = "OnlineCoupling.teacher_steps = 2"
VARIANTS = {
    "baseline": [],
    "pairs from teacher@2": [T2],  # offline errors are then against teacher@2
    "teacher-visited 200": ["reflow.visited_episodes = 200"],
    "3-RF": ['reflow.teacher = "runs/ablation/baseline/student"'],  # the 2-RF student at 10 steps as teacher
    "@2 + 3000 steps": [T2, "Trainer.steps = 3000"],
    "@2 + lr 1e-3": [T2, "Trainer.lr = 1e-3"],
    "@2 + pseudo-Huber": [T2, "reflow.huber = True"],
    "@2 + uniform t": [T2, "reflow.time_sampler = @uniform"],
    "@2 + beta t": [T2, "reflow.time_sampler = @beta"],
    "@2 + cached K=4": [
        "reflow.coupling = @CachedCoupling()",
        "CachedCoupling.pairs_per_sample = 4",
        "CachedCoupling.teacher_steps = 2",
    ],
    "@2 + no image cache": [T2, "reflow.image_embedding_cache = False"],  # issue 15: only speed may change
    "@2 + 3000 steps + lr 1e-3 + pseudo-Huber": [
        T2,
        "Trainer.steps = 3000",
        "Trainer.lr = 1e-3",
        "reflow.huber = True",
    ],
}


def reference(name: str) -> str:
    """The run a variant is compared with: its group's base."""
    return "pairs from teacher@2" if name.startswith("@2 +") else "baseline"


BASELINE = [
    "reflow.coupling = @OnlineCoupling()",
    "OnlineCoupling.teacher_steps = 10",
    "Trainer.steps = 1000",
    "Trainer.lr = 3e-4",
    "reflow.time_sampler = @u_shaped",
    "reflow.huber = False",
]
EVAL = ['Evaluator.split = "dev"', "Evaluator.videos = 0", "Evaluator.latency_calls = 0"]
REFLOW = [
    *BASELINE,
    "reflow.teacher_eval_steps = ()",
    "reflow.student_eval_steps = (1, 2)",
    f'reflow.teacher = "{TEACHER}"',
]


def folder(name: str) -> str:
    return name.replace(" ", "_").replace("=", "").replace("/", "-")


def run_job(gin_file: str, name: str, bindings: list[str], log: Path) -> float:
    """One `python -m reflow_exp.run` process with one OpenMP thread (two share the 2 cores); seconds.
    A run whose rollouts are already in its summary.json is not run again (0 s)."""
    summary = ROOT / name / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("eval"):
        return 0.0
    command = [
        sys.executable,
        "-m",
        "reflow_exp.run",
        "--gin_file",
        gin_file,
        "--gin_param",
        f'run.runs_dir = "{ROOT}"',
        "--gin_param",
        f'run.name = "{name}"',
    ]
    for binding in bindings:
        command += ["--gin_param", binding]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise RuntimeError(f"{name} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def outcomes(run: Path, head: str, steps: int) -> list[bool]:
    return json.loads((run / "eval_episodes.json").read_text())[head][str(steps)]["success"]


def row(name: str, teacher: Path) -> dict:
    run = ROOT / folder(name)
    summary = json.loads((run / "summary.json").read_text())
    result = {
        "bindings": VARIANTS[name],
        "steps_per_s": summary["train"]["steps_per_s"],
        "offline_ratio": summary["offline"]["student"]["1"]["error"] / summary["offline"]["teacher"]["1"]["error"],
    }
    for k in (1, 2):
        result[f"student@{k}"] = {
            key: summary["eval"]["student"][str(k)][key] for key in ("success_rate", "ci_low", "ci_high")
        }
    student1 = outcomes(run, "student", 1)
    result["vs teacher@10"] = paired_comparison(student1, outcomes(teacher, "teacher", 10))
    if name != reference(name):
        result["reference"] = reference(name)
        result["vs reference"] = paired_comparison(student1, outcomes(ROOT / folder(reference(name)), "student", 1))
    return result


def markdown(rows: dict, teacher: dict) -> str:
    lines = [
        "| variant | student@1 (95% CI) | vs its base (p) | vs teacher@10 (p) | student@2 | offline ratio | steps/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        s1, s2 = r["student@1"], r["student@2"]
        base = r.get("vs reference")
        base_text = f"{base['difference']:+.3f} ({base['p_value']:.3f})" if base else "—"
        t10 = r["vs teacher@10"]
        lines.append(
            f"| {name} | {s1['success_rate']:.3f} ({s1['ci_low']:.3f}–{s1['ci_high']:.3f}) | {base_text} "
            f"| {t10['difference']:+.3f} ({t10['p_value']:.3f}) | {s2['success_rate']:.3f} "
            f"| {r['offline_ratio']:.3f} | {r['steps_per_s']:.2f} |"
        )
    teacher_text = ", ".join(f"teacher@{k} {m['success_rate']:.3f}" for k, m in teacher.items())
    return "\n".join(lines) + f"\n\nSame seeds: {teacher_text}."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="variants trained side by side (default 2)")
    parser.add_argument(
        "--episodes",
        type=int,
        default=300,
        help="dev-range rollouts per row (default 300)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(VARIANTS),
        help="run these variants (and their bases)",
    )
    args = parser.parse_args()
    names = [n for n in (args.only or VARIANTS) if n != "baseline"]
    names = list(dict.fromkeys(["baseline", *(reference(n) for n in names), *names]))
    ROOT.mkdir(parents=True, exist_ok=True)
    episodes = f"Evaluator.episodes = {args.episodes}"
    teacher_name = "teacher-dev"
    jobs = [
        (
            "gin/sandbox/eval.gin",
            teacher_name,
            [
                episodes,
                *EVAL,
                f'evaluate_policies.policies = {{"teacher": ("{TEACHER}", [1, 2, 10])}}',
            ],
        )
    ]
    jobs += [("gin/sandbox/reflow.gin", folder(n), [*EVAL, *REFLOW, episodes, *VARIANTS[n]]) for n in names]
    with ThreadPoolExecutor(args.jobs) as pool:
        seconds = list(pool.map(lambda job: run_job(*job, ROOT / f"{job[1]}.log"), jobs))
    print(
        "wall seconds per job:",
        dict(zip([j[1] for j in jobs], [round(s) for s in seconds])),
    )
    teacher_run = ROOT / teacher_name
    teacher = json.loads((teacher_run / "summary.json").read_text())["eval"]["teacher"]
    rows = {name: row(name, teacher_run) for name in names}
    (ROOT / "ablation.json").write_text(
        json.dumps(
            {
                "episodes": args.episodes,
                "split": "dev",
                "teacher": teacher,
                "variants": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(markdown(rows, teacher))
    return 0


if __name__ == "__main__":
    sys.exit(main())
