"""Reflow end to end at the tiny size: one VLM load, the start-up log, export, couplings, dry run."""

import json
import re

import pytest
import torch
from lerobot.policies.factory import get_policy_class
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from safetensors.torch import load_file

from reflow_exp import coupling, flow, jobs, run
from reflow_exp.backbone import VLM_PREFIX
from reflow_exp.bench.models import VlmLoadCounter
from reflow_exp.data import DataSource, load_dataset, make_dataloader, open_metadata
from reflow_exp.evaluate import Evaluator
from reflow_exp.heads import ActionHead
from reflow_exp.offline import offline_metrics
from reflow_exp.policy import Policy
from reflow_exp.reflow import Reflow

EXPECTED_LOG = [
    "[Reflow] Loading teacher model from",
    "Loading ",
    "[Reflow] ✓ Teacher loaded and frozen",
    "[Reflow] Creating student model (copying weights from teacher)",
    "[Reflow] ✓ Student initialized from teacher",
    "[Reflow] Total parameters:",
    "[Reflow] Trainable parameters:",
]


def run_job(tmp_path, *gin_params, gin_file="gin/sandbox/tiny.gin"):
    params = [f'run.runs_dir = "{tmp_path / "runs"}"', f'sandbox_source.root = "{tmp_path / "sandbox"}"', *gin_params]
    argv = ["--gin_file", gin_file] + [x for p in params for x in ("--gin_param", p)]
    assert run.main(argv) == 0


@pytest.fixture(scope="module")
def reflow_run(tmp_path_factory):
    """A tiny teacher, then a tiny reflow run from it (module-scoped: both take a while): the runs
    folder, and the reflow run's VLM loads as counted by bench's hook on transformers' SmolVLM class
    (`VlmLoadCounter`, independent of the project's own `vlm_load_count`)."""
    tmp = tmp_path_factory.mktemp("reflow")
    run_job(tmp)
    counter = VlmLoadCounter().install()
    run_job(tmp, f'reflow.teacher = "{tmp / "runs" / "tiny-teacher"}"', gin_file="gin/sandbox/tiny_reflow.gin")
    return tmp / "runs", counter.count


@pytest.fixture(scope="module")
def runs(reflow_run):
    return reflow_run[0]


def test_reflow_loads_the_vlm_once_and_reports_params(reflow_run):
    runs, independent_count = reflow_run
    summary = json.loads((runs / "tiny-reflow" / "summary.json").read_text())
    assert independent_count == 1 and summary["vlm_load_count"] == 1
    params = summary["params"]
    assert params["total"] == params["backbone"] + params["student_head"]
    assert params["trainable"] == params["student_head"] == params["teacher_head"]
    assert set(summary["offline"]["student"]) == {"1", "2", "4"}
    assert summary["offline"]["straightness"]["teacher"] >= 0


def test_reflow_reads_image_embeddings_from_its_cache(runs):
    """gin/sandbox/reflow.gin requires the cache: built once per training frame in the run folder."""
    cache = json.loads((runs / "tiny-reflow" / "summary.json").read_text())["image_embedding_cache"]
    assert cache["file"] == str(runs / "tiny-reflow" / "image_embeddings.safetensors")
    assert cache["frames"] > 0 and cache["bytes_per_frame"] > 0 and cache["build_s"] > 0
    assert "[Reflow] Building image embeddings into" in (runs / "tiny-reflow" / "log.txt").read_text()


def test_the_same_run_without_the_cache_trains_the_same_student(runs, tmp_path):
    """Same seed, encoder instead of cache: the same losses and offline errors (float tolerance)."""
    teacher = runs / "tiny-teacher"
    run_job(
        tmp_path,
        f'reflow.teacher = "{teacher}"',
        'run.name = "no-cache"',
        "reflow.image_embedding_cache = False",
        f'sandbox_source.root = "{runs.parent / "sandbox"}"',
        gin_file="gin/sandbox/tiny_reflow.gin",
    )
    cached, plain = (
        json.loads((folder / "summary.json").read_text())
        for folder in (runs / "tiny-reflow", tmp_path / "runs" / "no-cache")
    )
    assert "image_embedding_cache" not in plain
    assert plain["train"]["last_loss"] == pytest.approx(cached["train"]["last_loss"], rel=1e-4)
    for k, values in plain["offline"]["student"].items():
        assert values["error"] == pytest.approx(cached["offline"]["student"][k]["error"], rel=1e-4)


