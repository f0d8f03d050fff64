#!/usr/bin/env bash
# The whole workflow on the embedded synthetic part dataset, on a CPU, in minutes:
# pretrain tiny Point Transformer -> HAQ search at 10% of the fp32 weight bits (all layers, and
# with the first/last layers kept at 8 bits) -> fine-tune with and without distillation ->
# evaluate every model -> one results table (checkpoints/demo/results.{md,json}).
# Knobs: EPOCHS, EPISODES, WARMUP, FT_EPOCHS (environment variables). The search is short
# (HAQ runs 600 episodes), so its exploration decays faster (--sigma-decay 0.9), and it skips
# HAQ's fine-tune before each reward (--finetune-steps 0; search.py's default, 15 SGD steps
# here, would make the two searches several times longer on a CPU).
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"

OUT=checkpoints/demo
EPOCHS=${EPOCHS:-12}
EPISODES=${EPISODES:-40}
WARMUP=${WARMUP:-10}
FT_EPOCHS=${FT_EPOCHS:-3}
KEEP=8
mkdir -p "$OUT/eval"
start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

stage "1/6 pretrain pt_seg_tiny on synthetic parts ($EPOCHS epochs)"
python pretrain.py --model pt_seg_tiny --dataset synthetic_parts --epochs "$EPOCHS" \
    --lr 0.005 --out "$OUT/pretrain"
FP32="$OUT/pretrain/best.pt"

stage "2/6 HAQ search, preserve 0.1, every layer searched"
python search.py --ckpt "$FP32" --preserve-ratio 0.1 --episodes "$EPISODES" --warmup "$WARMUP" \
    --sigma-decay 0.9 --finetune-steps 0 --out "$OUT/search"
stage "3/6 HAQ search, preserve 0.1, first layer and classifier kept at $KEEP bits (mix)"
python search.py --ckpt "$FP32" --preserve-ratio 0.1 --episodes "$EPISODES" --warmup "$WARMUP" \
    --sigma-decay 0.9 --finetune-steps 0 --keep-first-last "$KEEP" --out "$OUT/search_mix"

stage "4/6 quantize without fine-tuning: searched policies, fp32 mix, uniform 2 and 4 bits"
quantize() {  # NAME, then finetune.py flags
    local name=$1; shift
    python finetune.py --ckpt "$FP32" --epochs 0 --out "$OUT/$name" "$@" > "$OUT/$name.log"
}
quantize fp32_mix --bits 32 --keep-first-last "$KEEP"
quantize preserve --policy "$OUT/search/policy.json"
quantize preserve_mix --policy "$OUT/search_mix/policy.json" --keep-first-last "$KEEP"
quantize uniform2 --bits 2
quantize uniform4 --bits 4

stage "5/6 fine-tune the mixed policy's centroids ($FT_EPOCHS epochs), without and with distillation"
python finetune.py --ckpt "$FP32" --policy "$OUT/search_mix/policy.json" \
    --keep-first-last "$KEEP" --epochs "$FT_EPOCHS" --lr 1e-3 --out "$OUT/finetune"
python finetune.py --ckpt "$FP32" --policy "$OUT/search_mix/policy.json" \
    --keep-first-last "$KEEP" --epochs "$FT_EPOCHS" --lr 1e-3 --distill --out "$OUT/finetune_distill"

stage "6/6 evaluate every checkpoint on the test split with eval.py"
rows=()
for spec in "fp32=pretrain" "fp32 mixed=fp32_mix" "0.1x preserve=preserve" \
            "0.1x preserve, mix=preserve_mix" "0.1x preserve, mix, finetune=finetune" \
            "0.1x preserve, mix, finetune, distill=finetune_distill" \
            "uniform 2-bit=uniform2" "uniform 4-bit=uniform4"; do
    name=${spec%%=*}; run=${spec#*=}
    python eval.py --ckpt "$OUT/$run/best.pt" --json "$OUT/eval/$run.json" > "$OUT/eval/$run.txt"
    rows+=("$name=$OUT/eval/$run.json")
done
echo
cat "$OUT/eval/pretrain.txt"
echo
python -m lib.results_table --out "$OUT/results" "${rows[@]}"
stage "done: $OUT/results.md, $OUT/results.json; search tables in $OUT/search*/baselines.md"
