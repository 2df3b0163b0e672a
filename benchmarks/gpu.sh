#!/usr/bin/env bash
# The prepared GPU run of issue 16 in one command, at most 8 minutes on an H200:
# CUDA tests, the suite's cost and peak memory on a CIFAR-shaped ResNet-18, and bitwise
# non-interference under cudnn.deterministic; results in one JSON file.
#
#   bash benchmarks/gpu.sh                     # -> benchmarks/results/gpu.json
#   bash benchmarks/gpu.sh --out run.json      # any option of benchmarks/gpu.py
#   GAPWATCH_PYTHON=/path/to/python bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${GAPWATCH_PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch, lightning, torchvision, pytest, sklearn, tensorboard" 2>/dev/null; then
    echo "gpu.sh: $PY lacks torch, lightning, torchvision, pytest, scikit-learn or tensorboard;" \
         "install requirements-dev.lock (make test does) or set GAPWATCH_PYTHON." >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
# gpu.py keeps to its own 8-minute budget and writes the JSON after every section; the
# timeout is the backstop, so that a hung run still leaves the sections done so far.
exec timeout --signal=INT 490 "$PY" benchmarks/gpu.py "$@"
