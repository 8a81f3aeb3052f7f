"""Action-chunk latency at batch 1, split into the prefix pass and the expert's Euler steps.

Timed, alternating, medians (seconds):
- `prefix`: vision encoder + VLM over image, language and state (`prefix.encode` + `prefix.extend`),
  and `vision`, its image part alone (resize, SigLIP encoder, connector);
- `expert <head>@k`: k Euler steps of a head on a ready prefix (`prefix.sample`): teacher@10 and
  student@1, 2, 4 (the two heads have the same architecture, so only k matters);
- `chunk <head>@k`: a whole chunk, prefix included, for teacher@10 and student@1;
- `lerobot@1`, `lerobot@10`: LeRobot's own `predict_action_chunk` on the same weights, once each
  after the repeats (a reference, and a gauge of the machine against LeRobot numbers seen elsewhere).

The headline is `end_to_end_ratio` (student@1 chunk / teacher@10 chunk) against the physical limit
of a 1-step student, `limit_ratio` = (prefix + 1 step) / (prefix + 10 steps), one step being a tenth
of teacher@10's expert time; the goal is within 5 % of it (`end_to_end_vs_limit`). `expert_ratio`
(1 expert step against 10 of the same network, about 0.1 by arithmetic) is a sanity check only.
Throughput: chunks per second at a larger batch (median of 2).
CPU-time ratios (`*_cpu`) are reported next to the wall-time ones as a load-robust cross-check.
"""

from __future__ import annotations

from pathlib import Path

from reflow_exp.bench import common

TARGETS = {"end_to_end_vs_limit": ("<=", 0.05)}
SANITY = {"expert_ratio": ("<=", 0.12)}  # 1 step against 10 of the same network: ~0.1 by arithmetic
STUDENT_STEPS = (1, 2, 4)
TEACHER_STEPS = 10
THROUGHPUT_REPEATS = 2


def run(
    size: str,
    repeats: int,
    cache: Path,
    throughput_batch: int | None = None,
    device: str = "cpu",
    amp=None,
    plot: Path | None = None,
    budget_s: float | None = None,
    warmup: int = 1,
) -> dict:
    """Latency split at batch 1 (alternating, `warmup` untimed rounds, no new repeat after `budget_s`),
    then LeRobot's own chunk at 1 and 10 steps once each, and throughput at `throughput_batch`."""
    import torch

    from reflow_exp.bench.models import get_size, load_ours, make_batch
    from reflow_exp.torch_utils import autocast

    spec = get_size(size)
    machine = common.machine_info()
    teacher, student = load_ours(spec, cache, device)
    student.eval()
    sync = torch.cuda.synchronize if device != "cpu" else None
    big = throughput_batch or spec.throughput_batch
    with torch.inference_mode(), autocast(device, amp):
        fns = _latency_fns(teacher, student, make_batch(teacher.config, spec, 1, device=device))
        reference = {name: fns.pop(name) for name in [n for n in fns if n.startswith("lerobot")]}
        for _ in range(warmup):
            common.alternate(fns, 1, sync)
        times, cpu = common.alternate(fns, repeats, sync, budget_s)
        lerobot, _ = common.alternate(reference, 1, sync)
        many = _latency_fns(teacher, student, make_batch(teacher.config, spec, big, device=device))
        chunks = {name: fn for name, fn in many.items() if name.startswith("chunk")}
        throughput_times, _ = common.alternate(chunks, THROUGHPUT_REPEATS, sync)
    med = {name: common.median(t) for name, t in (times | lerobot).items()}
    med_cpu = {name: common.median(t) for name, t in cpu.items()}
    t10 = f"teacher@{TEACHER_STEPS}"
    step_s = med[f"expert {t10}"] / TEACHER_STEPS
    limit = (med["prefix"] + step_s) / (med["prefix"] + TEACHER_STEPS * step_s)
    e2e = med["chunk student@1"] / med[f"chunk {t10}"]
    throughput = {name.removeprefix("chunk "): big / common.median(t) for name, t in throughput_times.items()}
    result = {
        "bench": "latency",
        "size": size,
        "device": device,
        "amp": str(amp),
        "repeats": len(times["prefix"]),
        "warmup": warmup,
        "expert_ratio": med["expert student@1"] / med[f"expert {t10}"],
        "end_to_end_ratio": e2e,
        "limit_ratio": limit,
        "end_to_end_vs_limit": abs(e2e / limit - 1),
        "expert_ratio_cpu": med_cpu["expert student@1"] / med_cpu[f"expert {t10}"],
        "end_to_end_ratio_cpu": med_cpu["chunk student@1"] / med_cpu[f"chunk {t10}"],
        "prefix_s": med["prefix"],
        "expert_step_s": step_s,
        "median_s": med,
        "median_cpu_s": med_cpu,
        "times": times | lerobot,
        "cpu_times": cpu,
        "throughput_batch": big,
        "throughput_chunks_per_s": throughput,
        "throughput_times": throughput_times,
        "throughput_ratio": throughput["student@1"] / throughput[t10],
        "machine": machine | {"load_average_end": common.load_average()},
        "command": common.command_line(),
    }
    result["met"] = common.check(TARGETS, result)
    result["sanity"] = common.check(SANITY, result)
    _print(result)
    if plot:
        plot_latency(result, plot)
    return result


