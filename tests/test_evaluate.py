"""Evaluator: rollout numbers, H.264 videos, determinism, the scripted expert, PushT, LeRobot parity, plots."""

import av
import numpy as np
import pytest
import torch
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from PIL import Image

from reflow_exp.evaluate import (
    Evaluator,
    ScriptedChunkPolicy,
    SmolVLAChunkPolicy,
    env_spec,
    make_vector_env,
    observation_batch,
)
from reflow_exp.plots import success_latency_plot
from reflow_exp.sandbox.task import HELDOUT_LAYOUTS, REPORT_SEED_OFFSET, eval_seeds, layout_of
from reflow_exp.stats import wilson_interval

# PushT: positions in [0, 512] px for both the agent and the action; the stats of a uniform law.
PUSHT_STATS = {
    key: {"mean": torch.full((2,), 256.0), "std": torch.full((2,), 148.0)} for key in ("observation.state", "action")
}


def probe_mp4(path) -> tuple[str, str, int]:
    """(codec, pixel format, number of decoded frames) of a video file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.codec_context.name, stream.codec_context.pix_fmt, frames


def outcome(result: dict) -> dict:
    """The rollout numbers of a `run` result (no timings, no file paths)."""
    keys = ("success_rate", "mean_return", "mean_length", "episodes", "routes")
    return {k: {key: r[key] for key in keys if key in r} for k, r in result.items()}


@pytest.fixture(scope="module")
def sandbox_policy(tiny_vlm, tiny_policy, sandbox_stats):
    return tiny_policy(tiny_vlm, sandbox_stats)


def test_sandbox_numbers_videos_and_determinism(sandbox_policy, tmp_path):
    evaluator = Evaluator(episodes=3, n_envs=2, videos=1, latency_calls=2)  # batches of 2 + 1
    sandbox_policy.head.train()  # as in the middle of training
    result = evaluator.run(sandbox_policy, step_counts=(1, 2), out_dir=tmp_path, tag="student")
    assert sandbox_policy.head.training  # LeRobot's eval() inside sampling was undone

    assert set(result) == {1, 2}
    for k, r in result.items():
        assert r["episodes"] == 3
        # The rates are the episodes' own: reward 1 on success only, so the mean return is the rate.
        assert r["success_rate"] == sum(r["episode_success"]) / 3 == r["mean_return"]
        assert r["episode_seeds"] == eval_seeds(3, split="dev", layouts="all")
        assert 1 <= r["mean_length"] <= 60
        assert r["latency_ms"] > 0
        assert sum(r["routes"].values()) == 3
        assert all(type(v) in (int, float) for v in (r["success_rate"], r["mean_return"], r["latency_ms"]))
        assert r["videos"] == [str(tmp_path / "videos" / f"student_steps{k}_ep0.mp4")]
        codec, pix_fmt, frames = probe_mp4(r["videos"][0])
        assert (codec, pix_fmt) == ("h264", "yuv420p") and frames >= 2  # reset frame + >= 1 step
        with Image.open(r["gif"]) as gif:
            assert gif.format == "GIF" and gif.n_frames >= 2

    # Same seed, other batching (per-episode noise): the same rollouts.
    again = Evaluator(episodes=3, n_envs=3, videos=0, latency_calls=0).run(sandbox_policy, step_counts=(1, 2))
    assert outcome(again) == outcome(result)
    assert again[1]["videos"] == [] and "latency_ms" not in again[1]


def test_scripted_expert_succeeds_through_the_rollout_loop():
    result = Evaluator(episodes=10, n_envs=5, videos=0, latency_calls=0).run(ScriptedChunkPolicy(), step_counts=(1,))
    assert result[1]["success_rate"] >= 0.9
    assert result[1]["mean_return"] == result[1]["success_rate"]  # reward 1 on success only
    assert result[1]["routes"]["left"] > 0 and result[1]["routes"]["right"] > 0


def test_report_split_heldout_layouts_intervals_and_per_seed_outcomes():
    evaluator = Evaluator(episodes=6, n_envs=4, videos=0, latency_calls=0, split="report", layouts="heldout")
    assert evaluator.protocol == {
        "env_id": "reflow_exp/Sandbox-v0",
        "split": "report",
        "seed": 0,
        "layouts": "heldout",
        "episodes": 6,
    }
    result = evaluator.run(ScriptedChunkPolicy(), step_counts=(1, 2))
    seeds = eval_seeds(6, split="report", layouts="heldout")
    assert all(s >= REPORT_SEED_OFFSET and layout_of(s) in HELDOUT_LAYOUTS for s in seeds)
    for r in result.values():
        assert r["episode_seeds"] == seeds  # every step count meets the same seeds, in order
        assert r["success_rate"] == sum(r["episode_success"]) / 6
        assert (r["ci_low"], r["ci_high"]) == wilson_interval(sum(r["episode_success"]), 6)
        assert all(type(x) is int for x in r["episode_success"])


@pytest.mark.parametrize(
    "gin_file, layouts",
    [
        ("gin/sandbox/eval.gin", "all"),
        ("gin/sandbox/layouts/eval.gin", "heldout"),
    ],
)
def test_eval_gin_files_report_500_episodes_on_the_report_range(gin_file, layouts, capsys):
    from reflow_exp import run

    assert run.main(["--gin_file", gin_file, "--dry_run"]) == 0
    protocol = {"env_id": "reflow_exp/Sandbox-v0", "split": "report", "seed": 0, "layouts": layouts, "episodes": 500}
    assert f"with {protocol}" in capsys.readouterr().out


def test_split_and_layouts_are_checked_first():
    with pytest.raises(ValueError, match="Evaluator.split must be one of \\['dev', 'report'\\], got 'test'"):
        Evaluator(split="test")
    with pytest.raises(ValueError, match="Evaluator.layouts must be one of"):
        Evaluator(layouts="ood")
    with pytest.raises(ValueError, match="needs the sandbox env"):
        Evaluator(env_id="pusht", layouts="heldout")


class StandStill:
    """A ChunkPolicy of 4 zero actions per chunk that counts its re-plans."""

    n_action_steps = 4

    def reset(self, seeds):
        self.calls = 0

    def predict_chunk(self, batch, num_steps):
        self.calls += 1
        return torch.zeros(len(batch["task"]), 4, 2)


def test_evaluator_can_override_how_often_the_policy_replans():
    policy = StandStill()
    run = lambda **kw: Evaluator(episodes=1, n_envs=1, videos=0, latency_calls=0, max_steps=8, **kw).run(policy, 1)
    run()
    assert policy.calls == 2  # the policy's own n_action_steps: 4
    run(n_action_steps=2)
    assert policy.calls == 4
    with pytest.raises(ValueError, match="n_action_steps=5 exceeds the policy's chunk of 4"):
        run(n_action_steps=5)
    with pytest.raises(ValueError, match="n_action_steps"):
        Evaluator(n_action_steps=0)


def test_pusht_smoke_and_lerobot_loader_parity(tiny_vlm, tiny_policy, tmp_path):
    policy = tiny_policy(
        tiny_vlm,
        PUSHT_STATS,
        seed=1,
        n_action_steps=8,
        input_features={
            "observation.image": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 96, 96)),  # resized to 64
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(2,)),
        },
    )
    evaluator = Evaluator(env_id="pusht", episodes=2, n_envs=2, max_steps=20, videos=1, latency_calls=1)
    ours = evaluator.run(policy, step_counts=(2,), out_dir=tmp_path, tag="pusht")[2]
    assert ours["episodes"] == 2 and ours["mean_length"] == 20
    assert ours["success_rate"] == sum(ours["episode_success"]) / 2 and len(ours["episode_success"]) == 2
    assert "routes" not in ours
    codec, _, frames = probe_mp4(ours["videos"][0])
    assert codec == "h264" and frames == 21

    # The exported folder, loaded by LeRobot's own loader and processors, acts the same.
    lerobot = SmolVLAChunkPolicy.from_pretrained(policy.save_pretrained(tmp_path / "pusht_policy"))
    assert isinstance(lerobot.model, SmolVLAPolicy)
    env = make_vector_env(env_spec("pusht"), 1)
    obs, _ = env.reset(seed=[7])
    env.close()
    batch = observation_batch(obs, ["Push the T-shaped block onto the T-shaped target."])
    ours_adapter = SmolVLAChunkPolicy(policy, policy.preprocessor, policy.postprocessor)
    for adapter in (ours_adapter, lerobot):
        adapter.reset([7])
    expected = ours_adapter.predict_chunk(batch, 2)
    assert expected.shape == (1, 16, 2)
    assert torch.allclose(lerobot.predict_chunk(batch, 2), expected, atol=1e-4)  # pixels: 1e-4 of 512

    evaluator = Evaluator(env_id="pusht", episodes=2, n_envs=2, max_steps=20, videos=0, latency_calls=0)
    theirs = evaluator.run(lerobot, step_counts=(2,))[2]
    assert theirs["success_rate"] == ours["success_rate"] and theirs["mean_length"] == ours["mean_length"]
    assert theirs["mean_return"] == pytest.approx(ours["mean_return"], abs=1e-6)


def test_a_policy_is_rolled_out_only_where_its_features_fit():
    """LeRobot's rule: at least one of the policy's cameras, the same state and action dimensions."""
    from reflow_exp.architectures import SHIPPED, make_smolvla_config

    def config(cameras, state=2, action=2):
        features = {key: PolicyFeature(FeatureType.VISUAL, (3, 64, 64)) for key in cameras}
        features |= {"observation.state": PolicyFeature(FeatureType.STATE, (state,))}
        features |= {"action": PolicyFeature(FeatureType.ACTION, (action,))}
        return make_smolvla_config(next(iter(SHIPPED.values())), features)

    sandbox = Evaluator(episodes=1)
    assert sandbox.mismatch(config(["observation.image"])) is None
    assert sandbox.mismatch(config(["observation.image", "observation.images.wrist"])) is None  # one is enough
    so100 = config([f"observation.images.camera{i}" for i in (1, 2, 3)], state=6, action=6)
    assert sandbox.mismatch(so100) == (
        "reflow_exp/Sandbox-v0 does not fit: the policy reads the cameras ['observation.images.camera1', "
        "'observation.images.camera2', 'observation.images.camera3'], the env gives ['observation.image', "
        "'observation.state']"
    )
    assert "reads observation.state (6,), the env gives (2,)" in sandbox.mismatch(config(["observation.image"], 6))
    assert "acts with 3 action values, the env takes 2" in sandbox.mismatch(config(["observation.image"], 2, 3))


def test_evaluating_where_the_env_does_not_fit_skips_the_rollouts_and_succeeds(cli, tiny_teacher, tmp_path):
    """A real evaluation job of a sandbox policy in MetaWorld (4-D actions): one line, exit 0, and
    summary.json says why nothing was rolled out."""
    import json

    result = cli(
        "gin/sandbox/eval.gin",
        f'run.runs_dir = "{tmp_path}"',
        'run.name = "misfit"',
        f'evaluate_policies.policies = {{"teacher": ("{tiny_teacher}", [1])}}',
        'Evaluator.env_id = "metaworld"',
        "Tracker.enabled = False",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[Eval] Skipping the rollouts: metaworld does not fit:") == 1
    summary = json.loads((tmp_path / "misfit" / "summary.json").read_text())
    assert summary["eval_skipped"].startswith("metaworld does not fit") and "eval" not in summary


def test_unknown_env_and_policy_are_named():
    with pytest.raises(ValueError, match=r"unknown env_id 'CartPole-v1'.*pusht"):
        Evaluator(env_id="CartPole-v1")
    with pytest.raises(TypeError, match="cannot evaluate a str"):
        Evaluator(episodes=1).run("not a policy")


def test_success_latency_plot(tmp_path):
    results = {
        "teacher": {10: {"success_rate": 0.9, "latency_ms": 120.0}, 1: {"success_rate": 0.2, "latency_ms": 30.0}},
        "student": {"1": {"success_rate": 0.85, "latency_ms": 31.0}, "2": {"success_rate": 0.9, "latency_ms": 40.0}},
    }
    path = success_latency_plot(results, tmp_path / "plots" / "success_latency.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < path.stat().st_size < 1_000_000
    with Image.open(path) as image:
        assert image.size == (1000, 400)
    # Wilson intervals are drawn as error bars: the same points with intervals give another image.
    results["student"]["1"] |= {"ci_low": 0.6, "ci_high": 0.95}
    with Image.open(path) as plain, Image.open(success_latency_plot(results, tmp_path / "bars.png")) as bars:
        assert plain.size == bars.size and np.abs(np.asarray(plain, float) - np.asarray(bars, float)).sum() > 0


def test_write_mp4_is_lerobots_writer_and_round_trips(tmp_path):
    """Videos are LeRobot's `write_video` (H.264, yuv420p, odd sizes cropped): the same stream as
    LeRobot's own call, and the decoded frames are the written ones up to the codec's loss. (Not
    byte for byte: x264 here has been seen to encode two identical calls a few bytes apart.)"""
    import av
    from lerobot.utils.io_utils import write_video

    from reflow_exp.evaluate import write_mp4

    y, x = np.mgrid[0:33, 0:47]
    frames = [
        np.stack([(4 * x + 8 * i) % 256, (6 * y) % 256, np.full_like(x, 30 * i % 256)], -1).astype(np.uint8)
        for i in range(12)
    ]  # smooth, moving, odd size
    ours = write_mp4(frames, tmp_path / "sub" / "ours.mp4", fps=10)
    write_video(tmp_path / "theirs.mp4", frames, fps=10)
    decoded = {}
    for name, path in (("ours", ours), ("theirs", tmp_path / "theirs.mp4")):
        assert probe_mp4(path) == ("h264", "yuv420p", 12)
        with av.open(str(path)) as container:
            decoded[name] = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
    assert decoded["ours"][0].shape == (32, 46, 3)
    assert np.mean([np.abs(a - b).mean() for a, b in zip(decoded["ours"], decoded["theirs"])]) < 1
    error = np.mean([np.abs(d - f[:32, :46].astype(int)).mean() for d, f in zip(decoded["ours"], frames)])
    assert error < 8, error
