#!/bin/bash
# Check and time medhpc's CUDA kernels (and the CT memory model) on a machine with one NVIDIA GPU; < 9.5 minutes on an H100.
#
# Run:     bench/gpu_check.sh [--smoke] [--only NAME,...] [--repeats N]   (from anywhere)
# Output:  gpu_check.json and gpu_check.txt in $OUT if set, else bench/results/.
# Network: none. Python: $MEDHPC_PYTHON, else the repository's .venv, else python3. Wheels
#          carried in bench/wheels/*.whl (e.g. numba-cuda and its cu12/cu13 wheels) are
#          installed into that Python with --no-index first; otherwise what is installed is used.
# Without a GPU it says so and exits 0. Exit 1: a kernel disagrees with its CPU twin or fails.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${MEDHPC_PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then
        python="$root/.venv/bin/python"
    else
        python="$(command -v python3)"
    fi
fi
shopt -s nullglob
wheels=("$root"/bench/wheels/*.whl)
if [ "${#wheels[@]}" -gt 0 ]; then
    echo "gpu_check: installing ${#wheels[@]} carried wheel(s) from bench/wheels (no network)"
    "$python" -m pip install --quiet --no-index --find-links "$root/bench/wheels" "${wheels[@]}"
fi
scratch="$(mktemp -d "${TMPDIR:-/tmp}/medhpc-gpu-check.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
export NUMBA_CACHE_DIR="$scratch/numba" MPLCONFIGDIR="$scratch/matplotlib"
export HDF5_USE_FILE_LOCKING=FALSE PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
# The CT planner's memory estimate against torch.cuda.max_memory_allocated (under 80 s).
if "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
    timeout 80 "$python" "$root/bench/ct/memory.py" --device cuda \
        --out "${OUT:-$root/bench/results}/ct_memory_gpu.json" || echo "gpu_check: ct memory check did not finish" >&2
fi
# A hard stop a little under 8 minutes; the script itself stops timing after --budget-s.
status=0
timeout 470 "$python" "$root/bench/gpu_check.py" "$@" || status=$?
[ "$status" -ne 124 ] || echo "gpu_check: stopped after 470 s" >&2
exit "$status"
