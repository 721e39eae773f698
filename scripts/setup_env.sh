#!/usr/bin/env bash
# Creates .venv (if needed) and installs the package with its test extra.
# Idempotent: re-running with an unchanged pyproject.toml costs a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating virtual environment .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.hyspark-installed
want=$(cat pyproject.toml | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[setup] installing torch, nnU-Net and nnunet-hyspark into .venv (first run: a few minutes)"
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision must come as a matching pair: nnU-Net imports timm -> torchvision.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
echo "[setup] done"
