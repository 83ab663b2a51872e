#!/usr/bin/env bash
# Everything GPU-side in one go, results under $OUT (default bench/results/gpu): see bench/gpu.py.
#   bash bench/gpu.sh            on a machine with a CUDA device (about 8 minutes)
#   bash bench/gpu.sh --dry-run  the same parts on the CPU at toy sizes (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1
exec "$python" -m bench.gpu "$@"