def test_sandbox_teacher_trains_its_vlm_and_reflow_keeps_it_frozen(runs):
    teacher = json.loads((runs / "tiny-teacher" / "summary.json").read_text())["params"]
    assert teacher["trainable"] == teacher["total"]  # train_teacher.train_backbone = True
    initial = load_file(runs.parent / "sandbox" / "vlm" / "model.safetensors")
    trained = _vlm_weights(runs / "tiny-teacher" / "checkpoints" / "last" / "pretrained_model")
    student = _vlm_weights(runs / "tiny-reflow" / "student")
    assert set(initial) == set(trained) == set(student)
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    assert all(torch.equal(trained[k], student[k]) for k in trained)


def _vlm_weights(folder):
    state = load_file(folder / "model.safetensors")
    return {k.removeprefix(VLM_PREFIX): v for k, v in state.items() if k.startswith(VLM_PREFIX)}


def test_startup_log_lines_in_order(runs):
    log = (runs / "tiny-reflow" / "log.txt").read_text().splitlines()
    positions = [next(i for i, line in enumerate(log) if line.startswith(prefix)) for prefix in EXPECTED_LOG]
    assert positions == sorted(positions)
    assert sum(line.startswith("Loading ") and line.endswith("weights ...") for line in log) == 1
    total = next(line for line in log if line.startswith("[Reflow] Total parameters:"))
    assert re.fullmatch(r"\[Reflow\] Total parameters: [\d,]+", total)


def test_metrics_carry_head_and_time_bins(runs):
    rows = [json.loads(line) for line in (runs / "tiny-reflow" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["context"].get("subset") == "train"]
    assert train and all(r["context"]["head"] == "student" for r in train)
    assert any(key.startswith("loss_t") for r in train for key in r)
    evals = [r for r in rows if r["context"].get("subset") == "eval"]
    assert {r["context"]["steps"] for r in evals if "offline_error" in r} == {1, 2, 4}
    rollouts = {(r["context"]["head"], r["context"]["steps"]) for r in evals if "success_rate" in r}
    assert rollouts == {("teacher", 1), ("teacher", 10), ("student", 1)}  # tiny_reflow.gin's eval steps


def test_rollouts_fill_summary_plot_and_videos(runs):
    folder = runs / "tiny-reflow"
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["eval"]["teacher"]) == {"1", "10"} and set(summary["eval"]["student"]) == {"1"}
    student_1 = summary["eval"]["student"]["1"]
    assert student_1["episodes"] == 2 and student_1["latency_ms"] > 0
    # The saved student, rolled out again on the recorded protocol, has the job's episodes and rate.
    again = Evaluator(**summary["eval_protocol"], n_envs=1, videos=0, latency_calls=0).run(
        Policy.from_pretrained(folder / "student"), step_counts=(1,)
    )[1]
    recorded = json.loads((folder / jobs.EPISODES_FILE).read_text())["student"]["1"]
    assert (again["episode_seeds"], again["episode_success"]) == (recorded["seeds"], recorded["success"])
    assert again["success_rate"] == student_1["success_rate"] == sum(recorded["success"]) / 2
    assert all((folder / video).is_file() for video in student_1["videos"]) and student_1["videos"]
    assert (folder / "eval_plot.png").stat().st_size > 10_000
    assert "quality_bar" in summary


def test_rollouts_carry_intervals_protocol_and_paired_tests(runs):
    folder = runs / "tiny-reflow"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["eval_protocol"] == {
        "env_id": "reflow_exp/Sandbox-v0",
        "split": "dev",
        "seed": 0,
        "layouts": "all",
        "episodes": 2,
    }  # reflow.gin: the job rolls out on dev
    episodes = json.loads((folder / jobs.EPISODES_FILE).read_text())
    for head, by_steps in summary["eval"].items():
        for k, m in by_steps.items():
            outcome = episodes[head][k]
            assert outcome["seeds"] == episodes["teacher"]["10"]["seeds"]  # one seed list for all rows
            assert m["success_rate"] == sum(outcome["success"]) / 2
            assert 0 <= m["ci_low"] <= m["success_rate"] <= m["ci_high"] <= 1 and m["ci_high"] - m["ci_low"] > 0.5
            assert "episode_success" not in m  # per-episode lists stay out of summary.json
    assert set(summary["paired"]) == {"student@1 vs teacher@10", "student@1 vs teacher@1"}
    paired = summary["paired"]["student@1 vs teacher@10"]
    student, teacher = episodes["student"]["1"]["success"], episodes["teacher"]["10"]["success"]
    assert paired["first_only"] == sum(s and not t for s, t in zip(student, teacher))
    assert paired["n"] == 2 and 0 <= paired["p_value"] <= 1
    log = (folder / "log.txt").read_text()
    assert "split 'dev'" in log and "95% CI" in log and "student@1 vs teacher@10" in log


