#!/usr/bin/env bash
# Sets up .venv (first run: a few minutes) and runs the end-to-end demo on synthetic CT.
# Extra arguments go to hyspark_demo (see `.venv/bin/hyspark_demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/hyspark_demo "$@"
