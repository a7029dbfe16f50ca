#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one JSON line per figure, under 5 minutes on one GPU.
#   bash benchmarks/gpu_check.sh             # on a CUDA machine; figures in benchmarks/results/gpu_check/
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: the plan and the runs' own checks
# Uses the project's .venv when there is one (make env), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" benchmarks/gpu_check.py "$@"
