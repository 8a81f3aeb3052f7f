"""Start-up: time and peak RSS until teacher and student are ready to train, each in a fresh process.

- ours: `Policy.from_pretrained(teacher)` (the VLM read once from the checkpoint into one shared
  backbone) + `jobs.builders.student_head` (the student head copies the teacher head, borrows the backbone).
- naive: two `SmolVLAPolicy.from_pretrained(teacher)` (LeRobot as is; the second load is the student,
  a copy of the teacher by way of its checkpoint) + LeRobot's processors, teacher frozen, student in
  training mode. Each `from_pretrained` first builds a randomly initialised SmolVLM.
- naive_no_init: the same two policies without random initialisation: each `SmolVLAPolicy` built on
  the meta device and given the checkpoint's tensors with `load_state_dict(assign=True)` (the file
  read twice). `*_no_random_init` ratios compare ours with it: what loading once buys by itself.

Each child imports the same modules (torch, LeRobot's SmolVLA, reflow_exp) before its clock starts;
`load_s` is from there to "ready", `process_s` the whole child process as the parent saw it
(interpreter start, imports, exit). "Ready" includes reading every weight once (`_touch`): our loader
maps the checkpoint and pages weights in lazily, a first training step would read them all. Peak
RSS is `ru_maxrss` inside the child. VLM loads are counted by `models.VlmLoadCounter` in both
children alike (ours also reports `vlm_load_count()`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from reflow_exp.bench import common

TARGETS = {
    "time_ratio": ("<=", 0.55),
    "memory_ratio": ("<=", 0.65),
    "memory_ratio_no_random_init": ("<=", 0.55),
    "load_count_ours": ("==", 1),
    "load_count_naive": ("==", 2),
}
RESULT_PREFIX = "BENCH_CHILD "
SIDES = ("ours", "naive", "naive_no_init")


def run(size: str, repeats: int, cache: Path, device: str = "cpu", budget_s: float | None = None) -> dict:
    """Fresh `ours`, `naive` and `naive_no_init` children, `repeats` times in rotating order (no new
    repeat after `budget_s`); medians and ratios."""
    from reflow_exp.bench.models import get_size, teacher_checkpoint

    checkpoint = teacher_checkpoint(get_size(size), cache)
    _read_through(checkpoint / "model.safetensors")  # both sides start from a warm page cache
    machine = common.machine_info()
    runs, start = {side: [] for side in SIDES}, time.perf_counter()
    for r in range(repeats):
        if common.out_of_budget(r, repeats, start, budget_s):
            break
        shift = r % len(SIDES)
        for side in SIDES[shift:] + SIDES[:shift]:
            runs[side].append(_spawn(side, checkpoint, device))
    med = {side: {key: common.median([x[key] for x in runs[side]]) for key in runs[side][0]} for side in SIDES}
    result = {
        "bench": "startup",
        "size": size,
        "device": device,
        "repeats": len(runs["ours"]),
        "checkpoint": str(checkpoint),
        "time_ratio": common.ratio(med["ours"]["load_s"], med["naive"]["load_s"]),
        "time_ratio_process": common.ratio(med["ours"]["process_s"], med["naive"]["process_s"]),
        "time_ratio_cpu": common.ratio(med["ours"]["load_cpu_s"], med["naive"]["load_cpu_s"]),
        "memory_ratio": common.ratio(med["ours"]["peak_rss_gb"], med["naive"]["peak_rss_gb"]),
        "memory_ratio_above_imports": common.ratio(
            med["ours"]["peak_rss_gb"] - med["ours"]["import_rss_gb"],
            med["naive"]["peak_rss_gb"] - med["naive"]["import_rss_gb"],
        ),
        "time_ratio_no_random_init": common.ratio(med["ours"]["load_s"], med["naive_no_init"]["load_s"]),
        "memory_ratio_no_random_init": common.ratio(med["ours"]["peak_rss_gb"], med["naive_no_init"]["peak_rss_gb"]),
        "memory_ratio_no_random_init_above_imports": common.ratio(
            med["ours"]["peak_rss_gb"] - med["ours"]["import_rss_gb"],
            med["naive_no_init"]["peak_rss_gb"] - med["naive_no_init"]["import_rss_gb"],
        ),
        "load_count_ours": int(med["ours"]["vlm_loads"]),
        "load_count_naive": int(med["naive"]["vlm_loads"]),
        "load_count_naive_no_init": int(med["naive_no_init"]["vlm_loads"]),
        "median": med,
        "runs": runs,
        "machine": machine | {"load_average_end": common.load_average()},
        "command": common.command_line(),
    }
    result["met"] = common.check(TARGETS, result)
    keys = [
        "load_s",
        "load_cpu_s",
        "vlm_random_init_s",
        "process_s",
        "import_s",
        "peak_rss_gb",
        "import_rss_gb",
        "vlm_loads",
    ]
    rows = [
        [
            key,
            *(med[side][key] for side in SIDES),
            common.ratio(med["ours"][key], med["naive"][key]),
            common.ratio(med["ours"][key], med["naive_no_init"][key]),
        ]
        for key in keys
    ]
    common.print_table(
        f"startup ({size}, {device}, median of {result['repeats']})",
        ["", *SIDES, "ours/naive", "ours/naive_no_init"],
        rows,
        TARGETS,
        result["met"],
    )
    return result


def _spawn(side: str, checkpoint: Path, device: str) -> dict:
    """One fresh child process; its measurements plus the wall time the parent saw."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "reflow_exp.bench.startup", side, str(checkpoint), device],
        capture_output=True,
        text=True,
        env=env,
    )
    process_s = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"startup child '{side}' failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX)) | {"process_s": process_s}


