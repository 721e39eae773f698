#!/usr/bin/env bash
# The first check of a machine with one CUDA GPU (about 5 minutes, at most 8): the CUDA tests, the speed
# table (dense / blocks / spconv x fp32 / bf16 at 96^3), peak memory of the three networks against the
# planner's estimate, and 200 steps of bf16 vs fp32 pre-training loss curves -> OUT_DIR/report.md + .json.
#
#   bash scripts/gpu_check.sh [OUT_DIR] [options]     (default OUT_DIR: ./gpu_check_report)
#   bash scripts/gpu_check.sh /tmp/r --smoke          (tiny sizes: runs on a CPU in a minute or two)
#   options: --loss-steps N  --stages env tests memory speed loss  --budget-s S  (see --help)
#
# Python: .venv/bin/python when it exists and its torch sees the GPU (scripts/setup_env.sh made it), else the
# machine's python3 with this checkout on PYTHONPATH (a bare GPU image has torch, pytest, matplotlib but
# not nnU-Net: nothing the check runs needs it). Nothing is installed or downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
# the first Python whose torch sees a GPU, else the first with torch at all
PY="" info=""
for candidate in .venv/bin/python python3 python; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    found=$("$candidate" -c "import torch; print(torch.__version__, 'cuda' if torch.cuda.is_available() else 'no-cuda')" \
        2>/dev/null) || continue
    if [ -z "$PY" ] || [[ "$found" == *" cuda" ]]; then
        PY=$candidate info=$found
    fi
    [[ "$found" == *" cuda" ]] && break
done
if [ -z "$PY" ]; then
    echo "error: no Python with torch found (.venv/bin/python, python3) -> run scripts/setup_env.sh" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-0}" nnUNet_def_n_proc="${nnUNet_def_n_proc:-1}"
echo "[gpu_check] python: $(command -v "$PY") (torch $info)"
exec "$PY" -m nnunet_hyspark.cli.gpu_check "$@"
