#!/usr/bin/env bash
# Every GPU benchmark figure in one command (see benchmarks/gpu.py).
#
#   benchmarks/gpu.sh            # install .[cuda] into .venv-gpu, then run
#   benchmarks/gpu.sh --dry-run  # the same on any device, tiny sizes
#
# Installs nothing beyond the project and its cuda extra. Exits with status 2
# at once, saying why, when no NVIDIA GPU is visible (unless --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ " $* " != *" --dry-run "* ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "benchmarks/gpu.sh: nvidia-smi not found: no NVIDIA driver or GPU here" \
        "(pass --dry-run to exercise the script without one)" >&2
    exit 2
fi
if [ ! -x .venv-gpu/bin/python ]; then
    "$PYTHON" -m venv .venv-gpu
fi
extra="cuda"
[[ " $* " == *" --dry-run "* ]] && extra=""
.venv-gpu/bin/python -m pip install --quiet -e ".${extra:+[$extra]}"
exec .venv-gpu/bin/python -m benchmarks.gpu "$@"
