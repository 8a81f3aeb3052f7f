"""Backbone + ActionHead = LeRobot's SmolVLAPolicy: parity, export and load, the VLM load counter."""

import pytest
import torch
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

from reflow_exp.backbone import VLM_PREFIX, Backbone, vlm_load_count
from reflow_exp.heads import ActionHead
from reflow_exp.policy import Policy
from reflow_exp.sandbox import tiny_smolvla_config


@pytest.fixture(scope="module")
def reference(tiny_vlm):
    """LeRobot's SmolVLAPolicy with random fp32 weights, and our composition of the same weights."""
    torch.manual_seed(0)
    config = tiny_smolvla_config(tiny_vlm, load_vlm_weights=False, device="cpu")
    lerobot_policy = SmolVLAPolicy(config).eval()
    state = lerobot_policy.state_dict()
    vlm_state = {k.removeprefix(VLM_PREFIX): v for k, v in state.items() if k.startswith(VLM_PREFIX)}
    head_state = {k: v for k, v in state.items() if not k.startswith(VLM_PREFIX)}
    backbone = Backbone.from_state_dict(config.vlm_model_name, config.num_vlm_layers, vlm_state, "test")
    stats = {k: {"mean": torch.zeros(2), "std": torch.ones(2)} for k in ("observation.state", "action")}
    processors = make_smolvla_pre_post_processors(config, stats)
    ours = Policy(backbone, ActionHead(config, backbone, head_state), *processors)
    return lerobot_policy, ours


def test_same_loss_and_actions_as_lerobot(reference, make_batch):
    lerobot_policy, ours = reference
    batch = make_batch()
    B, CHUNK = batch["action"].shape[:2]
    noise, time = torch.randn(B, CHUNK, 32), torch.rand(B)
    expected, _ = lerobot_policy.forward(dict(batch), noise=noise, time=time)
    got, _ = ours.loss(dict(batch), noise=noise, time=time)
    assert torch.allclose(got, expected, rtol=1e-6)
    for steps in (1, 10):
        lerobot_policy.config.num_steps = steps
        expected = lerobot_policy.predict_action_chunk(dict(batch), noise=noise)
        assert torch.allclose(ours.predict_action_chunk(dict(batch), noise=noise, num_steps=steps), expected)
    assert ours.config.num_steps == 10  # the override was scoped


def test_head_owns_only_expert_and_projections(reference):
    lerobot_policy, ours = reference
    head_names = {n.removeprefix("lerobot.") for n, _ in ours.head.named_parameters()}
    assert head_names and not any(".vlm." in n for n in head_names)
    assert head_names | {VLM_PREFIX + n for n, _ in ours.backbone.vlm.named_parameters()} == {
        n for n, _ in lerobot_policy.named_parameters()
    }
    assert not any(p.requires_grad for p in ours.backbone.parameters())
    # the head reaches the backbone's VLM object itself, no copy
    assert ours.head.lerobot.model.vlm_with_expert.vlm is ours.backbone.vlm


def test_copied_head_is_independent(reference):
    _, ours = reference
    student = ActionHead(ours.config, ours.backbone, ours.head.lerobot.state_dict())
    first = next(student.parameters())
    with torch.no_grad():
        first.add_(1.0)
    assert not torch.equal(first, next(ours.head.parameters()))


def test_fresh_head_is_initialised(reference, make_batch):
    _, ours = reference
    head = ActionHead(ours.config, ours.backbone)
    for name, p in head.named_parameters():
        assert torch.isfinite(p).all(), name
    norms = [p for n, p in head.named_parameters() if "layernorm" in n]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    loss, _ = Policy(ours.backbone, head).loss(make_batch())
    assert torch.isfinite(loss)


def test_export_loads_in_lerobot_and_back(reference, make_batch, tmp_path):
    _, ours = reference
    batch = make_batch(1)
    noise = torch.randn(*batch["action"].shape[:2], 32)
    expected = ours.predict_action_chunk(dict(batch), noise=noise)
    ours.save_pretrained(tmp_path / "policy")

    assert {"config.json", "model.safetensors", "policy_preprocessor.json"} <= {
        f.name for f in (tmp_path / "policy").iterdir()
    }
    loaded = SmolVLAPolicy.from_pretrained(tmp_path / "policy").eval()
    assert torch.allclose(loaded.predict_action_chunk(dict(batch), noise=noise), expected, atol=1e-6)

    before = vlm_load_count()
    ours_again = Policy.from_pretrained(tmp_path / "policy")
    assert vlm_load_count() == before + 1
    assert torch.allclose(ours_again.predict_action_chunk(dict(batch), noise=noise), expected, atol=1e-6)


def test_from_pretrained_rejects_a_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no LeRobot policy"):
        Policy.from_pretrained(tmp_path)