def _latency_fns(teacher, student, batch: dict) -> dict:
    """Named zero-argument functions to time (see the module docstring)."""
    import torch

    from reflow_exp import prefix

    head = teacher.head
    chunk, dim = teacher.config.chunk_size, teacher.config.max_action_dim
    noise = torch.randn(batch["action"].shape[0], chunk, dim, device=batch["action"].device)
    ready = prefix.extend(head, prefix.encode(head, batch), batch)

    def whole(h, k):
        return prefix.sample(h, prefix.extend(h, prefix.encode(h, batch), batch), noise, k)

    fns = {
        "prefix": lambda: prefix.extend(head, prefix.encode(head, batch), batch),
        "vision": lambda: prefix.image_embeddings(head, batch),
    }
    for name, h, k in [("teacher", head, TEACHER_STEPS)] + [("student", student, k) for k in STUDENT_STEPS]:
        fns[f"expert {name}@{k}"] = lambda h=h, k=k: prefix.sample(h, ready, noise, k)
    fns[f"chunk teacher@{TEACHER_STEPS}"] = lambda: whole(head, TEACHER_STEPS)
    fns["chunk student@1"] = lambda: whole(student, 1)
    for k in (1, TEACHER_STEPS):
        fns[f"lerobot@{k}"] = lambda k=k: teacher.predict_action_chunk(dict(batch), noise=noise, num_steps=k)
    return fns


def _print(result: dict) -> None:
    med, p = result["median_s"], result["prefix_s"]
    t10 = med[f"chunk teacher@{TEACHER_STEPS}"]
    rows = [["prefix (vision + VLM)", "", p, "", ""], ["  of which vision encoder", "", med["vision"], "", ""]]
    for name, k in [("teacher", TEACHER_STEPS)] + [("student", k) for k in STUDENT_STEPS]:
        chunk = med.get(f"chunk {name}@{k}")
        expert = med[f"expert {name}@{k}"]
        rows.append([f"{name}@{k}", expert, p + expert, chunk or "", chunk / t10 if chunk else ""])
    for k in (1, TEACHER_STEPS):
        rows.append([f"LeRobot predict_action_chunk@{k}", "", "", med[f"lerobot@{k}"], med[f"lerobot@{k}"] / t10])
    common.print_table(
        f"latency ({result['size']}, batch 1, {result['device']}, median of {result['repeats']}; seconds)",
        ["", "expert", "prefix + expert", "chunk (timed)", "chunk / teacher@10"],
        rows,
    )
    print(
        f"  end_to_end_ratio {result['end_to_end_ratio']:.3f} against limit_ratio {result['limit_ratio']:.3f}"
        f" ({100 * result['end_to_end_vs_limit']:.1f} % off)   sanity: expert_ratio {result['expert_ratio']:.3f}"
    )
    print(
        f"  on CPU time: expert_ratio {result['expert_ratio_cpu']:.3f}   "
        f"end_to_end_ratio {result['end_to_end_ratio_cpu']:.3f}"
    )
    tp = result["throughput_chunks_per_s"]
    print(
        f"  throughput at batch {result['throughput_batch']}: "
        + ", ".join(f"{k} {v:.3f} chunks/s" for k, v in tp.items())
        + f" (x{result['throughput_ratio']:.2f})"
    )
    common.print_table("targets", ["", "value"], [[k, result[k]] for k in TARGETS], TARGETS, result["met"])
    common.print_table("sanity checks", ["", "value"], [[k, result[k]] for k in SANITY], SANITY, result["sanity"])


