#!/usr/bin/env bash
# Paper-scale HAQ search on the pretrained model of $RUN (settings and sources: run/recipes.sh),
# with the first layer and classifier kept at KEEP bits as run/finetune.sh keeps them.
#   TASK=s3dis bash run/search.sh --episodes 100
#   EPISODES=100 bash run/search.sh              # the same; extra flags win over EPISODES
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
. run/recipes.sh
require_finished "$RUN/pretrain"
stage "$RUN/search" search.py --ckpt "$RUN/pretrain/best.pt" "${DATA_ROOT[@]}" "${SEARCH[@]}" \
    --out "$RUN/search" "$@"
