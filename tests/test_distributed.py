"""Several processes and the device: torchrun / accelerate launch with 2 gloo processes on the CPU, and
the clear errors for a missing GPU, an unreachable rank 0 and a device without bf16 (bf16 training on
the CPU is tested through scripts/gpu_check.sh in test_scripts.py).

The 2-process runs are real `torchrun` / `accelerate launch` subprocesses; their 1-process
references run in-process with the same global batch (2 × 4 = 8).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reflow_exp import distributed
from reflow_exp import run as run_cli
from reflow_exp.files import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEACHER_GIN = "gin/sandbox/tiny.gin"
REFLOW_GIN = "gin/sandbox/tiny_reflow.gin"


def bindings(tmp: Path, name: str, *extra: str) -> list[str]:
    params = [
        f'run.runs_dir = "{tmp / "runs"}"',
        f'sandbox_source.root = "{tmp / "sandbox"}"',
        f'run.name = "{name}"',
        "Trainer.log_every = 1",
        *extra,
    ]
    return [arg for p in params for arg in ("--gin_param", p)]


def launch(launcher: list[str], gin_file: str, params: list[str], env: dict | None = None, timeout: float = 300):
    """Run `<launcher> -m reflow_exp.run ...` from the repo root; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    command = [*launcher, "-m", "reflow_exp.run", "--gin_file", gin_file, *params]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["context"].get("subset") == "train"]


def aim_runs(runs_dir: Path) -> list[str]:
    return sorted(p.name for p in (runs_dir / ".aim" / "meta" / "chunks").iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torchrun):
    """A tiny teacher and a tiny reflow (cached pairs), each with 2 processes (torchrun, 4 frames
    per process) and with 1 process (in-process, 8 frames)."""
    tmp = tmp_path_factory.mktemp("dist")
    results = {}
    # torchrun first: its rank 0 builds the sandbox while rank 1 waits (distributed.main_first).
    results["teacher2"] = launch(torchrun(), TEACHER_GIN, bindings(tmp, "teacher2", "train_teacher.batch_size = 4"))
    assert results["teacher2"].returncode == 0, results["teacher2"].stderr[-3000:]
    assert run_cli.main(["--gin_file", TEACHER_GIN, *bindings(tmp, "teacher1", "train_teacher.batch_size = 8")]) == 0

    reflow = [
        f'reflow.teacher = "{tmp / "runs" / "teacher2"}"',
        "reflow.coupling = @CachedCoupling()",
        "CachedCoupling.pairs_per_sample = 2",
        "CachedCoupling.teacher_steps = 3",
    ]
    results["reflow2"] = launch(torchrun(), REFLOW_GIN, bindings(tmp, "reflow2", *reflow, "reflow.batch_size = 4"))
    assert results["reflow2"].returncode == 0, results["reflow2"].stderr[-3000:]
    assert run_cli.main(["--gin_file", REFLOW_GIN, *bindings(tmp, "reflow1", *reflow, "reflow.batch_size = 8")]) == 0
    return tmp, results


def test_two_processes_write_one_run_folder_one_aim_run_one_set_of_checkpoints(runs):
    tmp, _ = runs
    folders = sorted(p.name for p in (tmp / "runs").iterdir() if not p.name.startswith("."))
    assert folders == ["reflow1", "reflow2", "teacher1", "teacher2"]  # nothing made by a second rank
    assert len(aim_runs(tmp / "runs")) == 4  # one Aim run per run folder
    for name in ("teacher2", "reflow2"):
        run = tmp / "runs" / name
        aim_hash = (run / "aim_run_hash.txt").read_text().strip()
        assert aim_hash in aim_runs(tmp / "runs")
        log = (run / "log.txt").read_text()
        assert "on cpu, 2 processes (gloo)" in log
        steps = [line for line in log.splitlines() if line.startswith("step 0/")]
        assert len(steps) == 1  # one process logged
    assert sorted(os.listdir(tmp / "runs" / "teacher2" / "checkpoints")) == ["000003", "000006", "last"]
    assert sorted(os.listdir(tmp / "runs" / "reflow2" / "checkpoints")) == ["000002", "000004", "last"]
    reflow2 = tmp / "runs" / "reflow2"
    assert (reflow2 / "student" / "model.safetensors").is_file()
    assert "eval" in json.loads((reflow2 / "summary.json").read_text())  # rank 0 ran the rollouts
    assert [p.name for p in reflow2.glob("reflow_pairs*")] == ["reflow_pairs.safetensors"]  # parts merged


