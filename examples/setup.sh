#!/usr/bin/env bash
# Create a virtualenv and install edgecompile with its test extras. Idempotent; safe to re-run.
#
#   bash examples/setup.sh          # lane tf5 (default): .venv      with transformers 5, sentence-transformers 6
#   bash examples/setup.sh tf4      # lane tf4:           .venv-tf4  with transformers 4.57, sentence-transformers 5
#
# The lane can also be given as EDGECOMPILE_LANE. torch is installed first and pinned: the CPU build of
# 2.13.0 is on this machine's disk, while an unpinned torch would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LANE=${1:-${EDGECOMPILE_LANE:-tf5}}
case "$LANE" in
    tf5) VENV=.venv;     PINS=("transformers>=5,<6" "sentence-transformers>=6,<7") ;;
    tf4) VENV=.venv-tf4; PINS=("transformers>=4.57,<4.58" "sentence-transformers>=5,<6") ;;
    *) echo "examples/setup.sh: lane '$LANE' is not known; expected tf5 (default) or tf4" >&2; exit 2 ;;
esac
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
quiet_pip install --quiet --upgrade pip
quiet_pip install --quiet "torch==2.13.0"
# optimum-onnx caps transformers below 4.58 and is no longer used: a venv made before the change drops it.
if "$VENV/bin/python" -m pip show --quiet optimum-onnx >/dev/null 2>&1; then
    quiet_pip uninstall --quiet --yes optimum-onnx
fi
# The lane's pins go into the same resolver call as the package, so pip never settles on another major.
quiet_pip install --quiet -e ".[test,qnn]" "${PINS[@]}"
"$VENV/bin/python" -m pip check >/dev/null || { "$VENV/bin/python" -m pip check >&2; exit 4; }
"$VENV/bin/python" -c "
import torch, onnxruntime, transformers, sentence_transformers, optimum.version, edgecompile
print(f'edgecompile {edgecompile.__version__} ready in $VENV (lane $LANE): torch {torch.__version__}, '
      f'transformers {transformers.__version__}, sentence-transformers {sentence_transformers.__version__}, '
      f'optimum {optimum.version.__version__}, onnxruntime {onnxruntime.__version__}')"
