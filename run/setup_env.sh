# Sourced by the run scripts: create .venv on first use, install each requirements file when it
# changes, and set the process environment every stage shares. requirements.txt is what running
# needs; a script may name more files in EXTRA_REQUIREMENTS first (run/test.sh: the test tools of
# tests/requirements.txt). Each file has its own stamp, so the demo and the tests do not undo
# each other's.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER_DIR="$PWD"  # run/recipes.sh goes back there: paths given to a run script are the caller's
cd "$REPO_ROOT"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    python3 -m venv .venv
fi
for requirements in requirements.txt ${EXTRA_REQUIREMENTS:-}; do
    stamp=".venv/.$(echo "${requirements%.txt}" | tr / _).sha"  # .requirements.sha, ...
    want="$(sha256sum "$requirements" | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "[setup] installing $requirements into .venv"
        .venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
        echo "$want" > "$stamp"
    fi
done
# shellcheck disable=SC1091
. .venv/bin/activate
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Large temporaries (neighbour tensors) otherwise go through mmap/munmap on every step and the
# page faults dominate a Point Transformer layer's forward+backward on CPU. glibc caps
# mmap_threshold at 32 MiB, so the larger ones are still mapped: hugetlb=1 backs them with
# transparent huge pages (bench/pointops.py: page faults per grouping step 165k -> 2.4k,
# pt_seg step 1.3 s -> 1.1 s). mmap_max=0 (no mmap at all) is not set here: the scripts turn
# mmap off themselves on a CPU run (lib/heap.py), so that the blocks above 32 MiB are reused too,
# and other processes (the test runner, a user's own) keep glibc's usual mapping.
export GLIBC_TUNABLES="glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456:glibc.malloc.hugetlb=1"
