"""The reflow job: 2-rectified flow, distilling a teacher into a student sampled in 1-2 steps.

(Not `jobs/reflow.py`: that module name would be shadowed by the `reflow` job it exports.)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated

import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

import gin
from reflow_exp import coupling as coupling_module
from reflow_exp import distributed, flow, visited
from reflow_exp.architectures import architecture_config
from reflow_exp.backbone import Backbone, vlm_load_count
from reflow_exp.config_types import AtLeast
from reflow_exp.data import (
    DataSource,
    check_features,
    dataset_digest,
    default_workers,
    load_dataset,
    make_dataloader,
    open_metadata,
    policy_features,
    split_episodes,
    without_cameras,
)
from reflow_exp.embedding_cache import ImageEmbeddingCache
from reflow_exp.files import file_digest
from reflow_exp.heads import ActionHead
from reflow_exp.jobs.builders import student_head
from reflow_exp.jobs.evaluate import evaluate_rollouts
from reflow_exp.jobs.teacher import data_split
from reflow_exp.offline import offline_metrics
from reflow_exp.policy import Policy, check_processors, check_smolvla_folder, resolve_policy_folder
from reflow_exp.reflow import Reflow
from reflow_exp.rundir import RunDir
from reflow_exp.torch_utils import count_params, cuda_inference_autocast, enable_tf32
from reflow_exp.trainer import Trainer

for _sampler, _name in [
    (flow.uniform_time, "uniform"),
    (flow.beta_time, "beta"),
    (flow.u_shaped_time, "u_shaped"),
    (flow.logit_normal_time, "logit_normal"),
]:
    gin.external_configurable(_sampler, _name)
gin.external_configurable(coupling_module.OnlineCoupling)
gin.external_configurable(coupling_module.CachedCoupling)

_HANDLED = {
    "load_vlm_weights": "the VLM weights are read once from the teacher checkpoint",
    "train_expert_only": "only the student head is trained; the backbone and the teacher head are frozen",
}


@gin.configurable
def reflow(
    run: RunDir,
    teacher: str = gin.REQUIRED,
    source=gin.REQUIRED,
    coupling=None,
    student_steps: int = 1,
    time_sampler=flow.u_shaped_time,
    huber: bool = False,
    shared_prefix: bool = True,
    image_embedding_cache: bool | None = None,
    batch_size: Annotated[int, AtLeast(1)] = 32,
    num_workers: int | None = None,
    holdout_episodes: int = 10,
    allow_fps_mismatch: bool = False,
    offline_batches: int = 4,
    teacher_eval_steps: tuple[int, ...] = (1, 2, 4, 10),
    student_eval_steps: tuple[int, ...] = (1, 2, 4),
    freeze_vision_encoder: bool | None = None,
    load_vlm_weights: bool | None = None,
    train_expert_only: bool | None = None,
    visited_episodes: int = 0,
    visited_teacher_steps: int = 10,
    dry_run: bool = False,
    preflight: bool = False,
) -> None:
    """2-rectified flow: distil the teacher at `teacher` (a LeRobot SmolVLA folder, a run folder
    of ours, or a hub id) into a student sampled with `student_steps` steps.

    The backbone is loaded once from the teacher and shared; the student head starts as a copy of
    the teacher head and is the only trainable part. `freeze_vision_encoder` is written into the
    student's config (the whole backbone stays frozen here either way). At the end, teacher and
    student are rolled out with the gin-configured `Evaluator` at their `*_eval_steps` (no rollouts
    when both are empty). The dataset must feed the teacher's features (after the source's
    rename_map); that is checked before any weight is loaded. `num_workers`: see `train_teacher`.

    `allow_fps_mismatch`: the data's frame rate must be the one the teacher was trained at (as its
    run folder's summary.json records it): an action chunk spans another time at another rate. True
    accepts a mismatch on purpose.

    `image_embedding_cache`: the frozen vision encoder's output computed once per training frame and
    camera (`embedding_cache.ImageEmbeddingCache`, a file in the run folder) and fed to the shared
    prefix. None (default): on when valid (shared prefix, no image augmentation, no missing teacher
    camera that SmolVLA fills with a blank image), else off with a message; True: required (an error
    when not valid); False: off.
    While it is on, the training batches carry no camera frames: nothing decodes what it stands in for.

    `visited_episodes` > 0: also train on the states the teacher itself visits, from that many of
    its rollouts at `visited_teacher_steps` steps, recorded once into `<run>/visited/` (`visited.py`).

    `preflight=True` (`reflow_exp.run` calls it so before the run folder exists): check the settings,
    the teacher folder and the data's features against the teacher's, then return; no weight is read.
    Teacher cameras the data lack are left out, as LeRobot's SmolVLA does (`data.check_features`).
    """
    if image_embedding_cache and not shared_prefix:
        raise ValueError(
            "reflow.image_embedding_cache=True needs reflow.shared_prefix=True (the plain path is "
            "LeRobot's own forward, which runs the vision encoder); drop one of the two settings"
        )
    for name, value in (
        ("student_steps", student_steps),
        ("batch_size", batch_size),
        ("offline_batches", offline_batches),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"reflow.{name} must be an integer >= 1, got {value!r}")
    for flag, value in (("load_vlm_weights", load_vlm_weights), ("train_expert_only", train_expert_only)):
        if value is not None:
            warnings.warn(f"reflow.{flag}={value} is ignored: reflow handles it automatically ({_HANDLED[flag]})")
    seed = run.seed if run is not None else 0  # a dry run gets no run folder
    visited.check_settings(visited_episodes, visited_teacher_steps, seed)
    coupling = coupling or coupling_module.OnlineCoupling()
    trainer = Trainer()  # checks the trainer's settings (e.g. bf16 on this device) before any work
    if dry_run:
        return _reflow_dry_run(teacher, student_steps, freeze_vision_encoder)
    # in preflight quietly: the job's own call prints its lines into log.txt
    teacher_path, data, meta, cameras = _inputs(teacher, source, allow_fps_mismatch, quiet=preflight)
    if preflight:
        return None

    enable_tf32()  # CUDA only
    loads_before = vlm_load_count()  # the count is process-wide; a run reports its own loads
    teacher_policy, student = load_teacher_and_student(
        teacher, teacher_path, distributed.device(), student_steps, freeze_vision_encoder
    )
    teacher_digest = file_digest(teacher_path / "model.safetensors")
    image_cache = None
    if shared_prefix and image_embedding_cache is not False:
        image_cache = ImageEmbeddingCache(required=bool(image_embedding_cache))
    model = Reflow(
        teacher_policy.backbone,
        teacher_policy.head,
        student,
        coupling,
        time_sampler,
        huber,
        shared_prefix,
        teacher_policy.preprocessor,
        teacher_policy.postprocessor,
        image_cache,
        teacher_reference={"teacher_sha256": teacher_digest},  # a moved teacher folder still resumes
    )
    params = report_params(model)
    loads = vlm_load_count() - loads_before
    print(f"[Reflow] VLM load count: {loads}")
    run.update_summary({"vlm_load_count": loads, "params": params})
    run.log_metrics(0, {"vlm_load_count": loads, **params}, subset="setup")
    run.save_operative_config()

    train_eps, holdout_eps = split_episodes(meta.total_episodes, holdout_episodes)
    split = data_split(meta, train_eps, holdout_eps)
    split["teacher_saw_holdout"] = teacher_saw(teacher_path, split)
    run.update_summary({"data_split": split})
    config = teacher_policy.config
    with distributed.main_first():
        train_set = load_dataset(data, meta, config.chunk_size, train_eps, cameras)
        holdout_set = load_dataset(data, meta, config.chunk_size, holdout_eps, cameras)
    num_workers = default_workers(num_workers)
    preprocess = teacher_policy.preprocessor
    data_key = {"data": dataset_digest(meta), "episodes": train_eps}
    if visited_episodes:  # the teacher's own rollouts join the training frames (and the caches' keys)
        train_set, data_key["visited"] = visited.add_frames(
            run,
            teacher_policy,
            teacher_digest,
            data,
            meta,
            train_set,
            visited_episodes,
            visited_teacher_steps,
            config.chunk_size,
            cameras,
        )
    fingerprint = {"teacher": teacher_digest, **data_key}
    if image_cache is not None:
        # Rank 0 builds the file over every training frame; the other ranks then only open it.
        with distributed.main_first():
            frames = make_dataloader(train_set, batch_size, run.seed, num_workers, shuffle=False)
            with cuda_inference_autocast(distributed.device()):
                prepared = image_cache.prepare(model.teacher, frames, preprocess, run.path, data_key)
            if prepared:
                run.update_summary({"image_embedding_cache": image_cache.report})
        if image_cache.active:  # the cache stands in for the camera frames
            train_set = without_cameras(train_set)
    # Each process makes the pairs of its own share of the frames (a cached coupling merges them).
    pair_loader = make_dataloader(distributed.shard(train_set), batch_size, run.seed, num_workers, shuffle=False)
    with cuda_inference_autocast(distributed.device()):
        coupling.prepare(model, pair_loader, preprocess, run.path, fingerprint)
    holdout_loader = make_dataloader(holdout_set, batch_size, run.seed, shuffle=False)
    holdout = [preprocess(batch) for batch, _ in zip(holdout_loader, range(offline_batches))]

    def evaluate(step: int) -> dict:
        if not run.is_main:  # rank 0 measures and logs; the others go on to the next step
            return {}
        with cuda_inference_autocast(distributed.device()):
            metrics = offline_metrics(model, holdout, reference_steps=coupling.teacher_steps, seed=run.seed)
        _log_offline(run, step, metrics)
        return metrics

    evaluate(0)
    result = trainer.fit(
        model,
        make_dataloader(train_set, batch_size, run.seed, num_workers),
        run,
        preprocess=preprocess,
        context={"head": "student"},
        evaluate=evaluate,
    )
    if not run.is_main:  # rank 0 alone saves the student and runs the rollouts
        return
    offline = evaluate(result["steps"])
    student_dir = model.student_policy().save_pretrained(run.path / "student")
    print(f"[Reflow] Student saved to {student_dir} (num_steps={student_steps})")
    run.update_summary({"train": result, "offline": offline, "student_checkpoint": str(student_dir)})
    policies = {
        "teacher": (model.teacher_policy(), teacher_eval_steps),
        "student": (model.student_policy(), student_eval_steps),
    }
    evaluate_rollouts(run, result["steps"], policies)
    run.save_operative_config()


def _inputs(
    teacher: str, source, allow_fps_mismatch: bool, quiet: bool = False
) -> tuple[Path, DataSource, LeRobotDatasetMetadata, list[str]]:
    """The teacher's folder, the data, its metadata and the teacher's cameras the data feed, each
    checked (`check_smolvla_folder`, `check_processors`, `check_features`, `check_fps`) before any
    weight loads."""
    teacher_path = resolve_policy_folder(teacher)
    check_smolvla_folder(teacher_path)
    check_processors(teacher_path)
    with distributed.main_first():  # rank 0 makes or downloads the data; the others then read it
        data = source()
        meta = open_metadata(data)
    cameras = check_features(
        PreTrainedConfig.from_pretrained(teacher_path),
        policy_features(meta, data.rename_map),
        f"{source.__name__}.rename_map",
        quiet,
    )
    check_fps(teacher_fps(teacher_path), meta.fps, allow_fps_mismatch and not quiet)
    return teacher_path, data, meta, cameras


def load_teacher_and_student(
    teacher: str, teacher_path: Path, device, student_steps: int, freeze_vision_encoder: bool | None
) -> tuple[Policy, ActionHead]:
    """The frozen teacher (the VLM read once, from its file) and a student head copied from it, with
    the seed system's start-up lines. Shared by this job and the LeRobot plugin (plugins/)."""
    print(f"[Reflow] Loading teacher model from {teacher}")
    teacher_policy = Policy.from_pretrained(teacher_path, device=device)
    teacher_policy.head.requires_grad_(False)
    print("[Reflow] ✓ Teacher loaded and frozen")
    print("[Reflow] Creating student model (copying weights from teacher)")
    student = student_head(teacher_policy, student_steps, freeze_vision_encoder)
    print("[Reflow] ✓ Student initialized from teacher")
    return teacher_policy, student


