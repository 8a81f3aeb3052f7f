"""Jobs and the gin-bound builders they use: the edge where gin meets the model code.

A job is `job(run: RunDir, dry_run=False) -> None`; `python -m reflow_exp.run` calls the one bound to
`run.job`. Builders that are *referenced* in gin (`train_teacher.source = @sandbox_source`) run inside
the job, after the configuration was validated and the run folder exists.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import gin
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

from reflow_exp import coupling as coupling_module
from reflow_exp import distributed, flow
from reflow_exp.architectures import architecture_config, make_smolvla_config
from reflow_exp.backbone import Backbone, vlm_load_count
from reflow_exp.data import (
    DataSource, check_features, dataset_digest, dataset_stats, default_workers, load_dataset, make_dataloader,
    open_metadata, policy_features, split_episodes,
)
from reflow_exp.embedding_cache import ImageEmbeddingCache
from reflow_exp.heads import ActionHead
from reflow_exp.metaworld.tasks import DEFAULT_TASKS as DEFAULT_METAWORLD_TASKS  # no MuJoCo imported
from reflow_exp.evaluate import Evaluator
from reflow_exp.files import file_digest
from reflow_exp.offline import offline_metrics
from reflow_exp.plots import success_latency_plot
from reflow_exp.policy import Policy, resolve_policy_folder
from reflow_exp.reflow import Reflow
from reflow_exp.rundir import RunDir
from reflow_exp.stats import paired_comparison
from reflow_exp.torch_utils import count_params
from reflow_exp.trainer import Trainer


# ----------------------------------------------------------------------------- data sources
@gin.configurable
def sandbox_source(root: str = "runs/sandbox", episodes: int = 100, seed: int = 0, action_noise: float = 0.0,
                   holdout_layouts: bool = False, video: bool = False, cameras: int = 1,
                   rename_map: dict | None = None) -> DataSource:
    """The embedded task: a tiny SmolVLM and expert demonstrations, made locally once and cached
    (`action_noise`, `holdout_layouts`, `video`, `cameras`: see `sandbox.dataset.record_dataset`;
    with held-out layouts, use a `root` of its own and evaluate with `Evaluator.layouts`;
    `rename_map`: dataset key -> policy key)."""
    from reflow_exp.sandbox import build_sandbox

    built = build_sandbox(root, seed=seed, episodes=episodes, action_noise=action_noise,
                          holdout_layouts=holdout_layouts, video=video, cameras=cameras)
    return DataSource(str(built["vlm_path"]), built["repo_id"], str(built["dataset_root"]), built["expert"],
                      dict(rename_map or {}))


@gin.configurable
def metaworld_source(root: str = "runs/metaworld", tasks=DEFAULT_METAWORLD_TASKS, episodes_per_task: int = 50,
                     seed: int = 0, image_size: int = 64, state: str = "objects", video: bool = True,
                     min_expert_success: float = 0.8) -> DataSource:
    """MetaWorld (LeRobot's env): scripted-expert demonstrations of `tasks` and a tiny SmolVLM that
    knows their instructions, made locally once and cached (see `metaworld.record.record_dataset`)."""
    from reflow_exp.metaworld.record import build_metaworld

    built = build_metaworld(root, tasks, episodes_per_task, seed, image_size, state, video, min_expert_success)
    return DataSource(built["vlm_path"], built["repo_id"], built["dataset_root"], built["expert"])


@gin.configurable
def lerobot_source(
    repo_id: str = gin.REQUIRED,
    vlm_model_name: str = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
    root: str | None = None,
    rename_map: dict | None = None,
) -> DataSource:
    """A LeRobotDataset (local `root` or the hub cache) and a SmolVLM (hub id or local folder).
    `rename_map`: dataset key -> policy key, e.g. {"observation.images.top": "observation.images.camera1"}."""
    return DataSource(vlm_model_name, repo_id, root, rename_map=dict(rename_map or {}))


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
    return make_smolvla_config(
        vlm_model_name,
        features,
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
    num_workers: int | None = None,
    train_backbone: bool = False,
    holdout_episodes: int = 10,
    dry_run: bool = False,
) -> None:
    """1-rectified flow: SmolVLA's flow-matching objective on a dataset, from a fresh head.

    `source` is a reference to a DataSource builder (`@sandbox_source`, `@lerobot_source`).
    The last `holdout_episodes` episodes are left out of training (`data.split_episodes`, the rule
    reflow uses too), so reflow's offline metrics can use episodes the teacher never saw; 0 trains
    on every episode. The split goes into summary.json's `data_split`.
    `num_workers`: DataLoader workers that decode camera frames (None: `data.default_workers`).
    `train_backbone=True` trains the VLM with the head: for the sandbox, whose tiny VLM is random
    rather than pretrained and must learn to see the goals. The trained VLM is saved with the
    teacher, and reflow keeps it frozen.
    """
    trainer, loads_before = Trainer(find_unused_parameters=train_backbone), vlm_load_count()
    if dry_run:
        print(f"[Teacher] would train {trainer.steps} steps at batch {batch_size} on {source.__name__}()")
        return
    with distributed.main_first():  # rank 0 makes or downloads the data; the others then read it
        data = source()
        meta = open_metadata(data)
    if data.report:
        print(f"[Teacher] Data: {data.report}")
        run.update_summary({"data": data.report})
    device = distributed.device()
    features = policy_features(meta, data.rename_map)
    config = dataclasses.replace(smolvla_config(data.vlm_model_name, features), device=device.type)
    train_eps, holdout_eps = (split_episodes(meta.total_episodes, holdout_episodes) if holdout_episodes
                              else (list(range(meta.total_episodes)), []))
    run.update_summary({"data_split": data_split(meta, train_eps, holdout_eps)})
    with distributed.main_first():
        dataset = load_dataset(data, meta, config.chunk_size, train_eps, cameras=list(config.image_features))
    torch.manual_seed(run.seed)
    backbone = Backbone.from_pretrained_vlm(data.vlm_model_name, config.num_vlm_layers).to(device)
    if train_backbone:
        backbone.unfreeze()
    # The processors send batches to this process's exact device (e.g. cuda:1).
    preprocessor, postprocessor = make_smolvla_pre_post_processors(
        dataclasses.replace(config, device=str(device)), dataset_stats(meta, data.rename_map)
    )
    policy = Policy(backbone, ActionHead(config, backbone), preprocessor, postprocessor)
    params = param_summary(policy, "teacher_head")
    print(f"[Teacher] Parameters: {params}")
    run.update_summary({"vlm_load_count": vlm_load_count() - loads_before, "params": params})
    run.save_operative_config()

    loader = make_dataloader(dataset, batch_size, seed=run.seed, num_workers=default_workers(num_workers))
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
    num_workers: int | None = None,
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
    when both are empty). The dataset must feed the teacher's features (after the source's
    rename_map); that is checked before any weight is loaded. `num_workers`: see `train_teacher`.

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
    trainer = Trainer()  # checks the trainer's settings (e.g. bf16 on this device) before any work
    if dry_run:
        return _reflow_dry_run(teacher, student_steps, freeze_vision_encoder)

    loads_before = vlm_load_count()  # the count is process-wide; a run reports its own loads
    teacher_path = resolve_policy_folder(teacher)
    with distributed.main_first():  # rank 0 makes or downloads the data; the others then read it
        data = source()
        meta = open_metadata(data)
    check_features(PreTrainedConfig.from_pretrained(teacher_path), policy_features(meta, data.rename_map),
                   f"{source.__name__}.rename_map")
    print(f"[Reflow] Loading teacher model from {teacher}")
    teacher_policy = Policy.from_pretrained(teacher_path, device=distributed.device())
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

    train_eps, holdout_eps = split_episodes(meta.total_episodes, holdout_episodes)
    split = data_split(meta, train_eps, holdout_eps)
    split["teacher_saw_holdout"] = teacher_saw(teacher_path, split)
    run.update_summary({"data_split": split})
    config = teacher_policy.config
    cameras = list(config.image_features)
    with distributed.main_first():
        train_set = load_dataset(data, meta, config.chunk_size, train_eps, cameras)
        holdout_set = load_dataset(data, meta, config.chunk_size, holdout_eps, cameras)
    num_workers = default_workers(num_workers)
    preprocess = teacher_policy.preprocessor
    data_key = {"data": dataset_digest(meta), "episodes": train_eps}
    fingerprint = {"teacher": file_digest(teacher_path / "model.safetensors"), **data_key}
    if image_cache is not None:
        # Rank 0 builds the file over every training frame; the other ranks then only open it.
        with distributed.main_first():
            frames = make_dataloader(train_set, batch_size, run.seed, num_workers, shuffle=False)
            if image_cache.prepare(model.teacher, frames, preprocess, run.path, data_key):
                run.update_summary({"image_embedding_cache": image_cache.report})
    # Each process makes the pairs of its own share of the frames (a cached coupling merges them).
    pair_loader = make_dataloader(distributed.shard(train_set), batch_size, run.seed, num_workers, shuffle=False)
    coupling.prepare(model, pair_loader, preprocess, run.path, fingerprint)
    holdout_loader = make_dataloader(holdout_set, batch_size, run.seed, shuffle=False)
    holdout = [preprocess(batch) for batch, _ in zip(holdout_loader, range(offline_batches))]

    def evaluate(step: int) -> dict:
        if not run.is_main:  # rank 0 measures and logs; the others go on to the next step
            return {}
        metrics = offline_metrics(model, holdout, reference_steps=coupling.teacher_steps, seed=run.seed)
        _log_offline(run, step, metrics)
        return metrics

    evaluate(0)
    result = trainer.fit(
        model, make_dataloader(train_set, batch_size, run.seed, num_workers), run,
        preprocess=preprocess, context={"head": "student"}, evaluate=evaluate,
    )
    if not run.is_main:  # rank 0 alone saves the student and runs the rollouts
        return
    offline = evaluate(result["steps"])
    student_dir = model.student_policy().save_pretrained(run.path / "student")
    print(f"[Reflow] Student saved to {student_dir} (num_steps={student_steps})")
    run.update_summary({"train": result, "offline": offline, "student_checkpoint": str(student_dir)})
    policies = {"teacher": (model.teacher_policy(), teacher_eval_steps), "student": (model.student_policy(), student_eval_steps)}
    evaluate_rollouts(run, result["steps"], policies)
    run.save_operative_config()


def data_split(meta, train_eps: list[int], holdout_eps: list[int]) -> dict:
    """summary.json's `data_split`: which episodes of which dataset trained the run's policy."""
    return {"dataset": dataset_digest(meta), "episodes": meta.total_episodes, "train_episodes": len(train_eps),
            "holdout_episodes": holdout_eps}


def teacher_saw(teacher_path: Path, split: dict) -> bool | None:
    """Whether the teacher trained on any of `split`'s held-out episodes, from the `data_split` of
    the run folder that holds `teacher_path` (a teacher run or an earlier reflow run); None when
    unknown (no summary, or another dataset). True also warns: offline metrics then flatter it."""
    summary = next((folder / "summary.json" for folder in (teacher_path, *list(teacher_path.parents)[:3])
                    if (folder / "summary.json").is_file()), None)
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
EPISODES_FILE = "eval_episodes.json"  # per-episode outcomes by seed, beside summary.json
# (first head, steps, second head, steps): compared on the same seeds, paired (exact McNemar).
PAIRS = (("student", 1, "teacher", 10), ("student", 1, "teacher", 1), ("student", 2, "teacher", 2))


def evaluate_rollouts(run: RunDir, step: int, policies: dict) -> dict:
    """Roll out each `name: (policy, step_counts)` with the gin-configured Evaluator; log to
    metrics.jsonl/Aim (contexts head, steps), write `eval`, `eval_protocol` and `paired` into
    summary.json and each episode's outcome into eval_episodes.json, the success/latency plot and
    the rollout videos into the run folder, and print the tables."""
    policies = {name: value for name, value in policies.items() if value[1]}
    if not policies:
        return {}
    evaluator = Evaluator()
    results = {name: evaluator.run(policy, steps, out_dir=run.path, tag=name) for name, (policy, steps) in policies.items()}
    for name, by_steps in results.items():
        for k, metrics in by_steps.items():
            keys = ("success_rate", "ci_low", "ci_high", "mean_return", "mean_length", "latency_ms")
            numbers = {key: metrics[key] for key in keys if key in metrics}
            run.log_metrics(step, numbers, subset="eval", head=name, steps=k)
            if metrics.get("gif"):
                run.tracker.track_image("rollout", metrics["gif"], step, {"head": name, "steps": k})
    plot = success_latency_plot(results, run.path / "eval_plot.png")
    run.tracker.track_image("success_latency", plot, step)
    summary = {name: {str(k): _relative(m, run.path) for k, m in by_steps.items()} for name, by_steps in results.items()}
    paired = paired_comparisons(results)
    run.update_summary({"eval": summary, "eval_protocol": evaluator.protocol, "paired": paired})
    _write_episodes(run.path / EPISODES_FILE, results)
    protocol = evaluator.protocol
    print(f"Evaluation: {protocol['episodes']} episodes per row, split {protocol['split']!r} "
          f"(seed {protocol['seed']}), layouts {protocol['layouts']!r}, {protocol['env_id']}")
    print(eval_table(summary))
    if paired:
        print(paired_table(paired))
    bar = quality_bar(summary, paired)
    if bar is not None:
        run.update_summary({"quality_bar": bar})
        print("Quality bar: " + "; ".join(f"{check}: {'PASS' if ok else 'FAIL'}" for check, ok in bar.items()))
    return results


def paired_comparisons(results: dict) -> dict[str, dict]:
    """PAIRS found in `results` ({head: {steps: Evaluator metrics}}), compared seed by seed:
    {"student@1 vs teacher@10": stats.paired_comparison(...), ...}. Difference: first minus second."""
    paired = {}
    for head_a, steps_a, head_b, steps_b in PAIRS:
        a, b = results.get(head_a, {}).get(steps_a), results.get(head_b, {}).get(steps_b)
        if a is None or b is None:
            continue
        if a["episode_seeds"] != b["episode_seeds"]:
            raise ValueError(f"{head_a}@{steps_a} and {head_b}@{steps_b} were evaluated on different seeds")
        name = f"{head_a}@{steps_a} vs {head_b}@{steps_b}"
        paired[name] = paired_comparison(a["episode_success"], b["episode_success"])
    return paired


def _write_episodes(path: Path, results: dict) -> None:
    """{head: {steps: {"seeds": [...], "success": [0/1, ...]}}}: what paired tests are computed from."""
    episodes = {
        name: {str(k): {"seeds": m["episode_seeds"], "success": m["episode_success"]} for k, m in by_steps.items()}
        for name, by_steps in results.items()
    }
    path.write_text(json.dumps(episodes) + "\n")


def _relative(metrics: dict, root) -> dict:
    """Paths under the run folder relative to it, so the folder can move; per-episode lists
    stay out of summary.json (they go to EPISODES_FILE)."""
    def rel(path):
        return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else str(path)

    dropped = ("videos", "gif", "episode_seeds", "episode_success")
    out = {k: v for k, v in metrics.items() if k not in dropped}
    out["videos"] = [rel(p) for p in metrics.get("videos", [])]
    if metrics.get("gif"):
        out["gif"] = rel(metrics["gif"])
    return out


def eval_table(summary: dict) -> str:
    """A plain-text table of summary.json's `eval` section (success with its 95% Wilson interval)."""
    lines = [f"{'head':<8} {'steps':>5} {'success':>8} {'95% CI':>13} {'return':>8} {'length':>7} "
             f"{'latency ms':>11} {'routes L/R/none':>16}"]
    for name, by_steps in summary.items():
        for k, m in sorted(by_steps.items(), key=lambda item: int(item[0])):
            latency = f"{m['latency_ms']:.1f}" if "latency_ms" in m else "-"
            routes = "/".join(str(m["routes"][r]) for r in ("left", "right", "none")) if "routes" in m else "-"
            interval = f"{m['ci_low']:.3f}-{m['ci_high']:.3f}" if "ci_low" in m else "-"
            lines.append(
                f"{name:<8} {k:>5} {m['success_rate']:>8.3f} {interval:>13} {m['mean_return']:>8.3f} "
                f"{m['mean_length']:>7.1f} {latency:>11} {routes:>16}"
            )
    return "\n".join(lines)


def paired_table(paired: dict) -> str:
    """A plain-text table of summary.json's `paired` section."""
    lines = [f"{'paired (same seeds)':<24} {'difference':>10} {'95% CI':>17} {'p (McNemar)':>11} "
             f"{'n':>5} {'only 1st/only 2nd':>17}"]
    for name, p in paired.items():
        interval = f"{p['ci_low']:+.3f} to {p['ci_high']:+.3f}"
        discordant = f"{p['first_only']}/{p['second_only']}"
        lines.append(f"{name:<24} {p['difference']:>+10.3f} {interval:>17} {p['p_value']:>11.4f} {p['n']:>5} "
                     f"{discordant:>17}")
    return "\n".join(lines)


_SLACK = 1e-9  # rates are k/n: 0.86 >= 0.66 + 0.20 must hold despite float rounding


def quality_bar(summary: dict, paired: dict | None = None) -> dict[str, bool] | None:
    """The sandbox's bar (issue 12): teacher@10 >= 0.80 (a teacher worth distilling); student@1
    >= 0.97 x teacher@10 and not significantly worse than it (paired exact McNemar, p > 0.05, or
    better); student@1 >= teacher@1 + 0.20 (reflow, not an easy task, makes one step work);
    student@2 >= teacher@2 - 0.02 when both were evaluated. None without teacher@10, teacher@1 and
    student@1."""
    try:
        t10 = summary["teacher"]["10"]["success_rate"]
        t1 = summary["teacher"]["1"]["success_rate"]
        s1 = summary["student"]["1"]["success_rate"]
    except KeyError:
        return None
    bar = {
        "teacher@10 >= 0.80": t10 >= 0.80,
        "student@1 >= 0.97 x teacher@10": s1 >= 0.97 * t10 - _SLACK,
    }
    versus_t10 = (paired or {}).get("student@1 vs teacher@10")
    if versus_t10 is not None:
        bar["student@1 not significantly worse than teacher@10 (p > 0.05)"] = (
            versus_t10["difference"] >= 0 or versus_t10["p_value"] > 0.05
        )
    bar["student@1 >= teacher@1 + 0.20"] = s1 >= t1 + 0.20 - _SLACK
    s2, t2 = summary["student"].get("2"), summary["teacher"].get("2")
    if s2 is not None and t2 is not None:
        bar["student@2 >= teacher@2 - 0.02"] = s2["success_rate"] >= t2["success_rate"] - 0.02 - _SLACK
    return bar


@gin.configurable
def evaluate_policies(run: RunDir, policies: dict = gin.REQUIRED, dry_run: bool = False) -> None:
    """Evaluate saved policies: `policies = {"name": ("<policy folder or run folder>", [steps, ...])}`."""
    if dry_run:
        print(f"[Eval] would evaluate {sorted(policies)} with {Evaluator().protocol}")
        return
    if not run.is_main:  # rollouts are rank 0's alone
        return
    device = distributed.device()
    loaded = {name: (Policy.from_pretrained(path, device), tuple(steps)) for name, (path, steps) in policies.items()}
    evaluate_rollouts(run, 0, loaded)


@gin.configurable
def evaluate_metaworld(run: RunDir, policies: dict = gin.REQUIRED, tasks=gin.REQUIRED, dry_run: bool = False) -> None:
    """`evaluate_policies` on every MetaWorld task in `tasks` (`metaworld.evaluation.evaluate_tasks`):
    summary.json gets `tasks` ({task: {head: {steps: metrics}}}), `mean` (pooled over tasks), `paired`
    (pooled, by task and seed), `paired_by_task` and `eval_protocol`; each step count of each head is
    logged with the pooled numbers."""
    from reflow_exp.metaworld.evaluation import evaluate_tasks

    if dry_run:
        protocol = Evaluator(env_id="metaworld").protocol
        print(f"[Eval] would evaluate {sorted(policies)} on {list(tasks)} with {protocol}")
        return
    loaded = {name: (Policy.from_pretrained(path), tuple(steps)) for name, (path, steps) in policies.items()}
    results = evaluate_tasks(loaded, tasks, out_dir=run.path)
    keys = ("success_rate", "ci_low", "ci_high", "mean_length", "latency_ms")
    for name, by_steps in results["mean"].items():
        for k, m in by_steps.items():
            run.log_metrics(0, {key: m[key] for key in keys if key in m}, subset="eval", head=name, steps=k)
    per_task = {task: _summary_table(heads, run.path) for task, heads in results["tasks"].items()}
    mean = _summary_table(results["mean"], run.path)
    run.update_summary({"tasks": per_task, "mean": mean, "paired": results["paired"],
                        "paired_by_task": results["paired_by_task"], "eval_protocol": results["protocol"]})
    for task, heads in per_task.items():
        print(f"{task}\n{eval_table(heads)}")
    print(f"mean over {len(per_task)} tasks\n{eval_table(mean)}")
    if results["paired"]:
        print(paired_table(results["paired"]))


def _summary_table(results: dict, root: Path) -> dict:
    """{head: {steps: Evaluator metrics}} as summary.json stores it (see `_relative`)."""
    return {name: {str(k): _relative(m, root) for k, m in by_steps.items()} for name, by_steps in results.items()}
