"""Jobs and the gin-bound builders they use: the edge where gin meets the model code.

A job is `job(run: RunDir, dry_run=False) -> None`; `python -m reflow_exp.run` calls the one bound to
`run.job`. Builders that are *referenced* in gin (`train_teacher.source = @sandbox_source`) run inside
the job, after the configuration was validated and the run folder exists.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import gin
import torch
from lerobot.configs.types import FeatureType
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

from reflow_exp import coupling as coupling_module
from reflow_exp import flow
from reflow_exp.architectures import architecture_config
from reflow_exp.backbone import Backbone, vlm_load_count
from reflow_exp.data import (
    DataSource, dataset_digest, load_dataset, make_dataloader, open_metadata, policy_features, split_episodes,
)
from reflow_exp.embedding_cache import ImageEmbeddingCache
from reflow_exp.heads import ActionHead
from reflow_exp.evaluate import Evaluator
from reflow_exp.offline import offline_metrics
from reflow_exp.plots import success_latency_plot
from reflow_exp.policy import Policy, resolve_policy_folder
from reflow_exp.reflow import Reflow
from reflow_exp.rundir import RunDir
from reflow_exp.trainer import Trainer


# ----------------------------------------------------------------------------- data sources
@gin.configurable
def sandbox_source(root: str = "runs/sandbox", episodes: int = 100, seed: int = 0,
                   action_noise: float = 0.0) -> DataSource:
    """The embedded task: a tiny SmolVLM and expert demonstrations, made locally once and cached
    (`action_noise`: see `sandbox.dataset.record_dataset`)."""
    from reflow_exp.sandbox import build_sandbox

    built = build_sandbox(root, seed=seed, episodes=episodes, action_noise=action_noise)
    return DataSource(str(built["vlm_path"]), built["repo_id"], str(built["dataset_root"]), built["expert"])


@gin.configurable
def lerobot_source(
    repo_id: str = gin.REQUIRED,
    vlm_model_name: str = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
    root: str | None = None,
) -> DataSource:
    """A LeRobotDataset (local `root` or the hub cache) and a SmolVLM (hub id or local folder)."""
    return DataSource(vlm_model_name, repo_id, root)


# ----------------------------------------------------------------------------- policy
@gin.configurable
def smolvla_config(
    vlm_model_name: str,
    features: dict,
    chunk_size: int = 50,
    n_action_steps: int | None = None,
    num_steps: int = 10,
    num_vlm_layers: int = 16,
    expert_width_multiplier: float = 0.75,
    resize_imgs_with_padding: tuple[int, int] = (512, 512),
    max_state_dim: int = 32,
    max_action_dim: int = 32,
    freeze_vision_encoder: bool = True,
    train_state_proj: bool = True,
    tokenizer_max_length: int = 48,
) -> SmolVLAConfig:
    """SmolVLA's configuration for `features` (LeRobot PolicyFeatures); defaults are SmolVLA's.

    `n_action_steps`: actions executed from each chunk before re-planning (None: the whole chunk).
    """
    return SmolVLAConfig(
        vlm_model_name=vlm_model_name,
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={k: f for k, f in features.items() if f.type is FeatureType.ACTION},
        chunk_size=chunk_size,
        n_action_steps=chunk_size if n_action_steps is None else n_action_steps,
        num_steps=num_steps,
        num_vlm_layers=num_vlm_layers,
        expert_width_multiplier=expert_width_multiplier,
        resize_imgs_with_padding=tuple(resize_imgs_with_padding),
        max_state_dim=max_state_dim,
        max_action_dim=max_action_dim,
        freeze_vision_encoder=freeze_vision_encoder,
        train_expert_only=True,  # the backbone is always frozen here
        train_state_proj=train_state_proj,
        tokenizer_max_length=tokenizer_max_length,
    )


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def param_summary(policy: Policy, head_key: str) -> dict[str, int]:
    """Counts for summary.json (DESIGN.md §5); `head_key` is "teacher_head" or "student_head"."""
    return {
        "total": count_params(policy),
        "trainable": count_params(policy, trainable_only=True),
        "backbone": count_params(policy.backbone),
        head_key: count_params(policy.head),
    }


# ----------------------------------------------------------------------------- jobs
@gin.configurable
def train_teacher(
    run: RunDir,
    source=gin.REQUIRED,
    batch_size: int = 32,
    num_workers: int = 0,
    train_backbone: bool = False,
    dry_run: bool = False,
) -> None:
    """1-rectified flow: SmolVLA's flow-matching objective on a dataset, from a fresh head.

    `source` is a reference to a DataSource builder (`@sandbox_source`, `@lerobot_source`).
    `train_backbone=True` trains the VLM with the head: for the sandbox, whose tiny VLM is random
    rather than pretrained and must learn to see the goals. The trained VLM is saved with the
    teacher, and reflow keeps it frozen.
    """
    trainer, loads_before = Trainer(), vlm_load_count()
    if dry_run:
        print(f"[Teacher] would train {trainer.steps} steps at batch {batch_size} on {source.__name__}()")
        return
    data = source()
    if data.report:
        print(f"[Teacher] Data: {data.report}")
        run.update_summary({"data": data.report})
    meta = open_metadata(data)
    config = smolvla_config(data.vlm_model_name, policy_features(meta))
    dataset = load_dataset(data, meta, config.chunk_size)
    torch.manual_seed(run.seed)
    backbone = Backbone.from_pretrained_vlm(data.vlm_model_name, config.num_vlm_layers)
    if train_backbone:
        backbone.unfreeze()
    preprocessor, postprocessor = make_smolvla_pre_post_processors(config, meta.stats)
    policy = Policy(backbone, ActionHead(config, backbone), preprocessor, postprocessor)
    params = param_summary(policy, "teacher_head")
    print(f"[Teacher] Parameters: {params}")
    run.update_summary({"vlm_load_count": vlm_load_count() - loads_before, "params": params})
    run.save_operative_config()

    loader = make_dataloader(dataset, batch_size, seed=run.seed, num_workers=num_workers)
    result = trainer.fit(policy, loader, run, preprocess=preprocessor, context={"head": "teacher"})
    run.update_summary({"train": result, "teacher_checkpoint": str(result["checkpoint"] / "pretrained_model")})
    run.save_operative_config()


# ----------------------------------------------------------------------------- reflow
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
    batch_size: int = 32,
    num_workers: int = 0,
    holdout_episodes: int = 10,
    offline_batches: int = 4,
    teacher_eval_steps: tuple[int, ...] = (1, 2, 4, 10),
    student_eval_steps: tuple[int, ...] = (1, 2, 4),
    freeze_vision_encoder: bool | None = None,
    load_vlm_weights: bool | None = None,
    train_expert_only: bool | None = None,
    dry_run: bool = False,
) -> None:
    """2-rectified flow: distil the teacher at `teacher` (a LeRobot SmolVLA folder, a run folder
    of ours, or a hub id) into a student sampled with `student_steps` steps.

    The backbone is loaded once from the teacher and shared; the student head starts as a copy of
    the teacher head and is the only trainable part. `freeze_vision_encoder` is written into the
    student's config (the whole backbone stays frozen here either way). At the end, teacher and
    student are rolled out with the gin-configured `Evaluator` at their `*_eval_steps` (no rollouts
    when both are empty).

    `image_embedding_cache`: the frozen vision encoder's output computed once per training frame and
    camera (`embedding_cache.ImageEmbeddingCache`, a file in the run folder) and fed to the shared
    prefix. None (default): on when valid (shared prefix, no image augmentation, every teacher
    camera in the data), else off with a message; True: required (an error when not valid); False: off.
    """
    if image_embedding_cache and not shared_prefix:
        raise ValueError("reflow.image_embedding_cache=True needs reflow.shared_prefix=True (the plain path is "
                         "LeRobot's own forward, which runs the vision encoder); drop one of the two settings")
    for name, value in (("student_steps", student_steps), ("batch_size", batch_size), ("offline_batches", offline_batches)):
        if int(value) != value or value < 1:
            raise ValueError(f"reflow.{name} must be an integer >= 1, got {value!r}")
    for flag, value in (("load_vlm_weights", load_vlm_weights), ("train_expert_only", train_expert_only)):
        if value is not None:
            warnings.warn(f"reflow.{flag}={value} is ignored: reflow handles it automatically ({_HANDLED[flag]})")
    coupling = coupling or coupling_module.OnlineCoupling()
    if dry_run:
        return _reflow_dry_run(teacher, student_steps, freeze_vision_encoder)

    loads_before = vlm_load_count()  # the count is process-wide; a run reports its own loads
    print(f"[Reflow] Loading teacher model from {teacher}")
    teacher_path = resolve_policy_folder(teacher)
    teacher_policy = Policy.from_pretrained(teacher_path)
    teacher_policy.head.requires_grad_(False)
    print("[Reflow] ✓ Teacher loaded and frozen")
    print("[Reflow] Creating student model (copying weights from teacher)")
    student = _student_head(teacher_policy, student_steps, freeze_vision_encoder)
    print("[Reflow] ✓ Student initialized from teacher")
    image_cache = None
    if shared_prefix and image_embedding_cache is not False:
        image_cache = ImageEmbeddingCache(required=bool(image_embedding_cache))
    model = Reflow(
        teacher_policy.backbone, teacher_policy.head, student, coupling, time_sampler, huber, shared_prefix,
        teacher_policy.preprocessor, teacher_policy.postprocessor, image_cache,
    )
    params = _report_params(model)
    loads = vlm_load_count() - loads_before
    print(f"[Reflow] VLM load count: {loads}")
    run.update_summary({"vlm_load_count": loads, "params": params})
    run.log_metrics(0, {"vlm_load_count": loads, **params}, subset="setup")
    run.save_operative_config()

    data = source()
    meta = open_metadata(data)
    train_eps, holdout_eps = split_episodes(meta.total_episodes, holdout_episodes)
    config = teacher_policy.config
    train_set = load_dataset(data, meta, config.chunk_size, train_eps)
    holdout_set = load_dataset(data, meta, config.chunk_size, holdout_eps)
    preprocess = teacher_policy.preprocessor
    data_key = {"data": dataset_digest(meta), "episodes": train_eps}
    fingerprint = {"teacher": coupling_module.file_digest(teacher_path / "model.safetensors"), **data_key}
    pair_loader = make_dataloader(train_set, batch_size, run.seed, num_workers, shuffle=False)
    if image_cache is not None and image_cache.prepare(model.teacher, pair_loader, preprocess, run.path, data_key):
        run.update_summary({"image_embedding_cache": image_cache.report})
    coupling.prepare(model, pair_loader, preprocess, run.path, fingerprint)
    holdout_loader = make_dataloader(holdout_set, batch_size, run.seed, shuffle=False)
    holdout = [preprocess(batch) for batch, _ in zip(holdout_loader, range(offline_batches))]

    def evaluate(step: int) -> dict:
        metrics = offline_metrics(model, holdout, reference_steps=coupling.teacher_steps, seed=run.seed)
        _log_offline(run, step, metrics)
        return metrics

    evaluate(0)
    result = Trainer().fit(
        model, make_dataloader(train_set, batch_size, run.seed, num_workers), run,
        preprocess=preprocess, context={"head": "student"}, evaluate=evaluate,
    )
    offline = evaluate(result["steps"])
    student_dir = model.student_policy().save_pretrained(run.path / "student")
    print(f"[Reflow] Student saved to {student_dir} (num_steps={student_steps})")
    run.update_summary({"train": result, "offline": offline, "student_checkpoint": str(student_dir)})
    policies = {"teacher": (model.teacher_policy(), teacher_eval_steps), "student": (model.student_policy(), student_eval_steps)}
    evaluate_rollouts(run, result["steps"], policies)
    run.save_operative_config()


def _student_head(teacher: Policy, student_steps: int, freeze_vision_encoder: bool | None) -> ActionHead:
    """A copy of the teacher head on the same backbone, configured to sample with `student_steps`."""
    overrides = {"num_steps": student_steps}
    if freeze_vision_encoder is not None:
        overrides["freeze_vision_encoder"] = freeze_vision_encoder
    config = dataclasses.replace(teacher.config, **overrides)
    return ActionHead(config, teacher.backbone, teacher.head.lerobot.state_dict())


def _report_params(model: Reflow) -> dict[str, int]:
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
    backbone = Backbone.on_meta(config.vlm_model_name, config.num_vlm_layers)
    with torch.device("meta"):
        teacher_policy = Policy(backbone, ActionHead(config, backbone))
    student = _student_head(teacher_policy, student_steps, freeze_vision_encoder)
    _report_params(Reflow(backbone, teacher_policy.head, student, coupling=None))


def _log_offline(run: RunDir, step: int, metrics: dict) -> None:
    for head in ("teacher", "student"):
        for steps, values in metrics[head].items():
            run.log_metrics(step, {"offline_error": values["error"]}, subset="eval", head=head, steps=int(steps))
        run.log_metrics(step, {"straightness": metrics["straightness"][head]}, subset="eval", head=head)
    errors = ", ".join(
        f"{head}@{k} {values['error']:.4f}" for head in ("student", "teacher") for k, values in metrics[head].items()
    )
    print(f"[Reflow] step {step}: error against the teacher's reference solution: {errors}")


# ----------------------------------------------------------------------------- rollouts
def evaluate_rollouts(run: RunDir, step: int, policies: dict) -> dict:
    """Roll out each `name: (policy, step_counts)` with the gin-configured Evaluator; log to
    metrics.jsonl/Aim (contexts head, steps), write `eval` into summary.json, the success/latency
    plot and the rollout videos into the run folder, and print the table."""
    policies = {name: value for name, value in policies.items() if value[1]}
    if not policies:
        return {}
    evaluator = Evaluator()
    results = {name: evaluator.run(policy, steps, out_dir=run.path, tag=name) for name, (policy, steps) in policies.items()}
    for name, by_steps in results.items():
        for k, metrics in by_steps.items():
            numbers = {key: metrics[key] for key in ("success_rate", "mean_return", "mean_length", "latency_ms") if key in metrics}
            run.log_metrics(step, numbers, subset="eval", head=name, steps=k)
            if metrics.get("gif"):
                run.tracker.track_image("rollout", metrics["gif"], step, {"head": name, "steps": k})
    plot = success_latency_plot(results, run.path / "eval_plot.png")
    run.tracker.track_image("success_latency", plot, step)
    summary = {name: {str(k): _relative(m, run.path) for k, m in by_steps.items()} for name, by_steps in results.items()}
    run.update_summary({"eval": summary})
    print(eval_table(summary))
    bar = quality_bar(summary)
    if bar is not None:
        run.update_summary({"quality_bar": bar})
        print("Quality bar: " + "; ".join(f"{check}: {'PASS' if ok else 'FAIL'}" for check, ok in bar.items()))
    return results


def _relative(metrics: dict, root) -> dict:
    """Paths under the run folder relative to it, so the folder can move."""
    def rel(path):
        return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else str(path)

    out = {k: v for k, v in metrics.items() if k not in ("videos", "gif")}
    out["videos"] = [rel(p) for p in metrics.get("videos", [])]
    if metrics.get("gif"):
        out["gif"] = rel(metrics["gif"])
    return out


def eval_table(summary: dict) -> str:
    """A plain-text table of summary.json's `eval` section."""
    lines = [f"{'head':<8} {'steps':>5} {'success':>8} {'return':>8} {'length':>7} {'latency ms':>11} {'routes L/R/none':>16}"]
    for name, by_steps in summary.items():
        for k, m in sorted(by_steps.items(), key=lambda item: int(item[0])):
            latency = f"{m['latency_ms']:.1f}" if "latency_ms" in m else "-"
            routes = "/".join(str(m["routes"][r]) for r in ("left", "right", "none")) if "routes" in m else "-"
            lines.append(
                f"{name:<8} {k:>5} {m['success_rate']:>8.3f} {m['mean_return']:>8.3f} {m['mean_length']:>7.1f} "
                f"{latency:>11} {routes:>16}"
            )
    return "\n".join(lines)


