"""Light helpers shared by the benchmarks: timing, alternation, tables, machine info, result files.

Nothing here imports torch at module level: the start-up benchmark's child process imports this
before it starts its clock.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from reflow_exp.files import write_json_atomic

DEFAULT_OUT = Path("runs/bench")
DEFAULT_CACHE = DEFAULT_OUT / "cache"


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call of `fn`, with `sync()` before and
    after (e.g. CUDA's synchronize). CPU time adds up all threads, their spin-waits included: a
    cross-check of the wall-time ratios, not a measure free of the machine's load."""
    if sync:
        sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if sync:
        sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def alternate(
    fns: dict[str, Callable[[], object]], repeats: int, sync=None, budget_s: float | None = None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every function once per repeat: ({name: wall seconds}, {name: CPU seconds}). The order
    rotates each repeat, so with two sides each goes first half of the time and slow drift in the
    machine's load hits both alike.

    `budget_s`: start no new repeat once this many seconds have passed (at least one repeat runs);
    the lists' length says how many ran.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    start = time.perf_counter()
    for r in range(repeats):
        if out_of_budget(r, repeats, start, budget_s):
            break
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            w, c = timed(fns[name], sync)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def out_of_budget(r: int, repeats: int, start: float, budget_s: float | None) -> bool:
    """Whether repeat `r` (0-based) must not start: `budget_s` seconds have passed since `start`
    (a `time.perf_counter()` value). The first repeat always runs; saying so when it stops."""
    if r == 0 or budget_s is None or time.perf_counter() - start <= budget_s:
        return False
    print(f"  (time budget of {budget_s:.0f} s reached: {r} of {repeats} repeats ran)")
    return True


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of per-repeat ratios: the two sides of one repeat ran back to back, under one load."""
    return median([ratio(a, b) for a, b in zip(numerators, denominators)])


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other processes on the machine show up here)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """What the numbers were measured on; the load average is taken now (call at start and end)."""
    import torch  # only the parent calls this, after its own imports

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_total_gb": memory_total_gb(),
        "load_average": load_average(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


_argv: list[str] | None = None  # set by __main__.main: in-process callers (tests) have another sys.argv


def set_argv(argv: list[str] | None) -> None:
    global _argv
    _argv = list(argv) if argv is not None else sys.argv[1:]


def command_line() -> str:
    """The command as a user would type it."""
    return "python -m reflow_exp.bench " + " ".join(sys.argv[1:] if _argv is None else _argv)


def write_result(out_dir: Path, name: str, result: dict) -> Path:
    """Write `<out_dir>/<name>.json` (atomically) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    write_json_atomic(path, result)
    return path


def check(targets: dict[str, tuple[str, float]], values: dict[str, float]) -> dict[str, bool]:
    """{name: value meets its target} for targets {name: ("<=" | ">=" | "==", bound)}."""
    ops = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "==": lambda a, b: a == b}
    return {name: bool(ops[op](values[name], bound)) for name, (op, bound) in targets.items()}


def print_table(title: str, header: list[str], rows: list[list], targets: dict | None = None, met=None) -> None:
    """A plain aligned text table, then one line per target with OK / MISSED."""
    cells = [[_fmt(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    for name, (op, bound) in (targets or {}).items():
        status = "OK" if met and met.get(name) else "MISSED"
        print(f"  target {name} {op} {bound}: {status}")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)
