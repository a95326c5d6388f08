#!/usr/bin/env bash
# Create .venv and install edgecompile with its test extras. Idempotent; safe to re-run.
# torch is installed first and pinned: the CPU build of 2.13.0 is on this machine's disk, while an
# unpinned torch would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet -e ".[test,qnn]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, onnxruntime, edgecompile; print(f'edgecompile {edgecompile.__version__} ready: torch {torch.__version__}, onnxruntime {onnxruntime.__version__}')"
