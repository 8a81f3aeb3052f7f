"""LeRobot's own commands on our code (plugins/): `lerobot-train --policy.type=smolvla_reflow` and
`lerobot-eval --env.type=reflow_sandbox`, run as real processes on the CPU with the tiny sandbox
teacher; the export of the student as a plain SmolVLA folder; the plugin's loss against reflow_exp's."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PLUGINS = {"lerobot_policy_smolvla_reflow": "lerobot_policy_", "lerobot_env_reflow_sandbox": "lerobot_env_"}
ENV = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


# -- discovery ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PLUGINS)
def test_plugin_is_installed_under_a_name_lerobot_discovers(name):
    """LeRobot imports a plugin by its installed metadata Name: dashes (a normalising build backend)
    would make the import fail, and the policy or env type would silently not exist."""
    try:
        installed = importlib.metadata.distribution(name).metadata["Name"]
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is not installed: run `make setup` (it installs plugins/{name} editable)")
    assert installed == name, f"installed Name {installed!r}: LeRobot would import {installed!r}, not {name!r}"
    assert installed.startswith(PLUGINS[name])


def test_lerobot_discovery_registers_both_types():
    """LeRobot's own discovery, in a fresh process: after it, both types are known choices."""
    code = (
        "from lerobot.utils.import_utils import register_third_party_plugins\n"
        "from lerobot.configs.policies import PreTrainedConfig\n"
        "from lerobot.envs.configs import EnvConfig\n"
        "register_third_party_plugins()\n"
        "print(PreTrainedConfig.get_choice_class('smolvla_reflow').__name__)\n"
        "print(EnvConfig.get_choice_class('reflow_sandbox').__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["SmolVLAReflowConfig", "ReflowSandboxEnv"]


# -- bad input ---------------------------------------------------------------------------------


def test_missing_teacher_flag_fails_before_the_dataset(tmp_path):
    result = subprocess.run(
        [
            str(BIN / "lerobot-train"),
            "--policy.type=smolvla_reflow",
            "--dataset.repo_id=nobody/no_such_dataset",
            f"--output_dir={tmp_path / 'out'}",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "--policy.teacher_model_path" in result.stderr
    assert "Creating dataset" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_teacher_of_another_type_is_refused_as_reflow_exp_does(tmp_path):
    from lerobot_policy_smolvla_reflow import SmolVLAReflowConfig
    from lerobot_policy_smolvla_reflow.configuration_smolvla_reflow import SmolVLAReflowConfigError

    from reflow_exp.policy import check_smolvla_folder

    (tmp_path / "config.json").write_text(json.dumps({"type": "act"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as ours:
        check_smolvla_folder(tmp_path)
    with pytest.raises(SmolVLAReflowConfigError) as plugin:
        SmolVLAReflowConfig(teacher_model_path=str(tmp_path), device="cpu")
    assert str(plugin.value) == str(ours.value)


def test_use_reflow_false_is_refused(tiny_teacher):
    from lerobot_policy_smolvla_reflow import SmolVLAReflowConfig
    from lerobot_policy_smolvla_reflow.configuration_smolvla_reflow import SmolVLAReflowConfigError

    with pytest.raises(SmolVLAReflowConfigError, match="--policy.type=smolvla"):
        SmolVLAReflowConfig(teacher_model_path=str(tiny_teacher), use_reflow=False, device="cpu")


def test_legacy_flags_only_warn_and_architecture_comes_from_the_teacher(tiny_teacher):
    from lerobot_policy_smolvla_reflow import SmolVLAReflowConfig

    with pytest.warns(UserWarning, match="train_expert_only=True is ignored"):
        config = SmolVLAReflowConfig(teacher_model_path=str(tiny_teacher), train_expert_only=True, device="cpu")
    teacher = json.loads((tiny_teacher / "checkpoints/last/pretrained_model/config.json").read_text())
    assert (config.chunk_size, config.num_vlm_layers, config.vlm_model_name) == (
        teacher["chunk_size"],
        teacher["num_vlm_layers"],
        teacher["vlm_model_name"],
    )
    assert config.num_steps == 1 and config.train_expert_only is None


# -- parity with reflow_exp --------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"time_sampler": "u_shaped", "huber": False, "shared_prefix": True},
        {"time_sampler": "uniform", "huber": True, "shared_prefix": False},
    ],
)
def test_plugin_loss_equals_reflow_exp_loss(tiny_teacher, settings):
    """Same batch, same noise and t (one seed before each call): the plugin's loss and metrics are
    reflow_exp's, for the shared-prefix and LeRobot's plain path alike."""
    from lerobot.datasets import LeRobotDataset
    from lerobot_policy_smolvla_reflow import SmolVLAReflowConfig
    from lerobot_policy_smolvla_reflow.modeling_smolvla_reflow import SmolVLAReflowPolicy
    from lerobot_policy_smolvla_reflow.processor_smolvla_reflow import make_smolvla_reflow_pre_post_processors

    from reflow_exp import flow
    from reflow_exp.coupling import OnlineCoupling
    from reflow_exp.jobs.builders import student_head
    from reflow_exp.policy import Policy
    from reflow_exp.reflow import Reflow

    config = SmolVLAReflowConfig(teacher_model_path=str(tiny_teacher), teacher_steps=3, device="cpu", **settings)
    plugin = SmolVLAReflowPolicy(config).train()
    teacher = Policy.from_pretrained(tiny_teacher)
    ours = Reflow(
        teacher.backbone,
        teacher.head,
        student_head(teacher, 1, None),
        OnlineCoupling(3),
        {"u_shaped": flow.u_shaped_time, "uniform": flow.uniform_time}[settings["time_sampler"]],
        settings["huber"],
        settings["shared_prefix"],
    ).train()

    fps, chunk = 10, config.chunk_size
    dataset = LeRobotDataset(
        "reflow_exp/sandbox",
        root=tiny_teacher.parent / "sandbox" / "data",
        delta_timestamps={"action": [i / fps for i in range(chunk)]},
    )
    raw = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)))
    plugin_batch = make_smolvla_reflow_pre_post_processors(config)[0](dict(raw))
    our_batch = teacher.preprocessor(dict(raw))

    torch.manual_seed(7)
    plugin_loss, plugin_metrics = plugin(plugin_batch)
    torch.manual_seed(7)
    our_loss, our_metrics = ours.loss(our_batch)
    torch.testing.assert_close(plugin_loss, our_loss, rtol=1e-6, atol=1e-7)
    assert plugin_metrics.keys() == our_metrics.keys()
    for key in our_metrics:
        assert plugin_metrics[key] == pytest.approx(our_metrics[key], rel=1e-5)


# -- lerobot-train, SIGKILL, --resume=true -------------------------------------------------------


def _train_argv(teacher: Path, out: Path, steps: int) -> list[str]:
    return [
        str(BIN / "lerobot-train"),
        "--policy.type=smolvla_reflow",
        f"--policy.teacher_model_path={teacher / 'checkpoints/last/pretrained_model'}",
        "--dataset.repo_id=reflow_exp/sandbox",
        f"--dataset.root={teacher.parent / 'sandbox' / 'data'}",
        "--batch_size=8",
        f"--steps={steps}",
        "--save_freq=2",
        f"--output_dir={out}",
        "--policy.optimizer_lr=1e-4",
        "--policy.freeze_vision_encoder=true",
        "--policy.use_reflow=true",
        "--policy.load_vlm_weights=false",
        "--policy.device=cpu",
        "--num_workers=0",
        "--log_freq=1",
    ]


def _saved_step(out: Path) -> int | None:
    """The step of `checkpoints/last` once its training state is written."""
    step_file = out / "checkpoints" / "last" / "training_state" / "training_step.json"
    try:
        return json.loads(step_file.read_text())["step"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_teacher, tmp_path_factory):
    """A lerobot-train run SIGKILLed after its checkpoint at step >= 4, then `--resume=true` for two
    more steps: {"out", "first_log", "resume_log", "killed_at", "resume_rc"}."""
    root = tmp_path_factory.mktemp("lerobot-train")
    out, first_log, resume_log = root / "out", root / "first.log", root / "resume.log"
    with first_log.open("w") as log:
        process = subprocess.Popen(
            _train_argv(tiny_teacher, out, steps=10_000),
            cwd=root,
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 240
            while (_saved_step(out) or 0) < 4 and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    killed_at = _saved_step(out)
    assert killed_at is not None and killed_at >= 4, first_log.read_text()[-3000:]
    resume = subprocess.run(
        [
            str(BIN / "lerobot-train"),
            f"--config_path={out / 'checkpoints/last/pretrained_model/train_config.json'}",
            "--resume=true",
            f"--steps={killed_at + 2}",
        ],
        cwd=root,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    resume_log.write_text(resume.stdout + resume.stderr)
    return {
        "out": out,
        "first_log": first_log.read_text(),
        "resume_log": resume_log.read_text(),
        "killed_at": killed_at,
        "resume_rc": resume.returncode,
    }


def test_lerobot_train_prints_the_seed_start_up_and_loads_the_vlm_once(killed_and_resumed):
    log = killed_and_resumed["first_log"]
    lines = [line for line in log.splitlines() if line.startswith(("[Reflow]", "Loading "))]
    expected = [  # DESIGN.md §2, in this order
        "[Reflow] Loading teacher model from ",
        "Loading ",
        "[Reflow] ✓ Teacher loaded and frozen",
        "[Reflow] Creating student model (copying weights from teacher)",
        "[Reflow] ✓ Student initialized from teacher",
        "[Reflow] Total parameters: ",
        "[Reflow] Trainable parameters: ",
    ]
    assert len(lines) >= len(expected), log[-3000:]
    assert all(line.startswith(start) for line, start in zip(lines, expected)), lines
    assert sum(line.endswith("weights ...") for line in lines) == 1  # the VLM is read once
    assert "--policy.load_vlm_weights=False is ignored" in log


def test_lerobot_train_resumes_a_killed_run_from_its_last_save(killed_and_resumed):
    run = killed_and_resumed
    assert run["resume_rc"] == 0, run["resume_log"][-3000:]
    assert f"step:{run['killed_at'] + 1} " in run["resume_log"]
    assert f"step:{run['killed_at']} " not in run["resume_log"]
    assert _saved_step(run["out"]) == run["killed_at"] + 2
    assert "Loading the smolvla_reflow checkpoint weights" in run["resume_log"]  # not the teacher again


# -- checkpoints without the plugin, and lerobot-eval -------------------------------------------


@pytest.fixture(scope="module")
def exported(killed_and_resumed):
    """The final student exported by the one-line command, as a plain SmolVLA folder."""
    checkpoint = killed_and_resumed["out"] / "checkpoints" / "last" / "pretrained_model"
    student = killed_and_resumed["out"].parent / "student"
    result = subprocess.run(
        [sys.executable, "-m", "lerobot_policy_smolvla_reflow.export", str(checkpoint), str(student)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return checkpoint, student


def test_export_is_the_checkpoint_s_student(exported):
    from safetensors.torch import load_file

    checkpoint, student = exported
    ours, theirs = load_file(checkpoint / "model.safetensors"), load_file(student / "model.safetensors")
    for key, value in theirs.items():
        source = "reflow.backbone.vlm." + key.removeprefix("model.vlm_with_expert.vlm.")
        if source not in ours:
            source = "reflow.student.lerobot." + key
        assert torch.equal(value, ours[source]), key
    config = json.loads((student / "config.json").read_text())
    assert (config["type"], config["num_steps"]) == ("smolvla", 1)


def test_export_loads_in_lerobot_without_the_plugin(exported):
    """SmolVLAPolicy.from_pretrained in a process that never imports the plugin; it samples a chunk."""
    _, student = exported
    code = f"""
import sys, torch
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.policies.factory import make_pre_post_processors
policy = SmolVLAPolicy.from_pretrained({str(student)!r}).eval()
pre, post = make_pre_post_processors(policy.config, pretrained_path={str(student)!r})
batch = pre({{"observation.image": torch.rand(1, 3, 64, 64), "observation.state": torch.rand(1, 2),
             "task": ["go to the red goal"]}})
chunk = post(policy.predict_action_chunk(batch))
assert not [m for m in sys.modules if m.startswith(("lerobot_policy_", "lerobot_env_"))], "a plugin was imported"
print(type(policy).__name__, policy.config.num_steps, tuple(chunk.shape))
"""
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "SmolVLAPolicy 1 (1, 16, 2)"


@pytest.mark.parametrize("which", ["exported student", "training checkpoint"])
def test_lerobot_eval_rolls_out_in_the_sandbox(exported, tmp_path, which):
    """LeRobot's own eval loop on our env plugin, for the plain export and for what lerobot-train saved."""
    checkpoint, student = exported
    policy = student if which == "exported student" else checkpoint
    result = subprocess.run(
        [
            str(BIN / "lerobot-eval"),
            f"--policy.path={policy}",
            "--env.type=reflow_sandbox",
            "--eval.n_episodes=4",
            "--eval.batch_size=2",
            "--policy.device=cpu",
            "--seed=2000000000",
            f"--output_dir={tmp_path / 'eval'}",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 4
    assert len(info["per_task"][0]["metrics"]["successes"]) == 4


def test_agreement_script_runs_both_loops_on_the_same_seeds(exported, tmp_path):
    """scripts/lerobot_eval_agreement.py end to end on a few episodes (README reports its 100-episode run)."""
    _, student = exported
    out = tmp_path / "agreement.json"
    result = subprocess.run(
        [sys.executable, "scripts/lerobot_eval_agreement.py", str(student), "--episodes", "4", "--batch_size", "2"]
        + ["--out", str(out)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["lerobot_eval"]["episodes"] == found["evaluate_policies"]["episodes"] == 4
    assert found["seeds"] == [2_000_000_000, 2_000_000_003]
    assert "95% CI" in result.stdout
