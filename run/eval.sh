#!/usr/bin/env bash
# Evaluate a checkpoint: bash run/eval.sh checkpoints/pt_seg_shapenet/finetune/best.pt [flags]
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
[ $# -ge 1 ] || { echo "usage: bash run/eval.sh CHECKPOINT [eval.py flags]" >&2; exit 2; }
ckpt="$1"; shift
python eval.py --ckpt "$ckpt" "$@"
