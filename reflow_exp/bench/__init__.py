"""Benchmarks: `python -m reflow_exp.bench <name> [--size ...] [--repeats N]`.

- `startup`: time and peak RSS until teacher and student are ready, ours vs two LeRobot loads (as
  is, and without LeRobot's random initialisation).
- `train_step`: one reflow step, shared prefix + image embedding cache vs LeRobot's
  predict_action_chunk + forward (as is, and with the same cache), and with cached teacher pairs.
- `latency`: chunk latency split into prefix and expert steps, teacher@10 vs student@1/2/4; the
  1-step chunk against its physical limit.
- `gpu`: the three on CUDA in bf16 (skips without a GPU).

Each prints a table and writes `runs/bench/<name>.json`. Every comparison runs both sides in the
same invocation, alternating, `--repeats` times, and reports medians.
"""
