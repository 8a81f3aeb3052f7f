"""Each benchmark runs end to end at the tiny size and writes its JSON (timings are not checked)."""

import json

import pytest
import torch

from reflow_exp.bench import common
from reflow_exp.bench.__main__ import main, parse


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """One output folder and one checkpoint cache for the module (the tiny teacher is made once)."""
    root = tmp_path_factory.mktemp("bench")
    return root / "out", root / "cache"


def run_bench(dirs, name, *extra):
    out, cache = dirs
    assert main([name, "--size", "tiny", "--repeats", "1", "--out", str(out), "--cache", str(cache), *extra]) == 0
    return json.loads((out / f"{name}.json").read_text())


def test_startup_counts_one_vlm_load_against_two(dirs):
    result = run_bench(dirs, "startup")
    assert result["load_count_ours"] == 1 and result["load_count_naive"] == result["load_count_naive_no_init"] == 2
    assert (
        min(
            result[k]
            for k in ("time_ratio", "memory_ratio", "time_ratio_no_random_init", "memory_ratio_no_random_init")
        )
        > 0
    )
    tiny = result["sizes"]["tiny"]
    assert tiny["median"]["ours"]["vlm_load_count"] == 1  # our own counter agrees
    assert tiny["median"]["naive_no_init"]["vlm_random_init_s"] == 0  # built on meta: no random init
    trainable = {side: tiny["median"][side]["trainable"] for side in ("ours", "naive", "naive_no_init")}
    assert len(set(trainable.values())) == 1, trainable
    assert set(tiny["met"]) == {
        "time_ratio",
        "memory_ratio",
        "memory_ratio_no_random_init",
        "load_count_ours",
        "load_count_naive",
    }


def test_train_step_runs_every_side(dirs):
    result = run_bench(dirs, "train_step")
    tiny = result["sizes"]["tiny"]
    for ratio in ("step_ratio", "step_ratio_same_cache", "step_ratio_no_cache", "step_ratio_cached_pairs"):
        assert result[ratio] == tiny[ratio] > 0
    assert result["pair_epochs"] == tiny["pair_epochs"] >= 1
    assert set(tiny["times"]) == {
        "ours",
        "naive",
        "naive_same_cache",
        "ours_no_cache",
        "ours_cached_pairs",
        "pair_generation",
    }
    assert all(len(times) == 1 for times in tiny["times"].values())
    assert tiny["cache_bytes_per_frame"] > 0 and tiny["cache_build_s_per_frame"] > 0
    assert tiny["machine"]["nproc"] >= 1 and tiny["command"].startswith("python -m reflow_exp.bench train_step")


def test_latency_splits_prefix_and_steps_and_plots(dirs):
    plot = dirs[0] / "latency.png"
    result = run_bench(dirs, "latency", "--batch", "2", "--plot", str(plot))
    assert {"expert_ratio", "end_to_end_ratio", "limit_ratio", "end_to_end_vs_limit"} <= set(result)
    tiny = result["sizes"]["tiny"]
    assert 0 < tiny["limit_ratio"] < 1
    assert {"prefix", "vision", "expert teacher@10", "expert student@4", "chunk student@1", "lerobot@10"} <= set(
        tiny["median_s"]
    )
    assert set(tiny["throughput_chunks_per_s"]) == {"teacher@10", "student@1"}
    assert set(tiny["met"]) == {"end_to_end_vs_limit"} and set(tiny["sanity"]) == {"expert_ratio"}
    assert plot.stat().st_size > 0


def test_latency_onnx_times_onnx_runtime_against_pytorch(dirs):
    out, cache = dirs
    argv = ["latency", "--runtime", "onnx", "--onnx_steps", "1", "2", "--size", "tiny", "--repeats", "1"]
    assert main([*argv, "--out", str(out), "--cache", str(cache)]) == 0
    result = json.loads((out / "latency_onnx.json").read_text())["sizes"]["tiny"]
    assert set(result["median_s"]) == {"onnx@1", "torch@1", "onnx@2", "torch@2"}
    assert set(result["onnx_over_torch"]) == {"1", "2"} and min(result["onnx_over_torch"].values()) > 0
    assert max(result["max_abs_diff"].values()) <= 1e-4
    assert len(list((cache / "onnx").iterdir())) == 2  # one graph per step count, reused by the next run