def quality_bar(summary: dict) -> dict[str, bool] | None:
    """The sandbox's bar: teacher@10 >= 0.80, student@1 >= 0.95 x teacher@10, and
    teacher@1 <= student@1 - 0.20 (reflow, not an easy task, makes one step work)."""
    try:
        t10 = summary["teacher"]["10"]["success_rate"]
        t1 = summary["teacher"]["1"]["success_rate"]
        s1 = summary["student"]["1"]["success_rate"]
    except KeyError:
        return None
    return {
        "teacher@10 >= 0.80": t10 >= 0.80,
        "student@1 >= 0.95 x teacher@10": s1 >= 0.95 * t10,
        "teacher@1 <= student@1 - 0.20": t1 <= s1 - 0.20,
    }


@gin.configurable
def evaluate_policies(run: RunDir, policies: dict = gin.REQUIRED, dry_run: bool = False) -> None:
    """Evaluate saved policies: `policies = {"name": ("<policy folder or run folder>", [steps, ...])}`."""
    if dry_run:
        print(f"[Eval] would evaluate {sorted(policies)} with {Evaluator().env_id}")
        return
    loaded = {name: (Policy.from_pretrained(path), tuple(steps)) for name, (path, steps) in policies.items()}
    evaluate_rollouts(run, 0, loaded)
