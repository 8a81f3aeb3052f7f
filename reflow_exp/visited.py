"""States the teacher itself visits: its own rollouts, recorded as extra reflow training frames.

Demonstrations show the expert's states; a deployed student meets the states a policy like the
teacher drives into. With `reflow.visited_episodes = N`, the frozen teacher is rolled out for N
episodes in the gin-configured Evaluator's env (the sandbox) with `reflow.visited_teacher_steps`
Euler steps (SmolVLA's convention: t=1 noise -> t=0 action), on env seeds of their own
(`sandbox.task.visited_seeds`: no training or evaluation seed). Every step's observation (cameras,
state, task) and the action the teacher executed go into a LeRobotDataset (v3) with the source
dataset's features at `<run>/visited/`. Reflow needs no labels: the coupling asks the teacher for
each frame's chunk; the recorded actions only fill the dataset's `action` column.

The recording is written into a temporary sibling and renamed into place (`files.build_once`),
so a run that restarts reuses a complete folder made with the same settings and teacher, and
never reads a half-written one.

Training frames are the source's training episodes followed by every visited frame. The caches key
rows by the frame's `index`, so visited frames get `index + source.total_frames` (and
`episode_index + source.total_episodes`): unique across the two datasets. Normalisation stays the
teacher's: batches pass through the teacher checkpoint's own preprocessor.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from tqdm import tqdm

from reflow_exp import distributed
from reflow_exp.data import DataSource, dataset_digest, load_dataset, without_cameras
from reflow_exp.evaluate import Evaluator, as_chunk_policy, make_vector_env, rollout, train_modes_kept
from reflow_exp.files import build_once
from reflow_exp.sandbox import ENV_ID as SANDBOX_ENV_ID
from reflow_exp.sandbox.dataset import episode_writer, features, frame
from reflow_exp.sandbox.task import visited_seeds

FOLDER = "visited"  # in the run folder
REPO_ID = "reflow_exp/visited"


def check_settings(episodes: int, teacher_steps: int, seed: int) -> None:
    """Raise on bad `reflow.visited_*` values or an env the recorder cannot record (before any weights load)."""
    if int(episodes) != episodes or episodes < 0:
        raise ValueError(f"reflow.visited_episodes must be an integer >= 0 (0: off), got {episodes!r}")
    if int(teacher_steps) != teacher_steps or teacher_steps < 1:
        raise ValueError(f"reflow.visited_teacher_steps must be an integer >= 1, got {teacher_steps!r}")
    if not episodes:
        return
    env_id = Evaluator().spec.gym_id
    if env_id != SANDBOX_ENV_ID:
        raise ValueError(
            f"reflow.visited_episodes records the sandbox's observations; Evaluator.env_id is {env_id}. "
            f"Evaluate in {SANDBOX_ENV_ID} or set reflow.visited_episodes = 0"
        )
    visited_seeds(1, seed)  # raises for a run seed outside [0, 1000)


def add_frames(
    run,
    teacher,
    teacher_digest: str,
    data: DataSource,
    meta: LeRobotDatasetMetadata,
    train_set: torch.utils.data.Dataset,
    episodes: int,
    teacher_steps: int,
    chunk_size: int,
    cameras: list[str],
) -> tuple[torch.utils.data.Dataset, dict]:
    """Record (rank 0; the others wait) or reuse `episodes` teacher rollouts in `run.path / FOLDER`,
    write summary.json's `visited`, and return (`train_set` + the visited frames, the part of the
    caches' data fingerprint that names them)."""
    layouts = "train" if (data.report or {}).get("heldout_layouts") else "all"  # never a held-out layout
    with distributed.main_first():
        report = record(run.path / FOLDER, teacher, teacher_digest, meta, episodes, teacher_steps, run.seed, layouts)
        visited_meta = LeRobotDatasetMetadata(REPO_ID, root=run.path / FOLDER)
        source = DataSource(data.vlm_model_name, REPO_ID, str(run.path / FOLDER), rename_map=data.rename_map)
        frames = load_dataset(source, visited_meta, chunk_size, None, cameras)
    print(
        f"[Reflow] Visited states: {report['frames']} frames from {report['episodes']} teacher rollouts "
        f"(teacher@{teacher_steps} success {report['success_rate']:.2f}) added to {len(train_set)} dataset frames"
    )
    run.update_summary({"visited": report | {"folder": FOLDER}})
    combined = torch.utils.data.ConcatDataset([train_set, Offset(frames, meta.total_frames, meta.total_episodes)])
    return combined, {"dataset": dataset_digest(visited_meta), "frames": visited_meta.total_frames}