def _read_through(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# ----------------------------------------------------------------------------- the child process
def child(side: str, checkpoint: str, device: str) -> dict:
    """Import, then load `side`'s teacher and student; report times, memory and VLM loads."""
    import resource

    t0 = time.perf_counter()
    import torch  # noqa: F401  (the same imports on both sides, before the clock starts)
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from reflow_exp.backbone import vlm_load_count
    from reflow_exp.bench.models import VlmLoadCounter
    from reflow_exp.jobs.builders import student_head
    from reflow_exp.policy import Policy
    from reflow_exp.torch_utils import count_params

    t1, cpu1, import_rss = time.perf_counter(), time.process_time(), _rss_gb()
    counter = VlmLoadCounter().install()
    if side == "ours":
        teacher = Policy.from_pretrained(checkpoint)
        teacher.head.requires_grad_(False)
        student = student_head(teacher, student_steps=1, freeze_vision_encoder=None)
        student.train()
        models = [teacher.backbone, teacher.head, student]
    elif side == "naive":
        teacher = SmolVLAPolicy.from_pretrained(checkpoint).requires_grad_(False)
        student = SmolVLAPolicy.from_pretrained(checkpoint)
        student.config.num_steps = 1
        student.train()
        make_pre_post_processors(teacher.config, pretrained_path=checkpoint)
        models = [teacher, student]
    elif side == "naive_no_init":
        teacher = _lerobot_without_random_init(checkpoint).requires_grad_(False)
        student = _lerobot_without_random_init(checkpoint)
        student.config.num_steps = 1
        student.train()
        make_pre_post_processors(teacher.config, pretrained_path=checkpoint)
        models = [teacher, student]
    else:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    for model in models:
        model.to(device)
        _touch(model)
    if device != "cpu":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    result = {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "load_cpu_s": time.process_time() - cpu1,
        "import_rss_gb": import_rss,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "vlm_loads": counter.count,
        "vlm_random_init_s": counter.init_s,
        "trainable": count_params(student, trainable_only=True),
    }
    if side == "ours":
        result["vlm_load_count"] = vlm_load_count()
    if device != "cpu":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _lerobot_without_random_init(checkpoint: str):
    """LeRobot's `SmolVLAPolicy` for `checkpoint`, built on the meta device and given the file's
    tensors with `load_state_dict(assign=True)`: the VLM's through SmolVLM's own `load_state_dict` (so
    the load counter sees it), the expert's and projections' through the policy's."""
    from accelerate import init_empty_weights
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from safetensors.torch import load_file

    from reflow_exp.backbone import VLM_PREFIX

    config = PreTrainedConfig.from_pretrained(checkpoint)
    with init_empty_weights(include_buffers=False):
        policy = SmolVLAPolicy(config)
    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    vlm = {k.removeprefix(VLM_PREFIX): v for k, v in state.items() if k.startswith(VLM_PREFIX)}
    policy.model.vlm_with_expert.vlm.load_state_dict(vlm, strict=True, assign=True)
    rest = policy.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(VLM_PREFIX)}, strict=False, assign=True
    )
    if rest.unexpected_keys or any(not k.startswith(VLM_PREFIX) for k in rest.missing_keys):
        raise RuntimeError(f"checkpoint and SmolVLAPolicy differ: {rest}")
    return policy


def _touch(model) -> None:
    """Read every weight once. Our loader maps the checkpoint file and pages weights in lazily; a
    training step reads them all at once, so "ready" means resident on both sides."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(child(*sys.argv[1:4])), flush=True)
