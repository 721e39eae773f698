#!/usr/bin/env bash
# Sets up .venv (first run: a few minutes) and runs the whole test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not e2e"` for the fast unit tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-0} nnUNet_def_n_proc=${nnUNet_def_n_proc:-1}
exec .venv/bin/python -m pytest -q tests --durations=15 "$@"
