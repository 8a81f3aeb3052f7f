"""Data loading: our ChunkedFrames against LeRobotDataset + DataLoader as `lerobot-train` builds them.

Sandbox video datasets (two cameras, LeRobot's default codec) of each episode count are recorded
once into the cache. Each (side, episode count) runs in its own process, so its peak RSS (the
process and its DataLoader workers together, sampled every 20 ms) is its own. Both sides read
SmolVLA's default chunk (50 actions) at the same batch size and number of workers; LeRobot's side
uses `lerobot-train`'s defaults for the rest (EpisodeAwareSampler, spawned persistent workers,
prefetch 4), ours `reflow_exp.data.make_dataloader`.

Goals: samples/s of ours >= LeRobot's (at the largest dataset); our peak RSS at the largest
dataset within 10% of the smallest. A third side, `ours_no_cameras`, is our loader as reflow uses it
once the image embedding cache stands in for the camera frames (`data.without_cameras`): what
skipping the decoding buys (`no_cameras_speedup`, no goal).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from reflow_exp.bench import common

REPO = "reflow_exp/sandbox"
CHUNK = 50  # SmolVLA's default chunk_size
SIDES = ("ours", "ours_no_cameras", "lerobot")
TARGETS = {"samples_per_s_ratio": (">=", 1.0), "rss_growth": ("<=", 1.10)}


def run(
    episodes: list[int],
    cache: Path,
    batch: int = 32,
    workers: int = 2,
    batches: int = 100,
    timeout_s: float = 1800,
    roots: dict[int, Path] | None = None,
) -> dict:
    """Record (or reuse) the datasets, measure both sides per episode count; the report.
    `roots`: existing dataset folders to use for some episode counts instead of recording."""
    roots = {n: Path((roots or {}).get(n) or record(n, cache)) for n in episodes}
    machine = common.machine_info()
    results = {}
    for n, root in roots.items():
        for side in SIDES:
            results[f"{side}_{n}"] = _child(side, root, batch, workers, batches, timeout_s)
            print(f"  {side:15s} {n:5d} episodes: {results[f'{side}_{n}']}")
    small, large = min(episodes), max(episodes)
    report = {
        "samples_per_s_ours": results[f"ours_{large}"]["samples_per_s"],
        "samples_per_s_lerobot": results[f"lerobot_{large}"]["samples_per_s"],
        "samples_per_s_no_cameras": results[f"ours_no_cameras_{large}"]["samples_per_s"],
        f"rss_gb_{small}": results[f"ours_{small}"]["peak_rss_gb"],
        f"rss_gb_{large}": results[f"ours_{large}"]["peak_rss_gb"],
        "rss_gb_lerobot": {n: results[f"lerobot_{n}"]["peak_rss_gb"] for n in episodes},
        "pss_gb": {side: {n: results[f"{side}_{n}"]["peak_pss_gb"] for n in episodes} for side in ("ours", "lerobot")},
        "datasets": {n: str(root) for n, root in roots.items()},
        "batch": batch,
        "workers": workers,
        "batches": batches,
        "chunk": CHUNK,
        "runs": results,
        "machine": machine,
        "load_average_end": common.load_average(),
    }
    values = {
        "samples_per_s_ratio": common.ratio(report["samples_per_s_ours"], report["samples_per_s_lerobot"]),
        "rss_growth": common.ratio(report[f"rss_gb_{large}"], report[f"rss_gb_{small}"]),
    }
    report["no_cameras_speedup"] = common.ratio(report["samples_per_s_no_cameras"], report["samples_per_s_ours"])
    report |= values | {"met": common.check(TARGETS, values)}
    columns = ("samples_per_s", "peak_rss_gb", "peak_pss_gb", "init_s")
    rows = [[f"{side} {n}", *(results[f"{side}_{n}"][k] for k in columns)] for n in episodes for side in SIDES]
    common.print_table(
        f"data loading (batch {batch}, {workers} workers, {batches} batches)",
        ["side / episodes", "samples/s", "peak RSS GB", "peak PSS GB", "init s"],
        rows,
        TARGETS,
        report["met"],
    )
    return report


def record(episodes: int, cache: Path) -> Path:
    """The cached two-camera video sandbox dataset of `episodes` episodes."""
    from reflow_exp.sandbox.dataset import record_dataset

    root = Path(cache) / f"data-video-{episodes}"
    record_dataset(root, repo_id=REPO, episodes=episodes, seed=0, video=True, cameras=2)
    return root


def _child(side: str, root: Path, batch: int, workers: int, batches: int, timeout_s: float) -> dict:
    command = [sys.executable, "-m", "reflow_exp.bench.data", side, str(root), str(batch), str(workers), str(batches)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the child process
def _loader(side: str, root: str, batch: int, workers: int):
    import torch
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    if side in ("ours", "ours_no_cameras"):
        from reflow_exp.data import DataSource, load_dataset, make_dataloader, open_metadata, without_cameras

        source = DataSource("unused", REPO, root)
        frames = load_dataset(source, open_metadata(source), CHUNK)
        frames = without_cameras(frames) if side == "ours_no_cameras" else frames
        return make_dataloader(frames, batch, seed=0, num_workers=workers)
    from lerobot.datasets import EpisodeAwareSampler
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    meta = LeRobotDatasetMetadata(REPO, root=root)
    dataset = LeRobotDataset(REPO, root=root, delta_timestamps=resolve_delta_timestamps(SmolVLAConfig(), meta))
    sampler = EpisodeAwareSampler(
        dataset.meta.episodes["dataset_from_index"],
        dataset.meta.episodes["dataset_to_index"],
        episode_indices_to_use=dataset.episodes,
        shuffle=True,
        seed=0,
        absolute_to_relative_idx=dataset.absolute_to_relative_idx,
    )
    extra = {"prefetch_factor": 4, "persistent_workers": True, "multiprocessing_context": "spawn"} if workers else {}
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=False, **extra
    )


class _PeakRss:
    """Peak RSS and PSS of this process plus its children (DataLoader workers), sampled in a thread.
    RSS counts pages a forked worker shares with its parent once per process; PSS splits them."""

    def __init__(self, every_s: float = 0.05):
        import psutil

        self.process, self.every_s, self.peak, self.peak_pss = psutil.Process(), every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            rss = pss = 0
            for p in [self.process, *self.process.children(recursive=True)]:
                try:
                    memory = p.memory_full_info()
                    rss, pss = rss + memory.rss, pss + memory.pss
                except psutil.Error:  # a worker that just exited
                    pass
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            time.sleep(self.every_s)

    def stop(self) -> tuple[float, float]:
        """(peak RSS, peak PSS) in GiB."""
        self._stop.set()
        self._thread.join()
        return self.peak / 2**30, self.peak_pss / 2**30


def _measure(side: str, root: str, batch: int, workers: int, batches: int) -> dict:
    import lerobot.datasets.lerobot_dataset  # noqa: F401  imports are not part of the set-up time

    import reflow_exp.data  # noqa: F401

    memory = _PeakRss()
    start = time.perf_counter()
    loader = _loader(side, root, batch, workers)
    iterator = iter(loader)
    next(iterator)  # workers started and warmed up
    init_s = time.perf_counter() - start
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        try:
            seen += len(next(iterator)["index"])
        except StopIteration:
            iterator = iter(loader)
    elapsed = time.perf_counter() - start
    peak_rss, peak_pss = memory.stop()
    return {
        "samples_per_s": seen / elapsed,
        "peak_rss_gb": peak_rss,
        "peak_pss_gb": peak_pss,
        "init_s": init_s,
        "frames": len(loader.dataset),
    }


if __name__ == "__main__":
    side, root, batch, workers, batches = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    print(json.dumps(_measure(side, root, batch, workers, batches)))