def teacher_saw(teacher_path: Path, split: dict) -> bool | None:
    """Whether the teacher trained on any of `split`'s held-out episodes, from the `data_split` of
    the run folder that holds `teacher_path` (a teacher run or an earlier reflow run); None when
    unknown (no summary, or another dataset). True also warns: offline metrics then flatter it."""
    summary = next(
        (
            folder / "summary.json"
            for folder in (teacher_path, *list(teacher_path.parents)[:3])
            if (folder / "summary.json").is_file()
        ),
        None,
    )
    if summary is None:
        return None
    theirs = json.loads(summary.read_text()).get("data_split")
    if not theirs or theirs.get("dataset") != split["dataset"]:
        return None
    saw = not set(split["holdout_episodes"]) <= set(theirs["holdout_episodes"])
    if saw:
        warnings.warn(
            f"the teacher ({summary.parent}) trained on some of reflow's held-out episodes "
            f"{split['holdout_episodes']} (it held out {theirs['holdout_episodes']}): offline metrics would use "
            "frames it saw. Give train_teacher.holdout_episodes and reflow.holdout_episodes the same value "
            "(gin/sandbox/data.gin binds both to HOLDOUT_EPISODES)"
        )
    return saw


def report_params(model: Reflow) -> dict[str, int]:
    """Print the start-up parameter lines of the student policy; return summary.json's counts."""
    student = model.student_policy()
    total, trainable = count_params(student), count_params(student, trainable_only=True)
    print(f"[Reflow] Total parameters: {total:,}")
    print(f"[Reflow] Trainable parameters: {trainable:,} ({100 * trainable / total:.2f}%)")
    return {
        "total": total,
        "trainable": trainable,
        "backbone": count_params(model.backbone),
        "teacher_head": count_params(model.teacher),
        "student_head": count_params(model.student),
    }


