#!/usr/bin/env bash
# Runs the test suite (fast tests; `bash run/test.sh -m slow` for the slow ones).
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
python -m pytest -q "$@"
