#!/usr/bin/env bash
# Paper-scale HAQ search (Wang et al. 2019): 10% of the fp32 weight bits, 2..8 bits per layer,
# 600 episodes of which 20 are random warm-up, each candidate fine-tuned briefly before its
# reward (search.py's default: HAQ's one pass over 2 x --val-size training samples, SGD lr 1e-3).
# Extra flags pass through.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
python search.py --ckpt checkpoints/pt_seg_shapenet/best.pt --preserve-ratio 0.1 \
    --min-bit 2 --max-bit 8 --episodes 600 --warmup 20 --val-size 500 \
    --out checkpoints/pt_seg_shapenet/search "$@"
