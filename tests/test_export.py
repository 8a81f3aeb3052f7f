"""ONNX export of a tiny SmolVLA (reflow_exp.export) and its runner (reflow_exp.onnx_policy):
parity with PyTorch, rollouts, and refusals of bad input."""

import hashlib
import json
import sys

import pytest
import torch

from reflow_exp.chunk_policy import SmolVLAChunkPolicy
from reflow_exp.evaluate import Evaluator
from reflow_exp.export import main as export_main
from reflow_exp.onnx_policy import OnnxPolicy

STEPS = 2  # Euler steps unrolled into the exported graph (t=1 noise -> t=0 action)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_vlm, tiny_policy, sandbox_stats):
    """A saved tiny SmolVLA folder and its ONNX export at 2 steps, made through the CLI entry point."""
    root = tmp_path_factory.mktemp("export")
    folder = tiny_policy(tiny_vlm, sandbox_stats, seed=3).save_pretrained(root / "policy")
    assert export_main(["onnx", str(folder), "--out", str(root / "onnx"), "--num_steps", str(STEPS)]) == 0
    return folder, root / "onnx"


def env_batch(batch_size: int, seed: int) -> dict:
    """LeRobot's env-side sandbox batch: image (B, 3, 64, 64) in [0, 1], state (B, 2), task."""
    g = torch.Generator().manual_seed(seed)
    return {
        "observation.image": torch.rand(batch_size, 3, 64, 64, generator=g),
        "observation.state": torch.rand(batch_size, 2, generator=g),
        "task": ["go to the green square" if i % 2 else "go to the red circle" for i in range(batch_size)],
    }


def test_export_writes_graph_and_description(exported):
    folder, out = exported
    spec = json.loads((out / "model.json").read_text())
    assert (out / "model.onnx").stat().st_size > 0
    assert [entry["name"] for entry in spec["inputs"]] == [
        "observation.image",
        "image_masks",
        "lang_tokens",
        "lang_mask",
        "state",
        "noise",
    ]
    assert spec["outputs"] == [{"name": "actions", "shape": ["batch", 16, 2], "dtype": "float32"}]
    assert (spec["num_steps"], spec["chunk_size"]) == (STEPS, 16)
    assert spec["config_sha256"] == hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()


def test_onnx_matches_pytorch_on_several_batches(exported):
    folder, out = exported
    onnx_policy, torch_policy = OnnxPolicy.from_pretrained(folder, out), SmolVLAChunkPolicy.from_pretrained(folder)
    for batch_size, seed in [(1, 0), (3, 1), (5, 2), (2, 3)]:
        seeds = list(range(seed, seed + batch_size))
        onnx_policy.reset(seeds)
        torch_policy.reset(seeds)
        ours = onnx_policy.predict_chunk(env_batch(batch_size, seed), STEPS)
        theirs = torch_policy.predict_chunk(env_batch(batch_size, seed), STEPS)
        assert ours.shape == theirs.shape == (batch_size, 16, 2)
        assert (ours - theirs).abs().max().item() <= 1e-4


def test_select_action_pops_the_chunk_then_replans(exported):
    folder, out = exported
    policy = OnnxPolicy.from_pretrained(folder, out)
    policy.reset([7])
    chunk = policy.predict_chunk(env_batch(1, 7), STEPS)  # (1, 16, 2)
    policy.reset([7])
    actions = [policy.select_action(env_batch(1, 7)) for _ in range(policy.n_action_steps)]
    assert torch.equal(torch.stack(actions, dim=1), chunk[:, : policy.n_action_steps])
    assert policy.select_action(env_batch(1, 8)).shape == (1, 2)  # queue empty: a new chunk
    with pytest.raises(ValueError, match=f"exported with {STEPS} Euler steps, asked for 1"):
        policy.predict_chunk(env_batch(1, 0), 1)


def test_rollouts_match_pytorch_per_episode(exported):
    folder, out = exported
    evaluator = Evaluator(episodes=4, n_envs=4, step_counts=(STEPS,), videos=0, latency_calls=0)
    ours = evaluator.run(OnnxPolicy.from_pretrained(folder, out))[STEPS]
    theirs = evaluator.run(SmolVLAChunkPolicy.from_pretrained(folder))[STEPS]
    assert ours["episode_seeds"] == theirs["episode_seeds"]
    assert ours["episode_success"] == theirs["episode_success"]
    assert ours["mean_length"] == theirs["mean_length"]
    assert ours["mean_return"] == pytest.approx(theirs["mean_return"], abs=1e-3)


def test_export_refuses_another_policy_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"type": "act"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert export_main(["onnx", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "describes a 'act' policy" in error and "type 'smolvla'" in error
    assert not (tmp_path / "onnx").exists()  # refused before anything was built or traced


def test_load_refuses_a_graph_of_another_config(exported, tmp_path, tiny_vlm, tiny_policy, sandbox_stats):
    _, out = exported
    other = tiny_policy(tiny_vlm, sandbox_stats, chunk_size=8, n_action_steps=8).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError) as error:
        OnnxPolicy.from_pretrained(other, out)
    message = str(error.value)
    assert "noise ['batch', 16, 32] float32" in message  # the graph's side
    assert "noise ['batch', 8, 32] float32" in message  # the config's side
    assert "python -m reflow_exp.export onnx" in message


def test_missing_onnxruntime_says_what_to_install(exported, monkeypatch):
    folder, out = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when it is absent
    with pytest.raises(ImportError) as error:
        OnnxPolicy.from_pretrained(folder, out)
    assert "\n" not in str(error.value)
    assert "pip install onnxruntime==" in str(error.value)
