#!/usr/bin/env bash
# Paper-scale pretraining of Point Transformer on ShapeNet part (Zhao et al. 2021: SGD,
# momentum 0.9, weight decay 1e-4, lr 0.05 dropped 10x at 60% and 80%, 2048 points).
# Extra flags pass through, e.g. `bash run/pretrain.sh --epochs 4 --batch-size 8`.
# Several GPUs: NPROC=4 bash run/pretrain.sh
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
DATA=data/shapenetcore_partanno_segmentation_benchmark_v0_normal
if [ ! -f "$DATA/synsetoffset2category.txt" ]; then
    cat >&2 <<MSG
ShapeNet part is not at $DATA.
Download https://shapenet.cs.stanford.edu/media/shapenetcore_partanno_segmentation_benchmark_v0_normal.zip
and unzip it into data/, so that $DATA/synsetoffset2category.txt,
$DATA/train_test_split/shuffled_{train,val,test}_file_list.json and $DATA/<synset>/<id>.txt exist.
Without the data: bash run/demo.sh runs the whole workflow on generated synthetic shapes.
MSG
    exit 1
fi
launcher=(python)
[ "${NPROC:-1}" -gt 1 ] && launcher=(torchrun --nproc-per-node "$NPROC")
"${launcher[@]}" pretrain.py --model pt_seg --dataset shapenet_part --data-root "$DATA" \
    --num-points 2048 --epochs 200 --batch-size 16 --optimizer sgd --lr 0.05 --schedule step \
    --weight-decay 1e-4 --workers 4 --out checkpoints/pt_seg_shapenet "$@"
