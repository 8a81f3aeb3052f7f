"""Processes and devices: which device a run uses, which process this is, and waiting for rank 0.

A run is one process (``python -m reflow_exp.run``) or N processes started by a launcher
(``torchrun --nproc_per_node N -m reflow_exp.run ...`` or ``accelerate launch ...``), which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Each process then
uses one device: ``cuda:<LOCAL_RANK>`` when CUDA is visible, else the CPU (gloo). accelerate's
``PartialState`` joins the process group and picks the device; the ``Accelerator`` the trainer
makes later shares that state.

Batch sizes are per process: the global batch is batch × N. Random draws during training are
made for the global batch on every process (all processes share one seed, so one random stream)
and each process keeps its own rows (``rank_rows``); means over valid entries are taken over the
global batch (``global_mean``). So N processes with batch B compute what one process with batch
N×B computes. Rank 0 alone writes the run folder (``reflow_exp.run``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
from torch import Tensor

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo: long pair generation or saves must fit


class UnreachableError(RuntimeError):
    """This process could not join the process group (rank 0 unreachable or not started)."""


def launched_world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True for rank 0, the process that writes the run folder (and for a single process)."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait until every process got here (no-op for a single process)."""
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, then the others: for work that fills a shared cache (a dataset
    written or downloaded once), which the others then only read."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def check_devices() -> None:
    """Refuse a ``CUDA_VISIBLE_DEVICES`` that names GPUs CUDA cannot see, before anything is built.

    Without this check a wrong index silently falls back to the CPU. ``CUDA_VISIBLE_DEVICES=""``
    means the CPU on purpose.

    Raises:
        ValueError: naming the variable, what CUDA sees, and the fix.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return
    wanted = [v.strip() for v in visible.split(",") if v.strip()]
    found = torch.cuda.device_count()
    if found < len(wanted):
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES={visible} names {len(wanted)} GPU(s) but CUDA sees {found}: an index does "
            "not exist on this machine (list them with nvidia-smi) or the driver is missing. Use indices that "
            "nvidia-smi lists, or CUDA_VISIBLE_DEVICES= (empty) for the CPU."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= found:
        raise ValueError(
            f"process {local_rank} on this machine has no GPU: CUDA sees {found} (CUDA_VISIBLE_DEVICES={visible}). "
            f"Start at most {found} processes per machine (torchrun --nproc_per_node {found})."
        )


def start(timeout_s: float = DEFAULT_TIMEOUT_S):
    """Join the launcher's process group (if any) and pick this process's device.

    ``timeout_s`` bounds the wait to reach rank 0 and every later wait for the other processes.

    Returns:
        accelerate's ``PartialState`` (``.device``, ``.process_index``, ``.num_processes``).

    Raises:
        UnreachableError: rank 0 could not be reached within ``timeout_s``.
    """
    from accelerate import PartialState

    if launched_world_size() == 1:
        return PartialState()
    # accelerate only picks its CPU multi-process mode (gloo) when told it runs on the CPU.
    cpu = not torch.cuda.is_available()
    try:
        with _cpp_logs_held_back():
            state = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError) as error:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        rank = os.environ.get("RANK", "?")
        n = launched_world_size()
        what = (
            f"rank 0 of {n}: the other processes did not join it"
            if rank == "0"
            else f"rank {rank} of {n} could not reach rank 0"
        )
        raise UnreachableError(
            f"{what} at {where} "
            f"within {timeout_s:.0f} s ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Is every process running, and are MASTER_ADDR/MASTER_PORT (or --main_process_ip/--main_process_port) "
            "right and reachable? The wait is run.dist_timeout_s."
        ) from error
    _PEERS[:] = _gather_peers()
    return state


@contextlib.contextmanager
def _cpp_logs_held_back() -> Iterator[None]:
    """Hold back what C++ writes to stderr (file descriptor 2) while the process group forms: each
    failed connection try logs a ~18-line C++ stack there, before our one-line message. On success
    it is written out as it came; on failure it is dropped (the message quotes the error)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield  # an error skips the write below: its C++ noise is dropped
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        sys.stderr.write(held.read().decode("utf-8", errors="replace"))


