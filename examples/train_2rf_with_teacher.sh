#!/usr/bin/env bash
# Reflow (2-rectified flow) of a SmolVLA teacher into a few-step student: the seed system's
# ./train_2rf_with_teacher.sh, running reflow_exp (python -m reflow_exp.run --gin_file gin/smolvla/reflow.gin).
#
#   CUDA_VISIBLE_DEVICES=2 ./examples/train_2rf_with_teacher.sh \
#       --policy.teacher_model_path=outputs/teacher/checkpoints/last/pretrained_model \
#       --batch_size=32 --steps=20000 --save_freq=2000 --output_dir=outputs/reflow \
#       [--policy.use_reflow=true] [--policy.optimizer_lr=1e-4] [--policy.freeze_vision_encoder=true] \
#       [--dataset.repo_id=lerobot/svla_so100_pickplace] [--dataset.root=<local dataset folder>] \
#       [--rename_map='{"observation.images.top": "observation.images.camera1"}'] \
#       [--gin_param='reflow.student_steps = 2'] [--print_command]
#
# Every flag can also be an environment variable: TEACHER, BATCH_SIZE, STEPS, SAVE_FREQ, OUTPUT_DIR,
# USE_REFLOW, OPTIMIZER_LR, FREEZE_VISION_ENCODER, LOAD_VLM_WEIGHTS, TRAIN_EXPERT_ONLY, DATASET_REPO_ID,
# DATASET_ROOT, RENAME_MAP (a JSON object: dataset key -> policy key, as lerobot-train's --rename_map),
# MIXED_PRECISION (no|bf16|fp16),
# GIN_FILE (default gin/smolvla/reflow.gin), PYTHON (default python), MASTER_PORT (default 29500).
# Several GPUs in CUDA_VISIBLE_DEVICES (e.g. 0,1,2,3) run one process per GPU with torchrun;
# --batch_size is then per GPU (global batch = batch_size x number of GPUs).
# --policy.load_vlm_weights and --policy.train_expert_only are automatic now: passing them only warns.
# --print_command prints the command instead of running it.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)  # paths in the flags stay relative to the caller's directory

GIN_FILE=${GIN_FILE:-$REPO/gin/smolvla/reflow.gin}
PYTHON=${PYTHON:-python}
USE_REFLOW=${USE_REFLOW:-true}
EXTRA=()
PRINT_ONLY=0

die() { echo "error: $*" >&2; exit 2; }
# gin wants Python literals: true/false -> True/False.
bool() {
  case "${2,,}" in
    true|1|yes) echo True ;;
    false|0|no) echo False ;;
    *) die "$1 must be true or false, got '$2'" ;;
  esac
}

for arg in "$@"; do
  value=${arg#*=}
  case "$arg" in
    --policy.teacher_model_path=*) TEACHER=$value ;;
    --batch_size=*) BATCH_SIZE=$value ;;
    --steps=*) STEPS=$value ;;
    --save_freq=*) SAVE_FREQ=$value ;;
    --output_dir=*) OUTPUT_DIR=$value ;;
    --policy.use_reflow=*) USE_REFLOW=$value ;;
    --policy.optimizer_lr=*) OPTIMIZER_LR=$value ;;
    --policy.freeze_vision_encoder=*) FREEZE_VISION_ENCODER=$value ;;
    --policy.load_vlm_weights=*) LOAD_VLM_WEIGHTS=$value ;;
    --policy.train_expert_only=*) TRAIN_EXPERT_ONLY=$value ;;
    --dataset.repo_id=*) DATASET_REPO_ID=$value ;;
    --dataset.root=*) DATASET_ROOT=$value ;;
    --rename_map=*) RENAME_MAP=$value ;;
    --mixed_precision=*) MIXED_PRECISION=$value ;;
    --gin_param=*) EXTRA+=(--gin_param "$value") ;;
    --print_command) PRINT_ONLY=1 ;;
    *) die "unknown argument '$arg' (the flags are listed at the top of $0)" ;;
  esac