def plot_latency(result: dict, path: Path) -> Path:
    """Chunk latency against Euler steps: timed chunks, prefix + timed expert steps, the linear model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med, prefix_s, step_s = result["median_s"], result["prefix_s"], result["expert_step_s"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    ks = list(range(1, TEACHER_STEPS + 1))
    ax.plot(ks, [prefix_s + k * step_s for k in ks], "--", color="gray", label="prefix + k × (teacher@10 expert / 10)")
    ax.axhline(prefix_s, color="gray", linestyle=":", label="prefix alone (vision encoder + VLM)")
    ax.plot(
        STUDENT_STEPS,
        [prefix_s + med[f"expert student@{k}"] for k in STUDENT_STEPS],
        "s",
        mfc="none",
        color="tab:orange",
        markersize=9,
        label="student: prefix + expert@k (timed apart)",
    )
    ax.plot([1], [med["chunk student@1"]], "s", color="tab:orange", markersize=7, label="student@1, whole chunk")
    ax.plot(
        [TEACHER_STEPS],
        [med[f"chunk teacher@{TEACHER_STEPS}"]],
        "o",
        color="tab:blue",
        markersize=7,
        label="teacher@10, whole chunk",
    )
    ax.plot(
        [1, TEACHER_STEPS],
        [med["lerobot@1"], med[f"lerobot@{TEACHER_STEPS}"]],
        "x",
        color="black",
        markersize=8,
        label="LeRobot predict_action_chunk",
    )
    machine = result["machine"]
    ax.set(
        xlabel="Euler steps",
        ylabel="seconds per action chunk (batch 1)",
        ylim=(0, None),
        title=f"{result['size']} SmolVLA on {result['device']} ({machine['nproc']} cores, "
        f"load {machine['load_average'][0]:.1f}), median of {result['repeats']}",
    )
    ax.title.set_fontsize(9)
    ax.set_xticks([1, 2, 4, 10])
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- ONNX Runtime against PyTorch (`--runtime onnx`) ---------------------------------------------

ONNX_STEPS = (1, TEACHER_STEPS)


def run_onnx(
    size: str,
    repeats: int,
    cache: Path,
    budget_s: float | None = None,
    warmup: int = 1,
    policy: Path | None = None,
    steps: tuple[int, ...] = ONNX_STEPS,
) -> dict:
    """Chunk latency at batch 1 of the exported graph (`reflow_exp.export`) under ONNX Runtime
    against the same function in PyTorch (`export.ChunkGraph`, same weights, same inputs), for each
    Euler step count in `steps`; alternating, medians. Processors (tokeniser, normalisation) are
    outside both. `policy`: a SmolVLA folder to export (default: the bench's teacher at `size`);
    graphs are cached under `<cache>/onnx/<config digest>-steps<k>`."""
    import torch

    from reflow_exp.bench.models import get_size, teacher_checkpoint
    from reflow_exp.export import ChunkGraph, example_inputs
    from reflow_exp.policy import Policy

    folder = Path(policy) if policy else teacher_checkpoint(get_size(size), cache)
    model = Policy.from_pretrained(folder).eval()
    fns, max_abs_diff = {}, {}
    with model.head.with_vlm_registered() as lerobot_policy, torch.inference_mode():
        for k in steps:
            session, spec = _onnx_session(folder, Path(cache) / "onnx", k)
            inputs = example_inputs(spec, batch=1)
            feeds = {entry["name"]: x.numpy() for entry, x in zip(spec.inputs, inputs)}
            graph = ChunkGraph(lerobot_policy, k).eval()
            fns[f"onnx@{k}"] = lambda s=session, f=feeds: s.run(["actions"], f)
            fns[f"torch@{k}"] = lambda g=graph, x=inputs: g(*x)
            onnx_actions = torch.from_numpy(session.run(["actions"], feeds)[0])
            max_abs_diff[str(k)] = (onnx_actions - graph(*inputs)).abs().max().item()
        for _ in range(warmup):
            common.alternate(fns, 1)
        times, cpu = common.alternate(fns, repeats, budget_s=budget_s)
    med = {name: common.median(t) for name, t in times.items()}
    result = {
        "bench": "latency",
        "runtime": "onnx",
        "size": size if policy is None else "policy",
        "policy": str(folder),
        "repeats": len(next(iter(times.values()))),
        "threads": torch.get_num_threads(),
        "median_s": med,
        "onnx_over_torch": {str(k): med[f"onnx@{k}"] / med[f"torch@{k}"] for k in steps},
        "max_abs_diff": max_abs_diff,  # |ONNX - PyTorch| over the chunk, same inputs (normalised actions)
        "times": times,
        "cpu_times": cpu,
        "machine": common.machine_info(),
        "command": common.command_line(),
    }
    common.print_table(
        f"ONNX Runtime vs PyTorch, whole chunk ({result['size']}, batch 1, CPU, {result['threads']} threads, "
        f"median of {result['repeats']}; seconds)",
        ["", "PyTorch", "ONNX Runtime", "ONNX / PyTorch", "max |Δ action|"],
        [
            [
                f"@{k} steps",
                med[f"torch@{k}"],
                med[f"onnx@{k}"],
                result["onnx_over_torch"][str(k)],
                f"{max_abs_diff[str(k)]:.1e}",
            ]
            for k in steps
        ],
    )
    return result


def _onnx_session(folder: Path, root: Path, num_steps: int):
    """An ONNX Runtime session (as many threads as torch uses) of `folder` exported at `num_steps`,
    exported now unless `root` holds one of the same config.json; and its spec."""
    import torch

    from reflow_exp.export import ONNX_FILE, SPEC_FILE, Spec, export_onnx, file_sha256
    from reflow_exp.onnx_policy import onnxruntime

    ort = onnxruntime()
    out = root / f"{file_sha256(folder / 'config.json')[:16]}-steps{num_steps}"
    if not (out / SPEC_FILE).is_file():
        export_onnx(folder, out, num_steps=num_steps)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(out / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    return session, Spec.load(out / SPEC_FILE)