_PEERS: list[tuple[int, str, int]] = []  # (rank, host, pid) of every process, gathered at start


def _gather_peers() -> list[tuple[int, str, int]]:
    """Every process's (rank, host name, pid), so a survivor can tell which process died."""
    peers: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(peers, (torch.distributed.get_rank(), socket.gethostname(), os.getpid()))
    return peers


def dead_peers() -> list[tuple[int, int]]:
    """(rank, pid) of the other processes of this run on this machine that are no longer alive
    (zombies count as dead): when a collective fails or the launcher stops us, the cause."""
    import psutil

    dead = []
    for rank, host, pid in _PEERS:
        if host != socket.gethostname() or pid == os.getpid():
            continue
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if not alive:
            dead.append((rank, pid))
    return dead


def stop() -> None:
    """Leave the process group (quietly ends NCCL/gloo before the interpreter exits)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    """This process's device (``start`` picks it; a plain process gets accelerate's default)."""
    from accelerate import PartialState

    chosen = PartialState().device
    return torch.device("cpu") if chosen.type == "cpu" else chosen  # accelerate says cpu:<rank> on gloo


def describe() -> str:
    """The device(s) a run will use, without joining a process group (for dry runs and logs)."""
    n = launched_world_size()
    processes = f"{n} process{'es' if n > 1 else ''}"
    if not torch.cuda.is_available():
        return f"cpu, {processes}" + (" (gloo)" if n > 1 else "")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    name = torch.cuda.get_device_name(0)
    bf16 = "bf16 supported" if torch.cuda.is_bf16_supported() else "no bf16"
    return f"cuda ({name}, {bf16}), {processes}, CUDA_VISIBLE_DEVICES={visible}"


def device_record() -> dict:
    """What summary.json records about where the run ran (the dashboard's Device column reads it
    for runs started from the command line): ``{"device": "cpu"|"cuda", "cuda_visible_devices",
    "processes", "description"}``."""
    cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if cuda else "cpu",
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES") if cuda else "",
        "processes": launched_world_size(),
        "description": describe(),
    }


def check_mixed_precision(mixed_precision: str) -> None:
    """Refuse a mixed precision this machine's device cannot run, with the fix (no CUDA context made
    beyond the query).

    Raises:
        ValueError: bf16 on a CUDA GPU without bf16 (before Ampere), or fp16 without a GPU.
    """
    cuda = torch.cuda.is_available()
    if mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"Trainer.mixed_precision='bf16' needs a GPU with bfloat16 support, but {torch.cuda.get_device_name()} "
            "has none (bf16 needs compute capability >= 8.0, e.g. A100, H100, RTX 30xx). "
            "Use Trainer.mixed_precision='fp16' or 'no'."
        )
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("Trainer.mixed_precision='fp16' needs a CUDA GPU; on the CPU use 'bf16' or 'no'.")


def shard(dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
    """This process's share of ``dataset``: every N-th item from its rank (the whole set for one process)."""
    rank, world = rank_and_world()
    if world == 1:
        return dataset
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world))


def rank_rows(draw: Callable[[int], Tensor], batch_size: int) -> Tensor:
    """``draw(n)`` for the global batch (N × ``batch_size`` rows), keeping this process's rows.

    Every process shares one random stream, so this keeps them in step and gives each its own
    samples; one process with batch N×B gets exactly the same numbers.
    """
    rank, world = rank_and_world()
    if world == 1:
        return draw(batch_size)
    return draw(batch_size * world)[rank * batch_size : (rank + 1) * batch_size]


def global_mean(sums: Tensor, counts: Tensor) -> Tensor:
    """``sums.sum() / counts.sum()`` over the global batch, as this process's share of the loss.

    A loss that averages over valid entries (LeRobot's: padded chunk steps do not count) is not
    the mean of per-process means when processes hold different numbers of valid entries. Each
    process divides its sum by the global count and multiplies by N, so DDP's average of the N
    gradients (and the mean of the N logged values) is exactly that of the global mean.
    """
    world = rank_and_world()[1]
    total = counts.sum().detach().to(sums.dtype)
    if world > 1:
        torch.distributed.all_reduce(total)
    return sums.sum() / total * world
