#!/usr/bin/env bash
# The searched policy of $RUN applied to the fp32 model (settings and sources: run/recipes.sh):
# quantized as searched (searched/), its centroids fine-tuned (finetune/) and fine-tuned with
# distillation from the fp32 model (finetune_distill/). EPOCHS=N sets the two fine-tunes' --epochs
# (searched/ trains none); extra flags pass through to each and win.
# Started again (after a crash), it skips finished stages and continues interrupted ones
# (`stage` in run/recipes.sh), as pretrain.sh and search.sh do.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
. run/recipes.sh
require_finished "$RUN/pretrain"
require_finished "$RUN/search"
batch=$(per_process_batch)
common=(--ckpt "$RUN/pretrain/best.pt" --policy "$RUN/search/policy.json" "${DATA_ROOT[@]}"
        "${FINETUNE[@]}" --batch-size "$batch" --workers 4)
# --epochs 0 after the extra flags: "searched" is the policy as searched, never fine-tuned
stage "$RUN/searched" finetune.py "${common[@]}" --out "$RUN/searched" "$@" --epochs 0
stage "$RUN/finetune" finetune.py "${common[@]}" --out "$RUN/finetune" "$@"
stage "$RUN/finetune_distill" finetune.py "${common[@]}" --distill \
    --out "$RUN/finetune_distill" "$@"
