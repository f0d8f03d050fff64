#!/usr/bin/env bash
# The CUDA checks and timings of bench/RESULTS.md, in stages, on a machine with a GPU and a
# Python that already has a CUDA torch (and triton) installed; no .venv is made.
#   bash bench/gpu_check.sh OUT_DIR STAGE...
# Each stage appends its output to OUT/steps.log and prints one line. Stages:
#   setup      pip-install what .whl/ holds (pykdtree wheel, fpsample sdist) without an index
#   tests      the whole suite (the CUDA-only tests run here); tests-gpu: the GPU-specific files
#   fps        bench/fps_gpu.py: Triton FPS against the torch loop, launch shapes, validity
#   ops        bench/pointops.py --device cuda: FPS, kNN, interpolation, both backends
#   graphs     bench/graph_step.py: the PT training step eager against CUDA-graph replay
#   profile    bench/profile_step.py: the tiny PT's training step by CUDA time
#   pipeline   pretrain -> search -> finetune -> eval of the tiny PT on CUDA, a one-GPU
#              torchrun, PCT and semseg epochs
#   bench      bench/run.py --device cuda (the sections in BENCH_SECTIONS, default all)
set -uo pipefail
OUT=$1; shift
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
run_dir=$(mktemp -d)
step() {  # NAME COMMAND...: run, append its output to OUT/steps.log, keep going on failure
    local name=$1; shift
    local start=$SECONDS
    timeout "${STEP_TIMEOUT:-1800}" "$@" > "$run_dir/$name.log" 2>&1
    local rc=$?
    { echo "===== $name (rc=$rc, $((SECONDS - start)) s): $*"; cat "$run_dir/$name.log"; } \
        >> "$OUT/steps.log"
    echo "[$name] rc=$rc $((SECONDS - start))s: $(tail -n 1 "$run_dir/$name.log")"
    [ $rc -eq 0 ] || status=1
}
for stage in "$@"; do
    case $stage in
    setup)
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
        step setup python3 -m pip install -q --no-index --no-deps --no-build-isolation .whl/* ;;
    tests)
        step tests python3 -m pytest -q -p no:cacheprovider -rs tests ;;
    tests-gpu)  # the tests whose code differs on CUDA, each failure reported as it happens
        # (-v, --tb=short): a stage cut by STEP_TIMEOUT loses pytest's closing summary. With
        # pytest-timeout installed, one slow test fails alone instead of stopping the stage.
        per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=150")
        # test_bench's heap, step-breakdown and GEMM-share benches run on the CPU only
        # shellcheck disable=SC2086
        step tests_gpu python3 -m pytest -v --tb=short -p no:cacheprovider -rfs $per_test \
            tests/test_cuda_graphs.py tests/test_fps_triton.py tests/test_ops_geometry.py \
            tests/test_metrics.py tests/test_quant_kmeans.py tests/test_heap.py \
            tests/test_pipeline.py tests/test_bench.py -k "not heap_bench and not step_breakdown \
            and not gemm_share"
        grep -E "FAILED|ERROR|Error:|^E  " "$run_dir/tests_gpu.log" | head -n 40 ;;
    fps)
        STEP_TIMEOUT=240 step fps python3 bench/fps_gpu.py --json "$OUT/fps_gpu.json" ;;
    ops)
        step ops python3 bench/pointops.py --sections ops --device cuda \
            --json "$OUT/pointops_cuda.json"
        tail -n 8 "$run_dir/ops.log" ;;
    graphs)
        step graphs python3 bench/graph_step.py --device cuda --json "$OUT/graph_step.json" ;;
    profile)
        step profile python3 bench/profile_step.py --device cuda
        tail -n 32 "$run_dir/profile.log" ;;
    pipeline)
        ck=$run_dir/pt
        step pretrain python3 pretrain.py --device cuda --model pt_seg_tiny --epochs 3 \
            --lr 0.005 --out "$ck/pretrain"
        step search python3 search.py --device cuda --ckpt "$ck/pretrain/best.pt" \
            --episodes 12 --warmup 6 --out "$ck/search"
        step finetune python3 finetune.py --device cuda --ckpt "$ck/pretrain/best.pt" \
            --policy "$ck/search/policy.json" --keep-first-last 8 --distill --epochs 1 \
            --lr 1e-3 --out "$ck/finetune"
        step eval_fp32 python3 eval.py --device cuda --ckpt "$ck/pretrain/best.pt"
        step eval_quant python3 eval.py --device cuda --ckpt "$ck/finetune/best.pt"
        step torchrun torchrun --nproc-per-node 1 pretrain.py --device cuda \
            --model pt_seg_tiny --epochs 1 --out "$ck/ddp"
        step pct python3 pretrain.py --device cuda --model pct_cls_tiny \
            --dataset synthetic_cls --epochs 1 --out "$ck/pct"
        step semseg python3 pretrain.py --device cuda --model pt_semseg_tiny \
            --dataset synthetic_rooms --epochs 1 --out "$ck/semseg"
        step eval_semseg python3 eval.py --device cuda --ckpt "$ck/semseg/best.pt"
        tail -n 25 "$run_dir/eval_quant.log" ;;
    bench)
        # shellcheck disable=SC2086  # the section names are words
        step bench python3 bench/run.py --device cuda ${BENCH_SECTIONS:+--only $BENCH_SECTIONS} \
            --json "$OUT/run_cuda${BENCH_SECTIONS:+_${BENCH_SECTIONS// /_}}.json"
        tail -n 30 "$run_dir/bench.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
    esac
done
rm -rf "$run_dir"
exit $status
