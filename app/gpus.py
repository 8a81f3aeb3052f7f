"""The machine's GPUs as nvidia-smi reports them (no CUDA initialisation in the dashboard).

A device choice is the CPU, one GPU index, or several (``"0,1"``): a run on several GPUs is one
process per GPU (torchrun), with ``CUDA_VISIBLE_DEVICES`` set to the selection.
"""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass

QUERY = [
    "nvidia-smi",
    "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu",
    "--format=csv,noheader,nounits",
]
APPS_QUERY = ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader"]
CPU = "cpu"


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_mib: float | None
    memory_used_mib: float | None
    utilization_pct: float | None
    pids: tuple[int, ...] = ()  # compute processes running on it (nvidia-smi --query-compute-apps)

    @property
    def label(self) -> str:
        """``GPU 0 · NVIDIA H100 · 1.2/79.6 GiB · 3%`` (unknown values as ``?``)."""

        def gib(mib):
            return "?" if mib is None else f"{mib / 1024:.1f}"

        util = "?" if self.utilization_pct is None else f"{self.utilization_pct:.0f}%"
        busy = f" · in use by pid {', '.join(map(str, self.pids))}" if self.pids else ""
        return (
            f"GPU {self.index} · {self.name} · {gib(self.memory_used_mib)}/{gib(self.memory_total_mib)} GiB"
            f" · {util} busy{busy}"
        )


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Parse ``nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu
    --format=csv,noheader,nounits`` output. Lines that do not parse are skipped."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6:
            continue
        # A name could contain a comma: index and uuid lead, the three numbers trail.
        index, uuid, *name, total, used, util = parts
        try:
            idx = int(index)
        except ValueError:
            continue
        gpus.append(Gpu(idx, uuid, ", ".join(name), _number(total), _number(used), _number(util)))
    return gpus


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def parse_compute_apps(text: str) -> dict[str, tuple[int, ...]]:
    """``{gpu uuid: (pid, ...)}`` from ``nvidia-smi --query-compute-apps=gpu_uuid,pid --format=csv,noheader``."""
    apps: dict[str, list[int]] = {}
    for line in text.splitlines():
        uuid, _, pid = (p.strip() for p in line.partition(","))
        if uuid and pid.isdigit():
            apps.setdefault(uuid, []).append(int(pid))
    return {uuid: tuple(pids) for uuid, pids in apps.items()}


def list_gpus(timeout: float = 10.0) -> list[Gpu]:
    """The GPUs nvidia-smi lists, with the compute processes on each; [] when the binary is
    missing, fails or hangs."""
    try:
        result = subprocess.run(QUERY, capture_output=True, text=True, timeout=timeout)
        apps = subprocess.run(APPS_QUERY, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:
        return []
    pids = parse_compute_apps(apps.stdout) if apps.returncode == 0 else {}
    return [dataclasses.replace(g, pids=pids.get(g.uuid, ())) for g in parse_nvidia_smi(result.stdout)]


def device_choices(gpus: list[Gpu]) -> list[tuple[str, str]]:
    """(label, value) pairs for the device picker: each GPU (value = its index), all GPUs together
    when there are several (value ``"0,1,..."``; other sets can be typed), then CPU."""
    choices = [(g.label, str(g.index)) for g in gpus]
    if len(gpus) > 1:
        every = ",".join(str(g.index) for g in gpus)
        choices.append((f"All {len(gpus)} GPUs ({every}) · one process each", every))
    return choices + [("CPU", CPU)]


def resolve_device(value: str | int | None, gpus: list[Gpu]) -> str:
    """Check a device choice and return the child's ``CUDA_VISIBLE_DEVICES`` value.

    ``"cpu"`` → ``""``; ``"0"`` / ``0`` / ``"GPU 0"`` / ``"cuda:0"`` → ``"0"`` if that GPU exists;
    ``"0,2"`` → ``"0,2"`` (one process per GPU).

    Raises:
        ValueError: unknown text, a GPU index nvidia-smi does not list, a GPU named twice, or a
            GPU another process computes on.
    """
    text = str(value if value is not None else "").strip()
    if text.lower() in ("", CPU):
        return ""
    if "," in text and "·" not in text:  # several GPUs (a picker label may hold commas in a name)
        indices = [resolve_device(part, gpus) for part in text.split(",") if part.strip()]
        if "" in indices:
            raise ValueError(f"Device {text!r} mixes CPU and GPUs: choose CPU or GPU indices.")
        if len(set(indices)) != len(indices):
            raise ValueError(f"Device {text!r} names a GPU twice: list each GPU once, e.g. 0,1.")
        return ",".join(indices)
    lowered = text.lower()
    for prefix in ("gpu", "cuda:", "cuda"):
        if lowered.startswith(prefix):
            lowered = lowered[len(prefix) :].strip()
            break
    lowered = lowered.split("·")[0].strip()  # a full label was passed
    try:
        index = int(lowered)
    except ValueError:
        raise ValueError(f"Unknown device {text!r}: choose CPU or a GPU index from the list.") from None
    if index not in {g.index for g in gpus}:
        have = ", ".join(str(g.index) for g in gpus)
        where = f"this machine has GPUs {have}" if gpus else "this machine has no GPU (nvidia-smi lists none)"
        raise ValueError(f"GPU {index} does not exist: {where}. Choose CPU or a listed GPU.")
    gpu = next(g for g in gpus if g.index == index)
    if gpu.pids:
        raise ValueError(
            f"GPU {index} is busy: process(es) {', '.join(map(str, gpu.pids))} compute on it "
            "(nvidia-smi). Choose another GPU, or stop those processes first."
        )
    return str(index)


def process_count(cuda_visible_devices: str) -> int:
    """Processes a run starts: one per chosen GPU, one on the CPU."""
    return max(1, len([i for i in cuda_visible_devices.split(",") if i.strip()]))


def device_label(cuda_visible_devices: str | None) -> str:
    """How the runs table names a device: ``CPU``, ``GPU 0``, ``GPUs 0,1 · 2 processes``, or ``—``
    when unknown."""
    if cuda_visible_devices is None:
        return "—"
    if cuda_visible_devices == "":
        return "CPU"
    n = process_count(cuda_visible_devices)
    return f"GPU {cuda_visible_devices}" if n == 1 else f"GPUs {cuda_visible_devices} · {n} processes"
