"""Export a smolvla_reflow checkpoint's student as a plain LeRobot SmolVLA folder (`type: smolvla`):

    python -m lerobot_policy_smolvla_reflow.export outputs/reflow/checkpoints/last/pretrained_model outputs/student

The folder holds the backbone and the student head only, its `num_steps` is the student's, and its
processors are the checkpoint's; `SmolVLAPolicy.from_pretrained` loads it in a LeRobot without this plugin.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lerobot.policies.factory import make_pre_post_processors

from .modeling_smolvla_reflow import SmolVLAReflowPolicy


def export_student(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the student of `checkpoint` (a smolvla_reflow pretrained_model folder) to `out`."""
    policy = SmolVLAReflowPolicy.from_pretrained(checkpoint)
    pre, post = make_pre_post_processors(
        policy.config, pretrained_path=str(checkpoint), preprocessor_overrides={"device_processor": {"device": "cpu"}}
    )
    out = policy.student_policy(pre, post).save_pretrained(out)
    print(f"[Reflow] Student saved to {out} (type smolvla, num_steps={policy.config.num_steps})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lerobot_policy_smolvla_reflow.export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a smolvla_reflow checkpoint's pretrained_model folder")
    parser.add_argument("out", type=Path, help="the plain SmolVLA folder to write")
    args = parser.parse_args(argv)
    export_student(args.checkpoint, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
