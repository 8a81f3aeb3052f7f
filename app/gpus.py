"""The machine's GPUs as nvidia-smi reports them (no CUDA initialisation in the dashboard)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

QUERY = [
    "nvidia-smi",
    "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu",
    "--format=csv,noheader,nounits",
]
CPU = "cpu"


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_mib: float | None
    memory_used_mib: float | None
    utilization_pct: float | None

    @property
    def label(self) -> str:
        """``GPU 0 · NVIDIA H100 · 1.2/79.6 GiB · 3%`` (unknown values as ``?``)."""
        def gib(mib):
            return "?" if mib is None else f"{mib / 1024:.1f}"

        util = "?" if self.utilization_pct is None else f"{self.utilization_pct:.0f}%"
        return (f"GPU {self.index} · {self.name} · {gib(self.memory_used_mib)}/{gib(self.memory_total_mib)} GiB"
                f" · {util} busy")


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


def list_gpus(timeout: float = 10.0) -> list[Gpu]:
    """The GPUs nvidia-smi lists; [] when the binary is missing, fails or hangs."""
    try:
        result = subprocess.run(QUERY, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:
        return []
    return parse_nvidia_smi(result.stdout)


def device_choices(gpus: list[Gpu]) -> list[tuple[str, str]]:
    """(label, value) pairs for the device picker: each GPU (value = its index), then CPU."""
    return [(g.label, str(g.index)) for g in gpus] + [("CPU", CPU)]


def resolve_device(value: str | int | None, gpus: list[Gpu]) -> str:
    """Check a device choice and return the child's ``CUDA_VISIBLE_DEVICES`` value.

    ``"cpu"`` → ``""``; ``"0"`` / ``0`` / ``"GPU 0"`` / ``"cuda:0"`` → ``"0"`` if that GPU exists.

    Raises:
        ValueError: unknown text or a GPU index nvidia-smi does not list.
    """
    text = str(value if value is not None else "").strip()
    if text.lower() in ("", CPU):
        return ""
    lowered = text.lower()
    for prefix in ("gpu", "cuda:", "cuda"):
        if lowered.startswith(prefix):
            lowered = lowered[len(prefix):].strip()
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
    return str(index)


def device_label(cuda_visible_devices: str | None) -> str:
    """How the runs table names a device: ``CPU``, ``GPU 0``, or ``—`` when unknown."""
    if cuda_visible_devices is None:
        return "—"
    return "CPU" if cuda_visible_devices == "" else f"GPU {cuda_visible_devices}"
