#!/usr/bin/env bash
# Paper-scale fp32 training of the task's model (settings and sources: run/recipes.sh):
#   bash run/pretrain.sh                         # Point Transformer on ShapeNet part
#   TASK=s3dis DATA=/data/s3dis NPROC=4 bash run/pretrain.sh
#   EPOCHS=2 bash run/pretrain.sh                # a short trial: --epochs 2
# Extra flags pass through and win: bash run/pretrain.sh --epochs 4 --data-root X
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
. run/recipes.sh
batch=$(per_process_batch)
stage "$RUN/pretrain" pretrain.py --model "$MODEL" --dataset "$DATASET" "${DATA_ROOT[@]}" \
    "${PRETRAIN[@]}" --batch-size "$batch" --workers 4 --out "$RUN/pretrain" "$@"
