"""The MetaWorld benchmark: record -> teacher -> reflow -> eval, timed, into runs/bench/metaworld.json.

`python -m reflow_exp.bench metaworld [--gin_param 'X=Y' ...]` records the scripted-expert data
(gin/metaworld/data.gin), trains the teacher (teacher.gin), distils the student (reflow.gin) and
rolls both out on every task (eval.gin), each job a `python -m reflow_exp.run` process with its run
folder under `<out>/metaworld/`. A `--gin_param` binding goes to every stage (e.g. a shorter
`Trainer.steps` for a trial), or with a stage prefix to that stage only ("reflow:reflow.batch_size=8";
stages: record, teacher, reflow, eval). A run folder that exists is resumed (the run's own rule), so a stage
time then covers only the remaining work: delete the folder for a fresh timing.

metaworld.json: {"tasks": {task: {"teacher": {steps: metrics}, "student": {...}}}, "mean": {...},
"paired": {...}, "targets": {...}, "stage_s": {"record", "teacher", "reflow", "eval"}, "expert":
the recording's report, "machine": ...}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from reflow_exp.bench import common

STAGES = {"teacher": "metaworld/teacher.gin", "reflow": "metaworld/reflow.gin", "eval": "metaworld/eval.gin"}
# Issue 13's targets, on the mean over tasks.
TARGETS = {
    "teacher@10 >= 0.6": lambda mean: mean["teacher"]["10"]["success_rate"] >= 0.6,
    "student@1 >= 0.95 x teacher@10": lambda mean: (
        mean["student"]["1"]["success_rate"] >= 0.95 * mean["teacher"]["10"]["success_rate"] - 1e-9
    ),
    "student@1 >= teacher@1": lambda mean: mean["student"]["1"]["success_rate"] >= mean["teacher"]["1"]["success_rate"],
}


def run(out: Path, gin_params: list[str]) -> dict:
    """All four stages; returns (and the caller writes) metaworld.json's content."""
    runs_dir = out / "metaworld"
    machine_before = common.machine_info()
    stage_s = {}
    start = time.perf_counter()
    expert = record(for_stage("record", gin_params))
    stage_s["record"] = time.perf_counter() - start
    teacher, reflow_run = runs_dir / "metaworld-teacher", runs_dir / "metaworld-reflow"
    wiring = {
        "teacher": [],
        "reflow": [f'reflow.teacher = "{teacher}"'],
        "eval": [
            f'evaluate_metaworld.policies = {{"teacher": ("{teacher}", [1, 2, 4, 10]), '
            f'"student": ("{reflow_run / "student"}", [1, 2, 4])}}'
        ],
    }
    for stage, gin_file in STAGES.items():
        params = [f'run.runs_dir = "{runs_dir}"', *wiring[stage], *for_stage(stage, gin_params)]
        stage_s[stage] = run_stage(stage, gin_file, params)
    summary = json.loads((runs_dir / "metaworld-eval" / "summary.json").read_text())
    result = {key: summary[key] for key in ("tasks", "mean", "paired", "paired_by_task", "eval_protocol")}
    result["targets"] = {name: bool(test(summary["mean"])) for name, test in TARGETS.items()}
    result |= {
        "stage_s": stage_s,
        "total_s": sum(stage_s.values()),
        "expert": expert,
        "command": common.command_line(),
        "machine": machine_before,
        "load_average_end": common.load_average(),
    }
    print_summary(result)
    return result


def for_stage(stage: str, gin_params: list[str]) -> list[str]:
    """The bindings for `stage`: unprefixed ones and those prefixed "<stage>:" (prefix removed)."""
    chosen = []
    for param in gin_params:
        prefix, _, rest = param.partition(":")
        if prefix.strip() in ("record", *STAGES):
            if prefix.strip() == stage:
                chosen.append(rest)
        else:
            chosen.append(param)
    return chosen


def record(gin_params: list[str]) -> dict:
    """Record (or reuse) the demonstrations with data.gin's settings and `gin_params`, in this process."""
    import gin
    from reflow_exp import jobs
    from reflow_exp.run import GIN_DIR  # importing run also registers every configurable

    gin.clear_config()
    gin.parse_config_files_and_bindings([str(GIN_DIR / "metaworld" / "data.gin")], gin_params)
    try:
        return jobs.metaworld_source().report
    finally:
        gin.clear_config()


def run_stage(stage: str, gin_file: str, params: list[str]) -> float:
    """One `python -m reflow_exp.run` job; its wall time in seconds. A failed job stops the benchmark."""
    command = [sys.executable, "-m", "reflow_exp.run", "--gin_file", gin_file]
    for param in params:
        command += ["--gin_param", param]
    print(f"\n[bench metaworld] {stage}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(command, env=os.environ | {"PYTHONUNBUFFERED": "1"}).returncode
    if code:
        raise RuntimeError(f"the {stage} stage failed (exit code {code}); see its log.txt in its run folder")
    return time.perf_counter() - start


def print_summary(result: dict) -> None:
    rows = []
    for task, heads in [*result["tasks"].items(), ("mean", result["mean"])]:
        for head, by_steps in heads.items():
            for k, m in by_steps.items():
                rows.append(
                    [
                        task,
                        head,
                        k,
                        m["success_rate"],
                        f"{m['ci_low']:.2f}-{m['ci_high']:.2f}",
                        m["mean_length"],
                        m.get("latency_ms", float("nan")),
                    ]
                )
    common.print_table(
        "MetaWorld: success per task and mean",
        ["task", "head", "steps", "success", "95% CI", "length", "latency ms"],
        rows,
    )
    for name, ok in result["targets"].items():
        print(f"  target {name}: {'OK' if ok else 'MISSED'}")
    print("  stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["stage_s"].items()))