done

use_reflow=$(bool --policy.use_reflow "$USE_REFLOW")
[ "$use_reflow" = True ] || die "--policy.use_reflow=$USE_REFLOW: this script only runs reflow; train a teacher \
with python -m reflow_exp.run --gin_file gin/sandbox/teacher.gin (or lerobot-train)"
[ -n "${TEACHER:-}" ] || die "the teacher is required:" \
  "--policy.teacher_model_path=<SmolVLA folder or run folder> (or TEACHER=...)"

PARAMS=(--gin_param "reflow.teacher = \"$TEACHER\"")
[ -n "${BATCH_SIZE:-}" ] && PARAMS+=(--gin_param "reflow.batch_size = $BATCH_SIZE")
[ -n "${STEPS:-}" ] && PARAMS+=(--gin_param "Trainer.steps = $STEPS")
[ -n "${SAVE_FREQ:-}" ] && PARAMS+=(--gin_param "Trainer.save_every = $SAVE_FREQ")
[ -n "${OPTIMIZER_LR:-}" ] && PARAMS+=(--gin_param "Trainer.lr = $OPTIMIZER_LR")
if [ -n "${FREEZE_VISION_ENCODER:-}" ]; then
  freeze=$(bool --policy.freeze_vision_encoder "$FREEZE_VISION_ENCODER")
  PARAMS+=(--gin_param "reflow.freeze_vision_encoder = $freeze")
fi
# The two legacy flags are automatic in reflow: passed on, they only print a warning.
if [ -n "${LOAD_VLM_WEIGHTS:-}" ]; then
  flag=$(bool --policy.load_vlm_weights "$LOAD_VLM_WEIGHTS")
  PARAMS+=(--gin_param "reflow.load_vlm_weights = $flag")
fi
if [ -n "${TRAIN_EXPERT_ONLY:-}" ]; then
  flag=$(bool --policy.train_expert_only "$TRAIN_EXPERT_ONLY")
  PARAMS+=(--gin_param "reflow.train_expert_only = $flag")
fi
[ -n "${DATASET_REPO_ID:-}" ] && PARAMS+=(--gin_param "lerobot_source.repo_id = \"$DATASET_REPO_ID\"")
[ -n "${DATASET_ROOT:-}" ] && PARAMS+=(--gin_param "lerobot_source.root = \"$DATASET_ROOT\"")
# A JSON object of strings is also a gin dict literal.
[ -n "${RENAME_MAP:-}" ] && PARAMS+=(--gin_param "lerobot_source.rename_map = $RENAME_MAP")
[ -n "${MIXED_PRECISION:-}" ] && PARAMS+=(--gin_param "Trainer.mixed_precision = \"$MIXED_PRECISION\"")
if [ -n "${OUTPUT_DIR:-}" ]; then  # the run folder is <run.runs_dir>/<run.name>
  OUTPUT_DIR=${OUTPUT_DIR%/}
  PARAMS+=(--gin_param "run.runs_dir = \"$(dirname "$OUTPUT_DIR")\"")
  PARAMS+=(--gin_param "run.name = \"$(basename "$OUTPUT_DIR")\"")
fi

# One process per GPU listed in CUDA_VISIBLE_DEVICES; unset or one GPU (or "" = CPU): one process.
IFS=, read -r -a GPUS <<< "${CUDA_VISIBLE_DEVICES:-}"
if [ "${#GPUS[@]}" -gt 1 ]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node "${#GPUS[@]}" --master_port "${MASTER_PORT:-29500}")
else
  LAUNCH=("$PYTHON")
fi
COMMAND=("${LAUNCH[@]}" -m reflow_exp.run --gin_file "$GIN_FILE" "${PARAMS[@]}" "${EXTRA[@]}")

if [ "$PRINT_ONLY" = 1 ]; then
  echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}"
  printf '%q ' "${COMMAND[@]}"; echo
  exit 0
fi
exec "${COMMAND[@]}"
