#!/usr/bin/env bash
# Paper-scale fine-tuning of the searched policy: first layer and classifier kept at 8 bits,
# distillation from the fp32 model. Extra flags pass through. Several GPUs: NPROC=4.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
launcher=(python)
[ "${NPROC:-1}" -gt 1 ] && launcher=(torchrun --nproc-per-node "$NPROC")
"${launcher[@]}" finetune.py --ckpt checkpoints/pt_seg_shapenet/best.pt \
    --policy checkpoints/pt_seg_shapenet/search/policy.json --keep-first-last 8 \
    --distill --kd-temperature 2 --kd-alpha 0.9 --epochs 30 --lr 1e-4 --batch-size 16 \
    --workers 4 --out checkpoints/pt_seg_shapenet/finetune "$@"
