"""LeRobot's own loop (from_pretrained + processors + select_action) on an exported tiny policy."""

import json

import pytest

from reflow_exp import lerobot_check
from reflow_exp.sandbox.task import REPORT_SEED_OFFSET, eval_seeds


@pytest.fixture(scope="module")
def exported_student(tiny_vlm, tiny_policy, sandbox_stats, tmp_path_factory):
    """A tiny 1-step SmolVLA, exported as a reflow student is: a LeRobot folder with processors."""
    policy = tiny_policy(tiny_vlm, sandbox_stats, seed=2, num_steps=1, n_action_steps=9)  # seed 2: ragged lengths
    return policy.save_pretrained(tmp_path_factory.mktemp("student") / "student")


def test_lerobot_loop_on_report_seeds_beside_ours(exported_student, tmp_path, capsys):
    out = tmp_path / "check.json"
    # One episode per batch: LeRobot's noise is then ours, so the two loops must agree episode by episode.
    argv = [str(exported_student), "--split", "report", "--episodes", "4", "--n_envs", "1", "--ours", "--out", str(out)]
    assert lerobot_check.main(argv) == 0
    printed = capsys.readouterr().out
    assert "LeRobot select_action" in printed and "95% CI" in printed and "reflow_exp Evaluator" in printed

    result = json.loads(out.read_text())
    assert result["seeds"] == eval_seeds(4, split="report") and result["seeds"][0] == REPORT_SEED_OFFSET
    assert result["protocol"]["num_steps"] == 1 and result["protocol"]["n_action_steps"] == 9
    for loop in ("lerobot", "ours"):
        r = result[loop]
        assert r["episodes"] == 4 and len(r["episode_success"]) == 4
        assert 0 <= r["ci_low"] <= r["success_rate"] <= r["ci_high"] <= 1
    assert result["lerobot"]["episode_success"] == result["ours"]["episode_success"]
    assert result["lerobot"]["mean_length"] == result["ours"]["mean_length"] < 60  # some hit the bar early
    assert result["paired"]["n"] == 4 and result["agree"]


def test_lerobot_loop_is_reproducible_and_reads_success_from_the_env(exported_student):
    policy, pre, post = lerobot_check.load_lerobot_policy(exported_student, num_steps=2)
    assert policy.config.num_steps == 2
    seeds = eval_seeds(3, split="dev")
    first = lerobot_check.lerobot_rollouts(policy, pre, post, seeds, n_envs=3)
    assert first == lerobot_check.lerobot_rollouts(policy, pre, post, seeds, n_envs=3)
    successes, lengths = first
    assert set(successes) <= {0, 1} and len(successes) == 3 and all(1 <= n <= 60 for n in lengths)


def test_bad_arguments_fail_before_loading(tmp_path):
    with pytest.raises(SystemExit):
        lerobot_check.main([str(tmp_path), "--split", "test"])
    with pytest.raises(SystemExit):
        lerobot_check.main([str(tmp_path), "--episodes", "0"])


def test_targets_roll_out_every_row_through_lerobot_and_apply_the_bar(exported_student, tmp_path, capsys):
    """The student folder doubles as the teacher: student@k and teacher@k are then the same policy on
    the same seeds, so LeRobot's loop must give them identical outcomes (difference 0, no discordant)."""
    out = tmp_path / "targets.json"
    argv = [
        str(exported_student),
        "--teacher",
        str(exported_student),
        "--split",
        "dev",
        "--episodes",
        "6",
        "--n_envs",
        "3",
        "--out",
        str(out),
    ]
    assert lerobot_check.main(argv) == 0
    assert "Quality bar:" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"student@1", "student@2", "teacher@1", "teacher@2", "teacher@10"}
    assert all(r["episodes"] == 6 for r in result["rows"].values())
    same = result["paired"]["student@1 vs teacher@1"]
    assert same["difference"] == 0 and same["first_only"] == same["second_only"] == 0
    assert result["rows"]["student@2"] == result["rows"]["teacher@2"]
    assert (
        "student@1 >= teacher@1 + 0.20" in result["quality_bar"]
        and not result["quality_bar"]["student@1 >= teacher@1 + 0.20"]
    )


def test_targets_refuse_step_overrides(exported_student):
    with pytest.raises(SystemExit):
        lerobot_check.main([str(exported_student), "--teacher", str(exported_student), "--num_steps", "2"])
