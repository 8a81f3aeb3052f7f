#!/usr/bin/env bash
# The GPU check: on a CUDA machine, in under 8 minutes,
#   1. the tiny sandbox teacher (gin/sandbox/tiny.gin) on cuda in bf16,
#   2. the tiny reflow from it (gin/sandbox/tiny_reflow.gin) on cuda in bf16,
#   3. with 2+ GPUs: the tiny teacher again with torchrun, one process per GPU (2 GPUs),
#   4. python -m reflow_exp.bench gpu (start-up, train step and latency at the real architecture),
# and prints the numbers (device, losses, steps/s, VLM loads, the bench's ratios).
#
#   scripts/gpu_check.sh [--out DIR] [--gpu INDEX] [--device cuda|cpu] [--skip_bench]
#
# --device cpu is the dry mode for machines without a GPU: steps 1-2 on the CPU in bf16, no bench.
# Without a GPU and without --device cpu it stops at once with an error (exit 2).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=runs/gpu_check
GPU=0
DEVICE=cuda
BENCH=1
BUDGET_S=480
PYTHON=${PYTHON:-python}

die() { echo "gpu_check: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --gpu) GPU=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --skip_bench) BENCH=0; shift ;;
    *) die "unknown argument '$1' (usage: $0 [--out DIR] [--gpu INDEX] [--device cuda|cpu] [--skip_bench])" ;;
  esac
done
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

case "$DEVICE" in
  cuda)
    command -v nvidia-smi > /dev/null && nvidia-smi > /dev/null 2>&1 \
      || die "no CUDA GPU here (nvidia-smi is missing or fails). Run this on a GPU machine," \
             "or pass --device cpu for the CPU dry mode."
    GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
    export CUDA_VISIBLE_DEVICES=$GPU
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      || die "nvidia-smi lists $GPUS GPU(s) but torch sees none with CUDA_VISIBLE_DEVICES=$GPU (driver/torch build?)."
    nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv ;;
  cpu)
    GPUS=0
    BENCH=0
    export CUDA_VISIBLE_DEVICES= ;;
  *) die "--device must be cuda or cpu, got '$DEVICE'" ;;
esac

mkdir -p "$OUT"
RUNS=$(cd "$OUT" && pwd)/runs
COMMON=(--gin_param "run.runs_dir = \"$RUNS\"" --gin_param "sandbox_source.root = \"$RUNS/sandbox\""
        --gin_param 'Trainer.mixed_precision = "bf16"' --gin_param "Tracker.enabled = False")
left() { echo $((BUDGET_S - SECONDS)); }
step() {  # step NAME COMMAND...: run with what is left of the budget; fail loudly
  local name=$1; shift
  [ "$(left)" -gt 10 ] || die "out of time before $name (budget ${BUDGET_S} s)"
  echo "== $name ($(left) s left)"
  if ! timeout "$(left)" "$@" > "$OUT/$name.log" 2>&1; then
    tail -30 "$OUT/$name.log"
    die "$name failed (log: $OUT/$name.log)"
  fi
}
report() {  # report RUN_NAME: the numbers a run wrote
  "$PYTHON" - "$RUNS/$1" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
summary = json.loads((run / "summary.json").read_text())
device = next((l.split(" on ", 1)[1] for l in (run / "log.txt").read_text().splitlines() if l.startswith("Job ")), "?")
train = summary.get("train", {})
print(f"   {run.name}: device {device}; vlm_load_count {summary.get('vlm_load_count')}; "
      f"loss {train.get('first_loss', float('nan')):.4f} -> {train.get('last_loss') or float('nan'):.4f}; "
      f"{train.get('steps_per_s', float('nan')):.2f} steps/s")
for head, by_steps in summary.get("eval", {}).items():
    for k, m in by_steps.items():
        latency = m.get("latency_ms", float("nan"))
        print(f"   {run.name}: {head}@{k} success {m['success_rate']:.2f}, latency {latency:.1f} ms")
EOF
}

rm -rf "$RUNS/gpu-teacher" "$RUNS/gpu-reflow" "$RUNS/gpu-teacher-ddp"
step teacher "$PYTHON" -m reflow_exp.run --gin_file "$REPO/gin/sandbox/tiny.gin" "${COMMON[@]}" \
  --gin_param 'run.name = "gpu-teacher"'
report gpu-teacher
step reflow "$PYTHON" -m reflow_exp.run --gin_file "$REPO/gin/sandbox/tiny_reflow.gin" "${COMMON[@]}" \
  --gin_param 'run.name = "gpu-reflow"' --gin_param "reflow.teacher = \"$RUNS/gpu-teacher\""
report gpu-reflow
if [ "$GPUS" -ge 2 ]; then
  step teacher-ddp env CUDA_VISIBLE_DEVICES=0,1 "$PYTHON" -m torch.distributed.run --nproc_per_node 2 \
    -m reflow_exp.run --gin_file "$REPO/gin/sandbox/tiny.gin" "${COMMON[@]}" \
    --gin_param 'run.name = "gpu-teacher-ddp"' --gin_param "train_teacher.batch_size = 4"
  report gpu-teacher-ddp
fi
if [ "$BENCH" = 1 ]; then
  step bench "$PYTHON" -m reflow_exp.bench gpu --out "$OUT/bench" --cache "$OUT/bench/cache"
  tail -25 "$OUT/bench.log"
fi
echo "gpu_check: done in ${SECONDS} s (budget ${BUDGET_S} s); logs in $OUT"