def record(
    root: Path,
    teacher,
    teacher_digest: str,
    meta: LeRobotDatasetMetadata,
    episodes: int,
    teacher_steps: int,
    seed: int = 0,
    layouts: str = "all",
) -> dict:
    """The teacher's rollouts as a LeRobotDataset at `root` with `meta`'s features, made once per
    settings and teacher (a complete folder is reused). Returns summary.json's `visited`:
    {"episodes", "frames", "teacher_steps", "success_rate" (teacher@teacher_steps on these rollouts),
    "first_seed", "layouts"}; `layouts`: "all", or "train" to keep off a dataset's held-out layouts."""
    evaluator = Evaluator()
    spec = _source_spec(meta)
    marker = {
        "kind": "visited_states",
        "teacher": teacher_digest,
        "episodes": episodes,
        "teacher_steps": teacher_steps,
        "seed": seed,
        "layouts": layouts,
        "env_id": evaluator.env_id,
        "env_kwargs": evaluator.env_kwargs,
        "max_steps": evaluator.max_steps,
        "n_action_steps": evaluator.n_action_steps,
        "fps": meta.fps,
        "features": spec,
    }
    seeds = visited_seeds(episodes, seed, layouts)
    recorded = []  # stays empty when build_once reuses the folder

    def build(work: Path) -> dict:
        recorded.append(work)
        return _record(work, teacher, evaluator, spec, meta.fps, seeds, teacher_steps) | {"layouts": layouts}

    report = build_once(root, marker, build)
    if not recorded:
        print(f"[Reflow] Reusing the teacher's recorded rollouts in {root}")
    return report


def _source_spec(meta: LeRobotDatasetMetadata) -> dict:
    """The sandbox features that reproduce `meta`'s (cameras as video or images, state, action)."""
    spec = features(video=bool(meta.video_keys), cameras=max(1, len(meta.camera_keys)))
    theirs = {
        key: (f["dtype"], tuple(f["shape"]))
        for key, f in meta.features.items()
        if key in meta.camera_keys or key in ("observation.state", "action")
    }
    ours = {key: (f["dtype"], tuple(f["shape"])) for key, f in spec.items()}
    if theirs != ours:
        raise ValueError(
            f"reflow.visited_episodes records the sandbox's features {ours}, but the source dataset has "
            f"{theirs}; use a sandbox dataset (sandbox_source) or set reflow.visited_episodes = 0"
        )
    return spec


def _record(
    work: Path, teacher, evaluator: Evaluator, spec: dict, fps: int, seeds: list[int], teacher_steps: int
) -> dict:
    """Roll the teacher out on `seeds`, `evaluator.n_envs` at a time, saving each batch's episodes."""
    policy = as_chunk_policy(teacher)
    successes, frames = 0, 0
    with (
        episode_writer(work, REPO_ID, fps, spec) as add_episode,
        tqdm(total=len(seeds), desc=f"recording teacher@{teacher_steps} rollouts", unit="ep") as bar,
        train_modes_kept(policy.model),
    ):
        for start in range(0, len(seeds), evaluator.n_envs):
            batch = seeds[start : start + evaluator.n_envs]
            with contextlib.closing(make_vector_env(evaluator.spec, len(batch), evaluator.env_kwargs)) as env:
                played = rollout(
                    env,
                    policy,
                    batch,
                    teacher_steps,
                    evaluator.max_steps,
                    evaluator.spec.task,
                    n_action_steps=evaluator.n_action_steps,
                    keep_steps=True,
                )
            for episode in played:
                add_episode([frame(obs, action, task) for obs, action, task in episode.steps])
                successes += episode.success
                frames += len(episode.steps)
            bar.update(len(batch))
            bar.set_postfix(success=f"{successes / (start + len(batch)):.2f}")
    return {
        "episodes": len(seeds),
        "frames": frames,
        "teacher_steps": teacher_steps,
        "success_rate": successes / len(seeds),
        "first_seed": seeds[0],
    }


class Offset(torch.utils.data.Dataset):
    """A dataset's items with `index` and `episode_index` shifted, so they follow another dataset's."""

    def __init__(self, dataset: torch.utils.data.Dataset, index: int, episode_index: int):
        self.dataset, self.index, self.episode_index = dataset, index, episode_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int) -> dict:
        item = self.dataset[row]
        return item | {"index": item["index"] + self.index, "episode_index": item["episode_index"] + self.episode_index}

    def without_cameras(self) -> Offset:
        return Offset(without_cameras(self.dataset), self.index, self.episode_index)
