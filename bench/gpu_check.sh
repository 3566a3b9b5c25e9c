#!/usr/bin/env bash
# One check of the recipes on a machine with NVIDIA GPUs, in under 10 minutes (MiniLM-L6, offline data):
#   1. textcls, sentiment and ner on their quick budget (1 epoch each), in bf16 and in fp16;
#   2. with >= 2 GPUs: textcls under DDP on 2 GPUs (recipes/accelerate/ddp.yaml);
#   3. textcls under FSDP2 (recipes/accelerate/fsdp.yaml, 2 GPUs or 1): 20 steps with a sharded
#      checkpoint, then `--resume auto` from it to step 40; the gathered model must load in transformers;
#   4. a table (bench/gpu_report.py): train time, real tokens/s, useful MFU against the measured bf16/fp16
#      GEMM peak and the datasheet peak of known GPUs, test metric; JSON in $OUT/gpu_check.json.
# Exits non-zero on the first failure.
#
#   bash bench/gpu_check.sh                 # writes runs/gpu_check/<timestamp>/
#   bash bench/gpu_check.sh --dry-run       # prints the commands, runs nothing
#   bash bench/gpu_check.sh --out DIR
# PYTHON (default .venv/bin/python) and ACCELERATE (next to it) choose the interpreter; GPU_CHECK_GPUS
# overrides the GPU count (e.g. 1 to skip DDP on a multi-GPU machine).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
ACCELERATE=${ACCELERATE:-$(dirname "$PYTHON")/accelerate}
OUT=runs/gpu_check/$(date +%Y%m%d-%H%M%S)
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT=$2; shift ;;
        *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done

run() {  # print the command; run it unless --dry-run
    echo "+ $*"
    if [ "$DRY" = 0 ]; then "$@"; fi
}

if [ "$DRY" = 1 ]; then
    GPUS=${GPU_CHECK_GPUS:-2}
    BF16=1
else
    GPUS=${GPU_CHECK_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
    if [ "$GPUS" -lt 1 ]; then
        echo "error: torch sees no CUDA GPU; install a CUDA build of torch (the Makefile pins the CPU wheel)" >&2
        exit 1
    fi
    BF16=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_bf16_supported()))')
    mkdir -p "$OUT"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" || true
fi
# A single-GPU run uses GPU 0; the others stay free.
ONE="env CUDA_VISIBLE_DEVICES=0"
COMMON=(--disable_tqdm true --report_to none)
# The quick budget: one epoch of each recipe's default schedule (its configs/<task>.yaml otherwise).
REPORT=()
for task in textcls sentiment ner; do
    for precision in bf16 fp16; do
        if [ "$precision" = bf16 ] && [ "$BF16" = 0 ]; then
            echo "skipped: $task $precision (this GPU has no bf16)"
            continue
        fi
        dir=$OUT/$task-$precision
        run $ONE "$PYTHON" "recipes/$task.py" --config "recipes/configs/$task.yaml" --num_train_epochs 1 \
            --"$precision" true --output_dir "$dir" "${COMMON[@]}"
        REPORT+=("$task-$precision:1:$dir")
    done
done
PRECISION=bf16
if [ "$BF16" = 0 ]; then PRECISION=fp16; fi

if [ "$GPUS" -ge 2 ]; then
    dir=$OUT/textcls-ddp2-$PRECISION
    run "$ACCELERATE" launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 --main_process_port 0 \
        recipes/textcls.py --config recipes/configs/textcls.yaml --num_train_epochs 1 \
        --per_device_train_batch_size 8 --"$PRECISION" true --output_dir "$dir" "${COMMON[@]}"
    REPORT+=("textcls-ddp2-$PRECISION:2:$dir")
    if [ "$DRY" = 0 ]; then
        ls "$dir"/checkpoints/checkpoint-*/rng_state_1.pth > /dev/null  # two ranks really ran
    fi
else
    echo "skipped: DDP (needs 2 GPUs, found $GPUS)"
fi

# FSDP: a sharded checkpoint at step 20, then a second launch resumes from it and trains to step 40.
FSDP_RANKS=$((GPUS >= 2 ? 2 : 1))
dir=$OUT/textcls-fsdp$FSDP_RANKS-$PRECISION
FSDP_ARGS=(--config recipes/configs/textcls.yaml --"$PRECISION" true --output_dir "$dir"
    --eval_strategy steps --eval_steps 20 --save_strategy steps --save_steps 20 "${COMMON[@]}")
run "$ACCELERATE" launch --config_file recipes/accelerate/fsdp.yaml --num_processes "$FSDP_RANKS" \
    --main_process_port 0 recipes/textcls.py "${FSDP_ARGS[@]}" --max_steps 20
run "$ACCELERATE" launch --config_file recipes/accelerate/fsdp.yaml --num_processes "$FSDP_RANKS" \
    --main_process_port 0 recipes/textcls.py "${FSDP_ARGS[@]}" --max_steps 40 --resume auto
REPORT+=("textcls-fsdp$FSDP_RANKS-$PRECISION:$FSDP_RANKS:$dir")
if [ "$DRY" = 0 ]; then
    "$PYTHON" - "$dir" <<'EOF'
import json, sys
from pathlib import Path
from transformers import AutoModelForSequenceClassification
run = Path(sys.argv[1])
state = json.loads((run / "checkpoints" / "checkpoint-40" / "trainer_state.json").read_text())
assert state["global_step"] == 40, state["global_step"]
assert list((run / "checkpoints" / "checkpoint-20").glob("pytorch_model_fsdp_*")), "no sharded checkpoint"
assert (run / "checkpoints" / "checkpoint-20" / "ftkit_complete.json").is_file()
AutoModelForSequenceClassification.from_pretrained(run)  # the gathered, plain model
print(f"FSDP checkpoint + resume: ok ({run})")
EOF
fi

run "$PYTHON" bench/gpu_report.py --out "$OUT/gpu_check.json" "${REPORT[@]}"
