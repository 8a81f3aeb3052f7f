"""The shell entry points: scripts/gpu_check.sh (its CPU dry mode trains the tiny teacher and reflow in
bf16; without a GPU the real mode refuses at once) and examples/train_2rf_with_teacher.sh (the seed
system's flags, run on the sandbox on the CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SEED_SCRIPT = REPO / "examples" / "train_2rf_with_teacher.sh"
GPU_CHECK = REPO / "scripts" / "gpu_check.sh"


def sh(script: Path, *args: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 300):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        ["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def gpu_check_cpu(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = sh(GPU_CHECK, "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out, result


def test_gpu_check_without_a_gpu_refuses_at_once(tmp_path):
    result = sh(
        GPU_CHECK,
        "--out",
        str(tmp_path / "out"),
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 2
    assert "no CUDA GPU here" in result.stderr and "--device cpu" in result.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_cpu_mode_trains_teacher_and_reflow_in_bf16(gpu_check_cpu):
    out, result = gpu_check_cpu
    lines = result.stdout.splitlines()
    for name in ("gpu-teacher", "gpu-reflow"):
        (line,) = [line for line in lines if line.strip().startswith(f"{name}: device")]
        assert "device cpu, 1 process; vlm_load_count 1; loss " in line and "steps/s" in line
        run = out / "runs" / name
        assert "Trainer.mixed_precision = 'bf16'" in (run / "operative_config.gin").read_text()
        losses = [
            json.loads(r)["loss"]
            for r in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(r)["context"].get("subset") == "train"
        ]
        assert losses and all(0 < v < 100 for v in losses)
    assert any("gpu-reflow: student@1 success" in line for line in lines)  # rollouts on the device too
    assert "gpu_check: done in" in lines[-1]


def test_seed_script_runs_the_sandbox_reflow_with_the_seed_flags(gpu_check_cpu, tmp_path):
    out, _ = gpu_check_cpu
    teacher, sandbox = out / "runs" / "gpu-teacher", out / "runs" / "sandbox"
    result = sh(
        SEED_SCRIPT,
        f"--policy.teacher_model_path={teacher}",
        "--batch_size=8",
        "--steps=2",
        "--save_freq=2",
        "--output_dir=outputs/seed-reflow",
        "--policy.use_reflow=true",
        "--policy.optimizer_lr=3e-4",
        "--policy.freeze_vision_encoder=false",
        "--policy.train_expert_only=true",
        f'--gin_param=sandbox_source.root = "{sandbox}"',
        "--gin_param=reflow.teacher_eval_steps = ()",
        "--gin_param=reflow.student_eval_steps = ()",
        "--gin_param=Tracker.enabled = False",
        env={"CUDA_VISIBLE_DEVICES": "", "GIN_FILE": str(REPO / "gin" / "sandbox" / "tiny_reflow.gin")},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "outputs" / "seed-reflow"  # --output_dir, relative to the caller's directory
    operative = (run / "operative_config.gin").read_text()
    for binding in ("reflow.batch_size = 8", "Trainer.steps = 2", "Trainer.save_every = 2", "Trainer.lr = 0.0003"):
        assert binding in operative
    assert sorted(os.listdir(run / "checkpoints")) == ["000002", "last"]
    student = json.loads((run / "student" / "config.json").read_text())
    assert student["freeze_vision_encoder"] is False and student["num_steps"] == 1
    assert "reflow.train_expert_only=True is ignored: reflow handles it automatically" in result.stderr


def test_seed_script_runs_one_process_per_gpu():
    flags = ["--policy.teacher_model_path=t", "--print_command"]
    several = sh(SEED_SCRIPT, *flags, env={"CUDA_VISIBLE_DEVICES": "2,3", "MASTER_PORT": "29999"}, timeout=30)
    assert several.returncode == 0, several.stderr
    assert "-m torch.distributed.run --nproc_per_node 2 --master_port 29999 -m reflow_exp.run" in several.stdout
    one = sh(SEED_SCRIPT, *flags, env={"CUDA_VISIBLE_DEVICES": "2"}, timeout=30)
    assert "torch.distributed.run" not in one.stdout and " -m reflow_exp.run --gin_file " in one.stdout


def test_seed_script_passes_the_dataset_folder_and_rename_map_as_lerobot_train_does():
    rename = '{"observation.images.top": "observation.images.camera1"}'
    flags = ["--policy.teacher_model_path=t", "--dataset.root=data/so100", f"--rename_map={rename}"]
    result = sh(SEED_SCRIPT, *flags, "--print_command", timeout=30)
    assert result.returncode == 0, result.stderr
    assert r"lerobot_source.root\ =\ \"data/so100\"" in result.stdout
    assert r"lerobot_source.rename_map\ =\ \{\"observation.images.top\":" in result.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--policy.teacher_model_path=t", "--policy.use_reflow=false"], "this script only runs reflow"),
        (["--batch_size=8"], "the teacher is required"),
        (
            ["--policy.teacher_model_path=t", "--policy.freeze_vision_encoder=maybe"],
            "must be true or false, got 'maybe'",
        ),
        (["--policy.teacher_model_path=t", "--wandb.enable=true"], "unknown argument '--wandb.enable=true'"),
    ],
)
def test_seed_script_bad_flags(args, words):
    result = sh(SEED_SCRIPT, *args, "--print_command", timeout=30)
    assert result.returncode == 2 and words in result.stderr