def test_first_logged_loss_equals_one_process_with_the_same_global_batch(runs):
    tmp, _ = runs
    for two, one in (("teacher2", "teacher1"), ("reflow2", "reflow1")):
        losses2, losses1 = train_losses(tmp / "runs" / two), train_losses(tmp / "runs" / one)
        assert losses2[0] == pytest.approx(losses1[0], rel=1e-5), (two, losses2[0], losses1[0])
        # Every later step too: same data, noise, pairs, global mean over valid entries, update.
        assert losses2 == pytest.approx(losses1, rel=1e-4), two


def test_cached_pairs_do_not_depend_on_the_number_of_processes(runs):
    from safetensors.torch import load_file

    tmp, _ = runs
    two = load_file(str(tmp / "runs" / "reflow2" / "reflow_pairs.safetensors"))
    one = load_file(str(tmp / "runs" / "reflow1" / "reflow_pairs.safetensors"))
    order2, order1 = torch.argsort(two["index"]), torch.argsort(one["index"])
    assert torch.equal(two["index"][order2], one["index"][order1])
    assert "noise" not in two  # regenerated from (seed, frame index)
    assert torch.allclose(two["action"][order2].float(), one["action"][order1].float(), rtol=2**-7, atol=1e-5)


def test_accelerate_launch_two_cpu_processes_resume_the_run(runs):
    """`accelerate launch --multi_gpu --num_processes 2` starts 2 processes (torchrun underneath);
    without CUDA they use gloo on the CPU. The finished 6-step teacher resumes to step 8."""
    tmp, _ = runs
    shutil.copytree(tmp / "runs" / "teacher2", tmp / "runs" / "teacher2-resumed", symlinks=True)
    launcher = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    params = bindings(tmp, "teacher2-resumed", "train_teacher.batch_size = 4", "Trainer.steps = 8")
    result = launch(launcher, TEACHER_GIN, params)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp / "runs" / "teacher2-resumed"
    log = (run / "log.txt").read_text()
    assert "Resuming training from" in log and "(step 6 of 8)" in log
    assert log.count("Job train_teacher in") == 2  # the first run and this one: rank 0 only
    assert sorted(os.listdir(run / "checkpoints")) == ["000003", "000006", "000008", "last"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(8) == 1 and steps.count(7) == 1


def test_a_gpu_index_that_does_not_exist_fails_before_the_run_folder(tmp_path):
    result = launch([sys.executable], TEACHER_GIN, bindings(tmp_path, "gpu9"), env={"CUDA_VISIBLE_DEVICES": "9"})
    assert result.returncode == 2
    assert "CUDA_VISIBLE_DEVICES=9 names 1 GPU(s) but CUDA sees" in result.stderr and "nvidia-smi" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_process_that_cannot_reach_rank_0_times_out_with_a_message(tmp_path):
    port = free_port()  # nobody listens there
    env = {
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    result = launch(
        [sys.executable], TEACHER_GIN, bindings(tmp_path, "lonely", "run.dist_timeout_s = 3"), env=env, timeout=120
    )
    assert result.returncode == 1
    assert f"rank 1 of 2 could not reach rank 0 at 127.0.0.1:{port} within 3 s" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_dry_run_names_the_device(capsys, tmp_path):
    assert run_cli.main(["--gin_file", TEACHER_GIN, *bindings(tmp_path, "dry"), "--dry_run"]) == 0
    assert "Device: cpu, 1 process" in capsys.readouterr().out


def test_rank_rows_split_one_global_draw():
    """One process: the draw itself (what a single process with the global batch gets)."""
    torch.manual_seed(0)
    rows = distributed.rank_rows(lambda n: torch.randn(n, 3), 4)
    torch.manual_seed(0)
    assert torch.equal(rows, torch.randn(4, 3))


def test_mixed_precision_the_device_cannot_run_is_refused(monkeypatch):
    """No GPU here: the CUDA answers are stubbed to those of a pre-Ampere GPU (a V100)."""
    distributed.check_mixed_precision("bf16")  # the CPU runs bf16 autocast
    with pytest.raises(ValueError, match="fp16' needs a CUDA GPU"):
        distributed.check_mixed_precision("fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    with pytest.raises(ValueError, match="Tesla V100-SXM2-16GB has none .*Use Trainer.mixed_precision='fp16' or 'no'"):
        distributed.check_mixed_precision("bf16")
