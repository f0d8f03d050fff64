#!/usr/bin/env bash
# The workflow's semantic-segmentation arm, on the generated rooms in the S3DIS layout
# (synthetic_rooms: 3 rooms in each of 6 areas, Area 5 for test), on a CPU in minutes:
# pretrain the tiny Point Transformer -> HAQ search at 10% of the fp32 weight bits, first layer
# and classifier kept at 8 bits -> the searched policy as quantized, and fine-tuned with
# distillation -> every checkpoint scored on the test rooms (each original point voted over
# the crops that hold it) -> checkpoints/demo_rooms/results.{md,json}.
# Knobs: EPOCHS, EPISODES, WARMUP, FT_EPOCHS (environment variables). As in run/demo.sh the
# search is short, decays its exploration faster and skips HAQ's fine-tune before each reward,
# and every stage replaces the previous demo's (--overwrite), so the script can be run again.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"

OUT=checkpoints/demo_rooms
EPOCHS=${EPOCHS:-6}
EPISODES=${EPISODES:-20}
WARMUP=${WARMUP:-5}
FT_EPOCHS=${FT_EPOCHS:-2}
KEEP=8
start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

stage "1/4 pretrain pt_semseg_tiny on synthetic rooms ($EPOCHS epochs)"
python pretrain.py --model pt_semseg_tiny --dataset synthetic_rooms --epochs "$EPOCHS" \
    --batch-size 8 --lr 0.01 --out "$OUT/pretrain" --overwrite
FP32="$OUT/pretrain/best.pt"

stage "2/4 HAQ search, preserve 0.1, first layer and classifier kept at $KEEP bits (mix)"
python search.py --ckpt "$FP32" --preserve-ratio 0.1 --episodes "$EPISODES" --warmup "$WARMUP" \
    --sigma-decay 0.9 --finetune-steps 0 --val-size 16 --keep-first-last "$KEEP" \
    --out "$OUT/search" --overwrite

stage "3/4 the searched policy quantized, then fine-tuned with distillation ($FT_EPOCHS epochs)"
python finetune.py --ckpt "$FP32" --policy "$OUT/search/policy.json" --keep-first-last "$KEEP" \
    --epochs 0 --batch-size 8 --out "$OUT/searched" --overwrite > "$OUT/searched.log"
python finetune.py --ckpt "$FP32" --policy "$OUT/search/policy.json" --keep-first-last "$KEEP" \
    --epochs "$FT_EPOCHS" --batch-size 8 --lr 1e-3 --distill --out "$OUT/finetune_distill" \
    --overwrite

stage "4/4 score every checkpoint on the test rooms"
python -m lib.results_table --run "$OUT" --batch-size 8
stage "done: $OUT/results.md, $OUT/results.json"
