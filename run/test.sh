#!/usr/bin/env bash
# Runs the test suite; extra arguments go to pytest (e.g. `bash run/test.sh tests/test_train.py`).
set -euo pipefail
EXTRA_REQUIREMENTS=tests/requirements.txt . "$(dirname "$0")/setup_env.sh"
python -m pytest -q "$@"