def _reflow_dry_run(teacher: str, student_steps: int, freeze_vision_encoder: bool | None) -> None:
    """The start-up report on the meta device: the teacher's architecture, no weights read or allocated."""
    config = architecture_config(teacher)
    print(f"[Reflow] Dry run: teacher architecture from {config.vlm_model_name} (no weights loaded)")
    report_start_up(config, student_steps, freeze_vision_encoder)


def report_start_up(config, student_steps: int = 1, freeze_vision_encoder: bool | None = None) -> dict[str, int]:
    """Print the start-up parameter lines of a reflow of a teacher with SmolVLA `config` (its VLM a
    local folder), built on the meta device; returns summary.json's counts."""
    backbone = Backbone.on_meta(config.vlm_model_name, config.num_vlm_layers)
    with torch.device("meta"):
        teacher_policy = Policy(backbone, ActionHead(config, backbone))
    student = student_head(teacher_policy, student_steps, freeze_vision_encoder)
    return report_params(Reflow(backbone, teacher_policy.head, student, coupling=None))


def _log_offline(run: RunDir, step: int, metrics: dict) -> None:
    for head in ("teacher", "student"):
        for steps, values in metrics[head].items():
            run.log_metrics(step, {"offline_error": values["error"]}, subset="eval", head=head, steps=int(steps))
        run.log_metrics(step, {"straightness": metrics["straightness"][head]}, subset="eval", head=head)
    errors = ", ".join(
        f"{head}@{k} {values['error']:.4f}" for head in ("student", "teacher") for k, values in metrics[head].items()
    )
    print(f"[Reflow] step {step}: error against the teacher's reference solution: {errors}")


