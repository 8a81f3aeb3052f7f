"""The shared prefix pass equals LeRobot's joint forward and its cached sampling, for each head."""

import pytest
import torch
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from reflow_exp import flow, prefix
from reflow_exp.backbone import VLM_PREFIX, Backbone
from reflow_exp.heads import ActionHead
from reflow_exp.reflow import lerobot_inputs
from reflow_exp.sandbox import tiny_smolvla_config


@pytest.fixture(scope="module")
def two_heads(tiny_vlm):
    """Two different LeRobot policies that share VLM weights, and our two heads on one backbone."""
    config = tiny_smolvla_config(tiny_vlm, load_vlm_weights=False, device="cpu")
    policies = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        policies.append(SmolVLAPolicy(config).eval())
    vlm_state = {k: v for k, v in policies[0].state_dict().items() if k.startswith(VLM_PREFIX)}
    policies[1].load_state_dict(vlm_state, strict=False)
    backbone = Backbone.from_state_dict(
        config.vlm_model_name,
        config.num_vlm_layers,
        {k.removeprefix(VLM_PREFIX): v for k, v in vlm_state.items()},
        "test",
    )
    heads = [
        ActionHead(config, backbone, {k: v for k, v in p.state_dict().items() if not k.startswith(VLM_PREFIX)})
        for p in policies
    ]
    return policies, heads


def test_one_prefix_serves_each_head_like_lerobots_joint_forward(two_heads, make_batch):
    policies, heads = two_heads
    batch = make_batch(2)
    B, CHUNK = batch["action"].shape[:2]
    shared = prefix.encode(heads[0], batch)
    for policy, head in zip(policies, heads):
        noise, t = torch.randn(B, CHUNK, 32), torch.rand(B)
        actions = policy.prepare_action(batch)
        u = flow.target_velocity(actions, noise)
        expected = policy.model.forward(*lerobot_inputs(head, batch), actions, noise, t)  # (u - v)^2
        v = prefix.velocity(head, prefix.extend(head, shared, batch), flow.interpolate(actions, noise, t), t)
        assert torch.allclose((u - v) ** 2, expected, atol=1e-5)


def test_sampling_from_the_shared_prefix_matches_lerobot(two_heads, make_batch):
    policies, heads = two_heads
    batch = make_batch(3)
    B, CHUNK = batch["action"].shape[:2]
    shared = prefix.encode(heads[1], batch)  # either head can encode
    for policy, head in zip(policies, heads):
        noise = torch.randn(B, CHUNK, 32)
        for steps in (1, 10):
            policy.config.num_steps = steps
            expected = policy.predict_action_chunk(dict(batch), noise=noise)
            with torch.no_grad():
                got, velocities = prefix.sample(head, prefix.extend(head, shared, batch), noise, steps)
            assert torch.allclose(got[:, :, :2], expected, atol=1e-5)
            assert len(velocities) == steps
        policy.config.num_steps = 10


def test_gradients_reach_the_state_projection(two_heads, make_batch):
    _, heads = two_heads
    head, batch = heads[0], make_batch(4)
    B, CHUNK = batch["action"].shape[:2]
    shared = prefix.encode(head, batch)
    x_t, t = torch.randn(B, CHUNK, 32), torch.rand(B)
    prefix.velocity(head, prefix.extend(head, shared, batch), x_t, t).square().mean().backward()
    state_proj = head.lerobot.model.state_proj.weight
    assert state_proj.grad is not None and state_proj.grad.abs().sum() > 0
    head.zero_grad()