def test_gpu_says_it_skipped_without_cuda(dirs, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run_bench(dirs, "gpu")
    assert result["skipped"] is True and "no CUDA device" in result["reason"]
    assert "gpu: skipped" in capsys.readouterr().out


def test_alternate_rotates_the_order():
    calls = []
    wall, cpu = common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in wall.values()] == [len(t) for t in cpu.values()] == [3, 3]


def test_budget_stops_new_repeats_but_runs_one():
    wall, _ = common.alternate({"a": lambda: None}, repeats=5, budget_s=0.0)
    assert len(wall["a"]) == 1


def test_command_line_defaults_and_checks():
    assert parse(["train_step"]).size == ["tiny", "mid", "real"]
    assert parse(["startup"]).size == ["real"]
    with pytest.raises(SystemExit):
        parse(["latency", "--repeats", "0"])


def test_data_measures_both_loaders(dirs):
    """One small dataset, no workers (each side's process imports torch and LeRobot: that is the cost)."""
    out, cache = dirs
    assert (
        main(
            [
                "data",
                "--episodes",
                "4",
                "--batches",
                "3",
                "--batch",
                "4",
                "--workers",
                "0",
                "--out",
                str(out),
                "--cache",
                str(cache),
            ]
        )
        == 0
    )
    result = json.loads((out / "data.json").read_text())
    assert result["samples_per_s_ours"] > 0 and result["samples_per_s_lerobot"] > 0
    assert result["rss_gb_4"] > 0 and result["rss_growth"] == 1.0
    assert result["runs"]["ours_4"]["frames"] == result["runs"]["lerobot_4"]["frames"] > 0
    assert result["runs"]["ours_no_cameras_4"]["frames"] == result["runs"]["ours_4"]["frames"]
    assert result["no_cameras_speedup"] > 0
    assert set(result["met"]) == {"samples_per_s_ratio", "rss_growth"}
    assert result["command"].startswith("python -m reflow_exp.bench data")


def test_footprint_measures_every_file_kind_and_rank0_ram_is_flat(dirs):
    """At tiny: the written files match the per-row formulas, projections scale with the frames, and
    rank 0's extra memory does not grow from 1e4 to 1e6 frames."""
    out, cache = dirs
    argv = ["footprint", "--size", "tiny", "--frames", "1000", "--cameras", "2", "--processes", "3"]
    assert main([*argv, "--out", str(out), "--cache", str(cache)]) == 0
    result = json.loads((out / "footprint.json").read_text())
    tokens, hidden = result["image_tokens"], result["hidden"]
    assert result["cache_bytes_per_frame_camera"] == tokens * hidden * 2  # bfloat16
    assert result["tiny_measured"]["cache_bytes_per_frame_camera"] == tokens * hidden * 2  # the cache's own file
    assert result["cache_bytes"] == 1000 * 2 * tokens * hidden * 2
    chunk, dim = 16, 2  # the tiny size
    for k in ("1", "2", "4"):
        assert result["pairs_bytes_per_frame"][k] == int(k) * chunk * dim * 2 + 8
        assert result["pairs_bytes_per_frame"][k] / int(k) <= 2 * chunk * dim + 16
        measured = result["tiny_measured"][f"pairs_file_bytes_k{k}"]  # CachedCoupling's own file, 8 frames
        assert 8 * result["pairs_bytes_per_frame"][k] < measured < 8 * result["pairs_bytes_per_frame"][k] + 1024
    tiny = result["tiny_measured"]  # at tiny the student head outweighs the VLM: slim < full only at real
    assert tiny["slim_checkpoint_bytes"] < tiny["full_checkpoint_bytes"] - tiny["pretrained_weights_bytes"] + 1024
    assert result["checkpoint_bytes"] > 0 and result["full_smolvla_bytes"] == result["student_bytes"] > 0
    assert result["run_disk_bytes"] > result["cache_bytes"] + 2 * result["full_smolvla_bytes"]
    ram = result["rank0_extra_ram_bytes"]
    assert set(ram) == {"10000", "100000", "1000000"} and max(ram.values()) < 4 * 2**20, ram
    shares = result["build_share_per_rank"]
    assert shares["image_embedding_cache"] == [1.0, 0.0, 0.0] and abs(sum(shares["pairs"]) - 1) < 1e-9