def teacher_fps(policy_folder: Path) -> int | None:
    """The frame rate the teacher was trained at: ``data_split.fps`` in the summary.json of the run
    folder holding ``policy_folder`` (``<run>/checkpoints/<step>/pretrained_model``); None when
    unknown (a hub teacher, a run from before it was recorded)."""
    for folder in list(Path(policy_folder).resolve().parents)[:3]:
        summary = folder / "summary.json"
        if summary.is_file():
            try:
                fps = json.loads(summary.read_text()).get("data_split", {}).get("fps")
            except (ValueError, AttributeError):
                return None
            return int(fps) if isinstance(fps, (int, float)) and not isinstance(fps, bool) else None
    return None


def check_fps(teacher: int | None, data: int, allow_mismatch: bool) -> None:
    """Refuse data at another frame rate than the teacher's (each action of a chunk is one frame),
    unless allowed by ``reflow.allow_fps_mismatch = True``."""
    if teacher is None or teacher == data:
        return
    if allow_mismatch:
        print(f"[Reflow] Warning: the teacher was trained at {teacher} fps, the data is at {data} fps (allowed)")
        return
    raise ValueError(
        f"the teacher was trained on data at {teacher} fps, this dataset is at {data} fps: its action chunks "
        "would span another time. Use data at the teacher's rate, or set reflow.allow_fps_mismatch = True "
        "if this is intended"
    )