def test_teacher_holds_out_the_episodes_reflow_measures_on(runs, tmp_path):
    teacher = json.loads((runs / "tiny-teacher" / "summary.json").read_text())["data_split"]
    reflow = json.loads((runs / "tiny-reflow" / "summary.json").read_text())["data_split"]
    last = teacher["episodes"] - 1
    assert teacher["holdout_episodes"] == reflow["holdout_episodes"] == [last]  # tiny*.gin: HOLDOUT_EPISODES = 1
    assert teacher["train_episodes"] == last and teacher["dataset"] == reflow["dataset"]
    assert reflow["teacher_saw_holdout"] is False

    # A teacher that held out other episodes: reflow is warned that its offline frames were seen.
    (tmp_path / "checkpoints" / "last" / "pretrained_model").mkdir(parents=True)
    (tmp_path / "summary.json").write_text(json.dumps({"data_split": {**teacher, "holdout_episodes": [0]}}))
    with pytest.warns(UserWarning, match="trained on some of reflow's held-out episodes"):
        assert jobs.teacher_saw(tmp_path / "checkpoints" / "last" / "pretrained_model", reflow) is True
    assert jobs.teacher_saw(tmp_path, {**reflow, "dataset": "other"}) is None  # another dataset: unknown


def test_quality_bar_uses_the_paired_test():
    def summary(t10, t1, s1, s2=None, t2=None):
        rate = lambda r: {"success_rate": r}
        teacher = {"10": rate(t10), "1": rate(t1)} | ({"2": rate(t2)} if t2 is not None else {})
        student = {"1": rate(s1)} | ({"2": rate(s2)} if s2 is not None else {})
        return {"teacher": teacher, "student": student}

    worse = {"student@1 vs teacher@10": {"difference": -0.03, "p_value": 0.01}}
    bar = jobs.quality_bar(summary(0.90, 0.66, 0.88, s2=0.89, t2=0.90), worse)
    assert bar == {
        "teacher@10 >= 0.80": True,
        "student@1 >= 0.97 x teacher@10": True,  # 0.88 >= 0.873
        "student@1 not significantly worse than teacher@10 (p > 0.05)": False,
        "student@1 >= teacher@1 + 0.20": True,  # 0.88 >= 0.86 (exact despite float rounding)
        "student@2 >= teacher@2 - 0.02": True,
    }
    same = {"student@1 vs teacher@10": {"difference": -0.03, "p_value": 0.2}}
    bar = jobs.quality_bar(summary(0.90, 0.66, 0.86), same)
    assert bar["student@1 not significantly worse than teacher@10 (p > 0.05)"]
    assert bar["student@1 >= teacher@1 + 0.20"]  # 0.66 + 0.20 == 0.86
    assert jobs.quality_bar({"teacher": {"10": {"success_rate": 0.9}}, "student": {}}) is None


def test_exported_student_is_an_ordinary_lerobot_checkpoint(runs, make_batch):
    summary = json.loads((runs / "tiny-reflow" / "summary.json").read_text())
    folder = summary["student_checkpoint"]
    config = json.loads((runs / "tiny-reflow" / "student" / "config.json").read_text())
    assert config["type"] == "smolvla" and config["num_steps"] == 1
    lerobot_student = get_policy_class("smolvla").from_pretrained(folder).eval()
    ours = Policy.from_pretrained(folder)
    batch = make_batch(5)
    noise = torch.randn(*batch["action"].shape[:2], 32)
    assert isinstance(lerobot_student, SmolVLAPolicy)
    assert torch.allclose(
        lerobot_student.predict_action_chunk(dict(batch), noise=noise),
        ours.predict_action_chunk(dict(batch), noise=noise),
        atol=1e-6,
    )


def test_student_can_teach_a_third_round(runs, tmp_path):
    """k-rectified flow through gin alone: the student folder is a valid teacher."""
    (tmp_path / "runs").mkdir()
    student = runs / "tiny-reflow" / "student"
    run_job(
        tmp_path,
        f'reflow.teacher = "{student}"',
        'run.name = "round3"',
        "reflow.coupling = @CachedCoupling()",
        f'sandbox_source.root = "{runs.parent / "sandbox"}"',
        gin_file="gin/sandbox/tiny_reflow.gin",
    )
    assert json.loads((tmp_path / "runs" / "round3" / "summary.json").read_text())["vlm_load_count"] == 1
    assert (tmp_path / "runs" / "round3" / coupling.CachedCoupling.FILE).is_file()


