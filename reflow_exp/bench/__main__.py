"""Command line: `python -m reflow_exp.bench {startup,train_step,latency,gpu,data,metaworld,footprint} [options]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from reflow_exp.bench import common

DEFAULT_SIZES = {
    "startup": ["real"],
    "train_step": ["tiny", "mid", "real"],
    "latency": ["real"],
    "gpu": ["real"],
    "data": [],
    "metaworld": [],
    "footprint": ["real"],
}  # metaworld: the whole pipeline once (bench/metaworld.py), no sizes
DEFAULT_REPEATS = {"startup": 3, "train_step": 7, "latency": 9, "gpu": 5, "data": 1}
# ratio fields copied to the top of <name>.json from the largest size that ran
HEADLINE = {
    "startup": [
        "time_ratio",
        "memory_ratio",
        "time_ratio_no_random_init",
        "memory_ratio_no_random_init",
        "load_count_ours",
        "load_count_naive",
        "load_count_naive_no_init",
    ],
    "train_step": [
        "step_ratio",
        "step_ratio_same_cache",
        "step_ratio_no_cache",
        "step_ratio_cached_pairs",
        "pair_epochs",
        "cache_bytes_per_frame",
        "cache_build_s_per_frame",
    ],
    "latency": ["end_to_end_ratio", "limit_ratio", "end_to_end_vs_limit", "expert_ratio"],
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reflow_exp.bench", description=__doc__)
    parser.add_argument("name", choices=sorted(DEFAULT_SIZES))
    parser.add_argument(
        "--size",
        nargs="+",
        choices=["tiny", "mid", "real"],
        help="one or more sizes (default: real; train_step: tiny mid real)",
    )
    parser.add_argument("--repeats", type=int, help="alternating repetitions per side (default 3-5)")
    parser.add_argument("--batch", type=int, help="train_step: batch; latency: throughput batch")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="where <name>.json goes")
    parser.add_argument("--cache", type=Path, default=common.DEFAULT_CACHE, help="cached teacher checkpoints")
    parser.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds per size after which no new repeat starts (default 300: a real-size "
        "run ends within 10 minutes on a busy 2-core machine)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (train_step, latency)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own, all cores)")
    parser.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="latency: onnx times the exported graph under ONNX Runtime against PyTorch (writes latency_onnx.json)",
    )
    parser.add_argument("--policy", type=Path, help="latency --runtime onnx: a SmolVLA folder instead of --size's")
    parser.add_argument(
        "--onnx_steps", type=int, nargs="+", default=[1, 10], help="latency --runtime onnx: Euler steps (default 1 10)"
    )
    parser.add_argument("--plot", type=Path, help="latency/gpu: write the latency-vs-steps PNG here")
    parser.add_argument(
        "--gin_param",
        action="append",
        default=[],
        help="metaworld: a binding for every stage, e.g. 'Trainer.steps=100', or for one: "
        "'reflow:reflow.batch_size=8' (repeatable)",
    )
    parser.add_argument(
        "--episodes",
        type=int,
        nargs="+",
        default=[200, 2000],
        help="data: episode counts of the recorded video datasets (default 200 2000)",
    )
    parser.add_argument("--workers", type=int, default=2, help="data: DataLoader workers on both sides (default 2)")
    parser.add_argument("--batches", type=int, default=100, help="data: timed batches per side (default 100)")
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="EPISODES=FOLDER",
        help="data: use this existing dataset for that episode count instead of recording one",
    )
    parser.add_argument("--frames", type=int, default=1_000_000, help="footprint: frames to project to")
    parser.add_argument("--cameras", type=int, default=3, help="footprint: cameras per frame")
    parser.add_argument("--processes", type=int, default=1, help="footprint: ranks sharing the build")
    args = parser.parse_args(argv)
    if min(args.frames, args.cameras, args.processes) < 1:
        parser.error("--frames, --cameras and --processes must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.size = args.size or DEFAULT_SIZES[args.name]
    args.repeats = args.repeats or DEFAULT_REPEATS.get(args.name, 1)
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--warmup must be >= 0 and --threads >= 1")
    if min(args.episodes) < 1 or args.workers < 0 or args.batches < 1:
        parser.error("--episodes and --batches must be >= 1, --workers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    common.set_argv(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from reflow_exp.bench import gpu, latency, startup, train_step

    if args.name == "metaworld":
        from reflow_exp.bench import metaworld

        path = common.write_result(args.out, "metaworld", metaworld.run(args.out, args.gin_param))
        print(f"\nwrote {path}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.name == "footprint":
        from reflow_exp.bench import footprint

        report = footprint.run(args.size[-1], args.frames, args.cameras, args.processes, args.cache)
        path = common.write_result(
            args.out, "footprint", {"bench": "footprint", "command": common.command_line(), **report}
        )
        print(json.dumps({k: v for k, v in report.items() if k != "tiny_measured"}, indent=2))
        print(f"\nwrote {path}")
        return 0

    if args.name == "data":
        from reflow_exp.bench import data

        roots = {int(n): folder for n, folder in (item.split("=", 1) for item in args.root)}
        report = data.run(
            sorted(set(args.episodes) | set(roots)),
            args.cache,
            batch=args.batch or 32,
            workers=args.workers,
            batches=args.batches,
            roots=roots,
        )
        path = common.write_result(args.out, "data", {"bench": "data", "command": common.command_line(), **report})
        print(f"\nwrote {path}")
        return 0

    results = {}
    for size in args.size:
        if args.name == "startup":
            results[size] = startup.run(size, args.repeats, args.cache, budget_s=args.budget)
        elif args.name == "train_step":
            results[size] = train_step.run(
                size, args.repeats, args.cache, batch=args.batch, budget_s=args.budget, warmup=args.warmup
            )
        elif args.name == "latency" and args.runtime == "onnx":
            results[size] = latency.run_onnx(
                size, args.repeats, args.cache, args.budget, args.warmup, args.policy, tuple(args.onnx_steps)
            )
        elif args.name == "latency":
            results[size] = latency.run(
                size,
                args.repeats,
                args.cache,
                throughput_batch=args.batch,
                plot=args.plot,
                budget_s=args.budget,
                warmup=args.warmup,
            )
        else:
            results[size] = gpu.run(size, args.repeats, args.cache, plot=args.plot)
    last = results[args.size[-1]]
    summary = {
        "bench": args.name,
        "command": common.command_line(),
        **{k: last[k] for k in HEADLINE.get(args.name, []) if k in last},
    }
    if args.name == "gpu":
        summary |= last
    else:
        summary["sizes"] = results
    name = "latency_onnx" if args.name == "latency" and args.runtime == "onnx" else args.name
    path = common.write_result(args.out, name, summary)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
