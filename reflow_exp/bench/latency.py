"""Action-chunk latency at batch 1, split into the prefix pass and the expert's Euler steps.

Measured (all alternating, medians):
- `prefix`: vision encoder + VLM over images, language and state (`prefix.encode` + `prefix.extend`);
- `expert@k`: k Euler steps of the expert on a ready prefix (`prefix.sample`) for teacher@10 and
  student@1, 2, 4;
- `chunk@k`: the whole chunk, prefix included, for the same heads and step counts;
- `lerobot@1` / `lerobot@10`: LeRobot's own `predict_action_chunk` on the same weights, for reference.

The physical limit of a 1-step student is (prefix + one step) / (prefix + ten steps), with the step
cost taken from teacher@10's expert time. Throughput is chunks per second at a larger batch.
"""

from __future__ import annotations

from pathlib import Path

from reflow_exp.bench import common

TARGETS = {"expert_ratio": ("<=", 0.12), "end_to_end_vs_limit": ("<=", 0.10)}
STUDENT_STEPS = (1, 2, 4)
TEACHER_STEPS = 10


def run(size: str, repeats: int, cache: Path, throughput_batch: int | None = None,
        device: str = "cpu", amp=None, plot: Path | None = None) -> dict:
    """Latency split at batch 1 and throughput at `throughput_batch`; optional plot PNG."""
    import torch

    from reflow_exp.bench.models import get_size, load_ours, make_batch

    spec = get_size(size)
    machine = common.machine_info()
    teacher, student = load_ours(spec, cache, device)
    student.eval()
    sync = torch.cuda.synchronize if device != "cpu" else None
    cases = [("teacher", teacher.head, TEACHER_STEPS)] + [("student", student, k) for k in STUDENT_STEPS]
    one = make_batch(teacher.config, spec, 1, device=device)
    with torch.inference_mode(), _autocast(device, amp):
        fns = _latency_fns(teacher, cases, one)
        common.alternate(fns, 1, sync)  # warm-up
        times = common.alternate(fns, repeats, sync)
        big = throughput_batch or spec.throughput_batch
        many = make_batch(teacher.config, spec, big, device=device)
        chunk_fns = {name: fn for name, fn in _latency_fns(teacher, cases[:2], many).items() if name.startswith("chunk")}
        common.alternate(chunk_fns, 1, sync)
        throughput_times = common.alternate(chunk_fns, max(1, repeats // 2), sync)
    med = {name: common.median(t) for name, t in times.items()}
    step_s = med[f"expert teacher@{TEACHER_STEPS}"] / TEACHER_STEPS
    limit = (med["prefix"] + step_s) / (med["prefix"] + TEACHER_STEPS * step_s)
    e2e = med["chunk student@1"] / med[f"chunk teacher@{TEACHER_STEPS}"]
    throughput = {name.removeprefix("chunk "): big / common.median(t) for name, t in throughput_times.items()}
    result = {
        "bench": "latency", "size": size, "device": device, "amp": str(amp), "repeats": repeats,
        "expert_ratio": med["expert student@1"] / med[f"expert teacher@{TEACHER_STEPS}"],
        "end_to_end_ratio": e2e, "limit_ratio": limit, "end_to_end_vs_limit": abs(e2e / limit - 1),
        "prefix_s": med["prefix"], "expert_step_s": step_s, "median_s": med, "times": times,
        "throughput_batch": big, "throughput_chunks_per_s": throughput,
        "throughput_ratio": throughput["student@1"] / throughput[f"teacher@{TEACHER_STEPS}"],
        "machine": machine | {"load_average_end": common.load_average()}, "command": common.command_line(),
    }
    result["met"] = common.check(TARGETS, result)
    _print(result)
    if plot:
        plot_latency(result, plot)
    return result


def _latency_fns(policy, cases, batch: dict) -> dict:
    """Named zero-argument functions to time: prefix, expert@k, chunk@k, LeRobot's own."""
    import torch

    from reflow_exp import prefix

    chunk, dim = policy.config.chunk_size, policy.config.max_action_dim
    noise = torch.randn(batch["action"].shape[0], chunk, dim, device=batch["action"].device)
    shared = prefix.extend(policy.head, prefix.encode(policy.head, batch), batch)

    def whole(head, k):
        return prefix.sample(head, prefix.extend(head, prefix.encode(head, batch), batch), noise, k)

    fns = {"prefix": lambda: prefix.extend(policy.head, prefix.encode(policy.head, batch), batch)}
    for name, head, k in cases:
        fns[f"expert {name}@{k}"] = lambda head=head, k=k: prefix.sample(head, shared, noise, k)
        fns[f"chunk {name}@{k}"] = lambda head=head, k=k: whole(head, k)
    for k in (1, TEACHER_STEPS):
        fns[f"lerobot@{k}"] = lambda k=k: policy.predict_action_chunk(dict(batch), noise=noise, num_steps=k)
    return fns


def _print(result: dict) -> None:
    med = result["median_s"]
    rows = [["prefix (vision + VLM)", med["prefix"], "", ""]]
    for name, k in [("teacher", TEACHER_STEPS)] + [("student", k) for k in STUDENT_STEPS]:
        rows.append([f"{name}@{k}", med[f"expert {name}@{k}"], med[f"chunk {name}@{k}"],
                     med[f"chunk {name}@{k}"] / med[f"chunk teacher@{TEACHER_STEPS}"]])
    for k in (1, TEACHER_STEPS):
        rows.append([f"LeRobot predict_action_chunk@{k}", "", med[f"lerobot@{k}"], ""])
    common.print_table(
        f"latency ({result['size']}, batch 1, {result['device']}, median of {result['repeats']}; seconds)",
        ["", "expert", "chunk", "chunk / teacher@10"], rows)
    print(f"  expert_ratio {result['expert_ratio']:.3f}   end_to_end_ratio {result['end_to_end_ratio']:.3f}"
          f"   limit_ratio {result['limit_ratio']:.3f}")
    tp = result["throughput_chunks_per_s"]
    print(f"  throughput at batch {result['throughput_batch']}: "
          + ", ".join(f"{k} {v:.2f} chunks/s" for k, v in tp.items()) + f" (ratio {result['throughput_ratio']:.2f}x)")
    common.print_table("targets", ["", "value"], [["expert_ratio", result["expert_ratio"]],
                       ["end_to_end_vs_limit", result["end_to_end_vs_limit"]]], TARGETS, result["met"])


def plot_latency(result: dict, path: Path) -> Path:
    """Chunk latency against Euler steps: measured points, prefix floor, prefix + k·step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med, prefix_s, step_s = result["median_s"], result["prefix_s"], result["expert_step_s"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ks = list(range(1, TEACHER_STEPS + 1))
    ax.plot(ks, [prefix_s + k * step_s for k in ks], "--", color="gray", label="prefix + k × expert step")
    ax.axhline(prefix_s, color="gray", linestyle=":", label="prefix alone (vision + VLM)")
    ax.plot(STUDENT_STEPS, [med[f"chunk student@{k}"] for k in STUDENT_STEPS], "s", color="tab:orange",
            label="student (ours)", markersize=8)
    ax.plot([TEACHER_STEPS], [med[f"chunk teacher@{TEACHER_STEPS}"]], "o", color="tab:blue",
            label="teacher (ours)", markersize=8)
    ax.plot([1, TEACHER_STEPS], [med["lerobot@1"], med[f"lerobot@{TEACHER_STEPS}"]], "x", color="black",
            label="LeRobot predict_action_chunk")
    ax.set(xlabel="Euler steps", ylabel="seconds per action chunk (batch 1)", ylim=(0, None),
           title=f"Chunk latency, {result['size']} SmolVLA, {result['device']} "
                 f"({result['machine']['nproc']} cores)")
    ax.set_xticks([1, 2, 4, 10])
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _autocast(device: str, amp):
    import contextlib

    import torch

    return torch.autocast(device_type=device, dtype=amp) if amp is not None else contextlib.nullcontext()
