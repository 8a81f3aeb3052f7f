"""Trainer on a toy regression: loss falls, checkpoints are complete, a SIGKILLed run resumes
exactly where it left off and ends with the same parameters as an uninterrupted run.

Also runnable as a script (the process the resume test kills)::

    python tests/test_trainer.py RUN_DIR STEPS [slim]
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # when run as a script

from reflow_exp.rundir import RunDir, seed_everything  # noqa: E402
from reflow_exp.tracking import Tracker  # noqa: E402
from reflow_exp.trainer import Trainer  # noqa: E402


class ToyRegression(nn.Module):
    """y = x·w + b with a frozen input layer; noise in the loss exercises RNG restore."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.frozen = nn.Linear(dim, dim)  # like the shared backbone: not trained, not in training_state
        self.frozen.requires_grad_(False)
        with torch.no_grad():  # a well-conditioned "backbone", so 40 steps are enough to learn
            self.frozen.weight.copy_(torch.eye(dim))
            self.frozen.bias.zero_()
        self.head = nn.Linear(dim, 1)

    def loss(self, batch):
        if os.environ.get("TOY_SLOW"):
            time.sleep(0.05)  # give the test time to SIGKILL between checkpoints
        pred = self.head(self.frozen(batch["x"]))  # (B, 1)
        target = batch["y"] + 0.01 * torch.randn_like(batch["y"])  # draws from the global RNG
        loss = nn.functional.mse_loss(pred, target)
        return loss, {"mae": (pred - batch["y"]).abs().mean().item()}

    def save_pretrained(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")


class SlimToy(ToyRegression):
    """ToyRegression naming its frozen layer by a digest: intermediate checkpoints are slim."""

    def frozen_reference(self) -> dict:
        weights = torch.cat([p.detach().reshape(-1) for p in self.frozen.parameters()])
        return {"frozen_sha256": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}


class ToyData(Dataset):
    def __init__(self, n: int = 48, dim: int = 4):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def train(
    run_dir: Path, steps: int, tracker: bool = False, evaluated: list | None = None, slim: bool = False, model=None
) -> dict:
    """A whole toy job: seed, build, fit. Same seed → same run. `slim`: a `SlimToy`."""
    seed_everything(0)
    model = model or (SlimToy() if slim else ToyRegression())
    loader = DataLoader(ToyData(), batch_size=8, shuffle=True)  # 6 batches per epoch
    trainer = Trainer(steps=steps, lr=0.2, warmup_steps=3, decay_lr=1e-3, log_every=5, save_every=10, eval_every=20)

    def evaluate(step: int) -> None:
        assert not torch.is_grad_enabled()
        model.eval()
        (evaluated if evaluated is not None else []).append(step)

    with RunDir(run_dir, seed=0, tracker=Tracker(run_dir, enabled=tracker)) as run:
        result = trainer.fit(model, loader, run, context={"head": "student"}, evaluate=evaluate)
    assert model.training  # back in train mode after evaluate
    return result


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_checkpoint_is_complete(tmp_path):
    run_dir = tmp_path / "runs" / "toy"
    evaluated = []
    result = train(run_dir, steps=40, evaluated=evaluated)
    assert evaluated == [20]  # every eval_every steps, not after the last one

    assert result["steps"] == 40
    assert result["last_loss"] < 0.1 * result["first_loss"], result
    assert result["checkpoint"] == run_dir / "checkpoints" / "000040"
    assert result["steps_per_s"] > 0

    records = _records(run_dir)
    assert [r["step"] for r in records] == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert records[0]["loss"] == result["first_loss"]  # the loss at start, before any update
    assert set(records[1]) >= {"loss", "lr", "grad_norm", "steps_per_s", "mae"}
    assert records[1]["context"] == {"subset": "train", "head": "student"}
    assert abs(records[-1]["lr"] - 1e-3) < 1e-9  # cosine decay ends at decay_lr
    assert max(r["lr"] for r in records[1:]) <= 0.2

    ckpt = result["checkpoint"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "000010",
        "000020",
        "000030",
        "000040",
        "last",
    ]
    assert (ckpt / "pretrained_model" / "model.safetensors").exists()
    state = ckpt / "training_state"
    assert set(load_file(state / "trainable_params.safetensors")) == {"head.weight", "head.bias"}
    for name in (
        "optimizer_state.safetensors",
        "optimizer_param_groups.json",
        "scheduler_state.json",
        "rng_state.safetensors",
    ):
        assert (state / name).exists(), name
    assert json.loads((state / "training_step.json").read_text())["step"] == 40
    log = (run_dir / "log.txt").read_text()
    assert "step 40/40 | loss" in log and "Saved checkpoint" in log

    # Running again: nothing left to do, same checkpoint reported.
    again = train(run_dir, steps=40)
    assert again["steps"] == 40 and again["checkpoint"] == ckpt and again["first_loss"] == result["first_loss"]


@pytest.mark.parametrize("slim", [False, True])
def test_sigkilled_run_resumes_to_identical_parameters(tmp_path, slim):
    steps = 30
    killed = tmp_path / "runs" / "killed"
    child = subprocess.Popen(
        [sys.executable, __file__, str(killed), str(steps), *(["slim"] if slim else [])],
        cwd=REPO,
        env=os.environ | {"TOY_SLOW": "1", "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 50
        while not (killed / "checkpoints" / "last").exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 50 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    saved = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] != f"{steps:06d}", "the child finished before it was killed"
    saved_step = int(saved[-1])
    assert (killed / "checkpoints" / saved[-1] / "pretrained_model").is_dir() != slim

    resumed = train(killed, steps, tracker=True, slim=slim)  # reopens the killed process's Aim run too
    reference = train(tmp_path / "runs" / "reference", steps)

    assert resumed["steps"] == reference["steps"] == steps
    assert resumed["first_loss"] == reference["first_loss"]
    log = (killed / "log.txt").read_text()
    assert f"Resuming from {killed / 'checkpoints' / saved[-1]} (step {saved_step})" in log
    assert f"Resuming training from {killed / 'checkpoints' / saved[-1]} (step {saved_step} of {steps})" in log
    after_resume = [r["step"] for r in _records(killed)][-(steps - saved_step) // 5 :]
    assert after_resume[0] == saved_step + 5 and after_resume[-1] == steps

    final = load_file(resumed["checkpoint"] / "training_state" / "trainable_params.safetensors")
    expected = load_file(reference["checkpoint"] / "training_state" / "trainable_params.safetensors")
    for name in expected:
        assert torch.equal(final[name], expected[name]), name


def test_slim_checkpoints_hold_the_training_state_and_refuse_another_frozen_part(tmp_path):
    run_dir = tmp_path / "runs" / "slim"
    result = train(run_dir, steps=20, slim=True)
    middle, last = run_dir / "checkpoints" / "000010", result["checkpoint"]
    assert sorted(p.name for p in middle.iterdir()) == ["operative_config.gin", "training_state"]
    assert (last / "pretrained_model" / "model.safetensors").is_file()  # the last save is full
    reference = json.loads((middle / "training_state" / "frozen_reference.json").read_text())
    assert reference == SlimToy().frozen_reference()

    shutil.rmtree(last)  # resume from the slim one, with another frozen layer
    (run_dir / "checkpoints" / "last").unlink()
    changed = SlimToy()
    with torch.no_grad():
        changed.frozen.bias.add_(1.0)
    with pytest.raises(ValueError, match="the frozen part .* changed"):
        train(run_dir, steps=20, model=changed)
    assert train(run_dir, steps=20, slim=True)["checkpoint"] == last  # the same frozen part resumes


if __name__ == "__main__":
    train(Path(sys.argv[1]), int(sys.argv[2]), tracker=True, slim=sys.argv[3:] == ["slim"])