def test_legacy_flags_warn(runs, tmp_path):
    with pytest.warns(UserWarning, match="load_vlm_weights.*handles it automatically"):
        assert (
            run.main(
                [
                    "--gin_file",
                    "gin/sandbox/tiny_reflow.gin",
                    "--dry_run",
                    "--gin_param",
                    f'reflow.teacher = "{runs / "tiny-teacher"}"',
                    "--gin_param",
                    "reflow.load_vlm_weights = False",
                ]
            )
            == 0
        )


SEED_LINES = ["[Reflow] Total parameters: 450,046,176", "[Reflow] Trainable parameters: 99,880,992 (22.19%)"]


def test_real_architecture_dry_run_numbers(capsys, tmp_path):
    """The seed's counts on the placeholder features, and on a real saved smolvla_base-shaped config
    (three cameras, 6-D state and action: the rehearsal's teacher) read back as LeRobot reads it."""
    from lerobot.configs.policies import PreTrainedConfig

    from reflow_exp.architectures import SHIPPED
    from reflow_exp.jobs.reflow_job import report_start_up
    from reflow_exp.rehearsal import TEACHER_CAMERAS, VLM_ID, teacher_config

    assert run.main(["--gin_file", "gin/smolvla/reflow.gin", "--dry_run"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == SEED_LINES

    teacher_config(SHIPPED[VLM_ID]).save_pretrained(tmp_path)
    config = PreTrainedConfig.from_pretrained(tmp_path)
    assert list(config.image_features) == TEACHER_CAMERAS and config.action_feature.shape == (6,)
    counts = report_start_up(config)
    assert capsys.readouterr().out.splitlines() == SEED_LINES
    assert counts["total"] == 450_046_176 and counts["trainable"] == counts["student_head"] == 99_880_992


def _tiny_reflow(teacher: Policy, pairs=None, **options) -> Reflow:
    """A Reflow of the tiny teacher into a copy of its head (uniform t, 3-step pairs by default)."""
    student = ActionHead(teacher.config, teacher.backbone, teacher.head.lerobot.state_dict())
    pairs = pairs or coupling.OnlineCoupling(teacher_steps=3)
    return Reflow(teacher.backbone, teacher.head, student, pairs, flow.uniform_time, **options)


def test_shared_and_plain_paths_give_the_same_loss(runs, make_batch):
    teacher = Policy.from_pretrained(runs / "tiny-teacher")
    batch = teacher.preprocessor(_raw_batch(make_batch(6)))
    losses = []
    for shared in (True, False):
        model = _tiny_reflow(teacher, shared_prefix=shared)
        torch.manual_seed(0)
        losses.append(model.loss(batch)[0])
    assert torch.allclose(losses[0], losses[1], atol=1e-5)


@pytest.mark.parametrize("huber", [False, True])
def test_teacher_pairs_supervise_every_chunk_step(runs, huber, make_batch):
    """The dataset's action_is_pad (steps past the episode's end) does not mask the teacher's chunk:
    the loss and the offline errors are those of an unpadded batch, and padded steps carry gradient."""
    teacher = Policy.from_pretrained(runs / "tiny-teacher")
    model = _tiny_reflow(teacher, huber=huber)
    padded = teacher.preprocessor(_raw_batch(make_batch(6)))
    assert padded["action_is_pad"].any()
    unpadded = {**padded, "action_is_pad": torch.zeros_like(padded["action_is_pad"])}
    losses = []
    for batch in (padded, unpadded):
        torch.manual_seed(0)
        losses.append(model.loss(batch)[0])
    assert torch.equal(losses[0], losses[1])
    metrics = [offline_metrics(model, [batch], reference_steps=3) for batch in (padded, unpadded)]
    assert metrics[0] == metrics[1]
    # a step past the episode's end contributes: its squared error is in the mask
    mask = model.valid_mask(torch.zeros(*padded["action"].shape[:2], teacher.config.max_action_dim))
    assert mask[padded["action_is_pad"]].sum() == padded["action_is_pad"].sum() * model.action_dim


def _raw_batch(batch: dict) -> dict:
    """A preprocessed batch back in the env-side form the policy's preprocessor takes."""
    return {
        "observation.image": batch["observation.image"],
        "observation.state": batch["observation.state"],
        "action": batch["action"],
        "action_is_pad": batch["action_is_pad"],
        "task": ["go to the red goal"] * len(batch["action"]),
    }


def test_cached_pairs_are_teacher_solutions_reused_until_the_fingerprint_changes(runs, tmp_path):
    cached = coupling.CachedCoupling(pairs_per_sample=2, teacher_steps=3)
    teacher = Policy.from_pretrained(runs / "tiny-teacher")
    model = _tiny_reflow(teacher, pairs=cached)
    source = DataSource("unused", "reflow_exp/sandbox", str(runs.parent / "sandbox" / "data"))
    meta = open_metadata(source)
    loader = make_dataloader(load_dataset(source, meta, teacher.config.chunk_size, [0]), 8, seed=0, shuffle=False)

    cached.prepare(model, loader, teacher.preprocessor, tmp_path, {"teacher": "a"})
    file = tmp_path / coupling.CachedCoupling.FILE
    chunk, dim = teacher.config.chunk_size, teacher.config.action_feature.shape[0]
    assert cached.action.shape == (len(loader.dataset), 2, chunk, dim) and cached.action.dtype == torch.bfloat16
    pair_bytes = file.stat().st_size / (len(loader.dataset) * 2)
    assert pair_bytes <= 2 * chunk * dim + 16, pair_bytes  # real action dims, bfloat16, no noise stored
    batch = teacher.preprocessor(next(iter(loader)))
    noise, action = cached.pairs(model, batch, None)
    assert noise.shape == action.shape == (8, chunk, teacher.config.max_action_dim)
    assert not action[..., dim:].any()  # padded dims are zeros, as in SmolVLA's training data
    expected = model.teacher_actions(batch, noise, 3, None)[..., :dim]  # from the regenerated noise
    # the stored x is the teacher's ODE solution from z, rounded to bfloat16
    assert torch.allclose(action[..., :dim], expected, rtol=2**-8, atol=1e-5)

    stamp = file.stat().st_mtime_ns
    cached.prepare(model, loader, teacher.preprocessor, tmp_path, {"teacher": "a"})
    assert file.stat().st_mtime_ns == stamp  # reused
    cached.prepare(model, loader, teacher.preprocessor, tmp_path, {"teacher": "b"})
    assert file.stat().st_mtime_ns != stamp  # the teacher changed: regenerated


def test_a_finished_teacher_run_resumes_from_its_last_checkpoint(runs, tmp_path):
    """Same run name, more steps: training continues from checkpoint 6, not from scratch."""
    import shutil

    shutil.copytree(runs / "tiny-teacher", tmp_path / "runs" / "tiny-teacher", symlinks=True)
    run_job(tmp_path, "Trainer.steps = 8", f'sandbox_source.root = "{runs.parent / "sandbox"}"')
    log = (tmp_path / "runs" / "tiny-teacher" / "log.txt").read_text()
    assert "Resuming training from" in log and "(step 6 of 8)" in log
    summary = json.loads((tmp_path / "runs" / "tiny-teacher" / "summary.json").read_text())
    assert summary["train"]["steps"] == 8


def test_intermediate_reflow_checkpoints_are_slim_and_resume_bit_identically(runs, tmp_path):
    """Checkpoint 2 of 4 holds the student's training state and the teacher's digest, no
    pretrained_model; the last is full. Resuming from the slim one ends on the same student."""
    import shutil

    from reflow_exp.files import file_digest
    from reflow_exp.policy import resolve_policy_folder

    checkpoints = runs / "tiny-reflow" / "checkpoints"
    assert not (checkpoints / "000002" / "pretrained_model").exists()
    assert (checkpoints / "000004" / "pretrained_model" / "model.safetensors").is_file()
    reference = json.loads((checkpoints / "000002" / "training_state" / "frozen_reference.json").read_text())
    teacher_weights = resolve_policy_folder(runs / "tiny-teacher") / "model.safetensors"
    assert reference == {"teacher_sha256": file_digest(teacher_weights)}

    copy = tmp_path / "runs" / "tiny-reflow"
    shutil.copytree(runs / "tiny-reflow", copy, symlinks=True)
    shutil.rmtree(copy / "checkpoints" / "000004")
    (copy / "checkpoints" / "last").unlink()
    teacher = runs / "tiny-teacher"
    run_job(
        tmp_path,
        f'reflow.teacher = "{teacher}"',
        f'sandbox_source.root = "{runs.parent / "sandbox"}"',
        gin_file="gin/sandbox/tiny_reflow.gin",
    )
    assert "Resuming training from" in (copy / "log.txt").read_text()
    params = "training_state/trainable_params.safetensors"
    resumed, uninterrupted = (load_file(folder / "000004" / params) for folder in (copy / "checkpoints", checkpoints))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
