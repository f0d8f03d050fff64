#!/usr/bin/env bash
# Score checkpoints on the test split:
#   bash run/eval.sh                 # every checkpoint of $RUN -> $RUN/results.md, results.json
#   bash run/eval.sh CHECKPOINT [eval.py flags]   # one checkpoint
# Both shard the split over NPROC processes.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
. run/recipes.sh
if [ $# -ge 1 ] && [[ "$1" != -* ]]; then
    ckpt="$1"; shift
    launch eval.py --ckpt "$ckpt" "${DATA_ROOT[@]}" "${EVAL[@]}" "$@"
else
    launch -m lib.results_table --run "$RUN" "${DATA_ROOT[@]}" "${EVAL[@]}" "$@"
fi
