"""Decoder benchmark (issue 9): edgecompile's Llama clusters against onnxruntime-genai's own model builder.

A not-tiny random-weight Llama (hidden 512, 8 layers, 8 query / 2 KV heads, intermediate 1408, vocab
32000) is built with edgecompile (clusters: one keeping everything, one skipping half the sub-layers)
and with onnxruntime-genai's model builder (fp32 and int4, the anchors). Every graph is driven by
onnxruntime-genai, one intra-op thread, in one round-robin run interleaved per token (each
graph prefills in turn, then each decodes its next token in turn; medians, and speed ratios as the
median over steps of anchor / graph time, so load from other processes lands on all graphs alike): prefill ms for the prompt, decode ms per token. Peak resident memory is measured per
graph in a process of its own. Printed beside the CPU flags, with the aims:

  - the cluster that keeps everything: at least 0.9x the anchor's decode speed;
  - the half cluster: decode speed-up over the anchor at least 85% of its ideal, the ratio of weight
    MACs per decoded token (lm_head included, from the bundle's manifest).

The builder needs transformers 5: --anchor-python names a Python that has it and onnxruntime-genai
(default: this one). Run: python examples/bench_decoder.py [--quick] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import random_llama
from common import cpu_flags, edgecompile, folder_bytes, half_blocks, minilm, write_masks

PROMPTS = "How do I reset my password?\nThe quick brown fox jumps over the lazy dog.\nParis is the capital of France.\n"


def make_checkpoint(directory: Path, quick: bool, seed: int = 0) -> Path:
    """The benchmark's random Llama (hidden 512, 8 layers, 8 / 2 heads, FFN 1408, vocab 32000; smaller if quick)."""
    if (directory / "model.safetensors").is_file():
        return directory
    return random_llama(directory, seed, vocab_size=32000, hidden_size=512 if not quick else 128,
                        intermediate_size=1408 if not quick else 352, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, max_position_embeddings=1024)


W1A8 = {"format": "edgecompile-lowbit/1", "linear": [{"modules": ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"],
                                                    "bits": 1, "groups": "row", "activations": "dynamic"}]}


def binary_student(checkpoint: Path, work: Path) -> Path:
    """The same checkpoint declared XTC W1A8 (latent weights binarized by edgecompile, per-token 8-bit activations)."""
    import shutil

    student = work / "llama_w1a8"
    if not student.is_dir():
        shutil.copytree(checkpoint, student)
        (student / "edgecompile.json").write_text(json.dumps(W1A8))
    return student


def build_ours(checkpoint: Path, work: Path, name: str = "bundle") -> Path:
    out = work / name
    if (out / "manifest.json").is_file():
        return out
    masks = write_masks(work / "masks.safetensors", {0: {"blocks": np.ones((8, 2))}, 1: {"blocks": half_blocks(8)}},
                        (np.random.default_rng(0).standard_normal((2, 384)) * 0.05).astype(np.float32))
    (work / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    edgecompile("build", checkpoint, "--masks", masks, "--router-encoder", minilm(),
                "--samples", work / "prompts.txt", "--out", out, "-q", fresh_process=True)
    return out


def router_ms(bundle: Path, rounds: int) -> float:
    """Median wall time of the bundle's router on one sample prompt (it runs once per generation), one thread."""
    from edgecompile.bundle.store import load_bundle
    from edgecompile.inputs.router import encode_role
    from edgecompile.lowering.targets import target_from_dict
    from edgecompile.runtime.sessions import create_session

    reader = load_bundle(bundle)
    entry = reader.target("cpu")
    session = create_session(reader.graph_file(entry, "router"), target_from_dict(entry["target"]), 1)
    times = []
    for sample in encode_role(reader, "router", PROMPTS.splitlines()) * (rounds + 1):
        feed = {"input_ids": sample.input_ids[None], "attention_mask": np.ones_like(sample.input_ids)[None]}
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times[len(PROMPTS.splitlines()):]))


def build_anchor(checkpoint: Path, out: Path, precision: str, python: str) -> Path:
    if not (out / "genai_config.json").is_file():
        subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out), "-p", precision,
                        "-e", "cpu"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


# what one generation does in a child process of its own (peak memory)
GENERATE = """
import json, sys, numpy as np, onnxruntime_genai as og
def high_water_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
baseline = high_water_mb()
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: measure the model, not the imports
folder, filename, prompt_len, new, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
config = og.Config(folder)
decoder = {"session_options": {"intra_op_num_threads": 1, "inter_op_num_threads": 1}}
if filename != "-":
    decoder["filename"] = filename
config.overlay(json.dumps({"model": {"decoder": decoder}}))
model = og.Model(config)
prompt = np.arange(5, 5 + prompt_len, dtype=np.int32)[None]
for _ in range(rounds):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + new, min_length=prompt_len + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
print(json.dumps({"peak_rss_mb": high_water_mb(), "after_imports_mb": baseline}))
"""


def peak_memory(folder: Path, filename: str, prompt_len: int, new: int) -> float:
    result = subprocess.run([sys.executable, "-c", GENERATE, str(folder), filename, str(prompt_len), str(new), "1"],
                            capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def round_robin(graphs: dict[str, tuple[Path, str]], prompt_len: int, new: int, rounds: int) -> dict[str, dict[str, float]]:
    """Interleaved per token: every graph prefills in turn, then every graph decodes its next token in turn, so a
    burst of load from other processes lands on all graphs alike; the graph order rotates each round. Returns per
    graph the median prefill ms, the median decode ms per token and the median over steps of anchor / graph
    decode time (the speed ratio measured side by side)."""
    import onnxruntime_genai as og

    models = {}
    for name, (folder, filename) in graphs.items():
        config = og.Config(str(folder))
        decoder = {"session_options": {"intra_op_num_threads": 1, "inter_op_num_threads": 1}}
        if filename != "-":
            decoder["filename"] = filename
        config.overlay(json.dumps({"model": {"decoder": decoder}}))
        models[name] = og.Model(config)
    prompt = np.arange(5, 5 + prompt_len, dtype=np.int32)[None]
    names = list(models)
    prefill: dict[str, list[float]] = {name: [] for name in names}
    steps: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):  # round 0 warms up
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        generators = {}
        for name in order:
            params = og.GeneratorParams(models[name])
            params.set_search_options(max_length=prompt_len + new, min_length=prompt_len + new, do_sample=False)
            generators[name] = og.Generator(models[name], params)
            start = time.perf_counter()
            generators[name].append_tokens(prompt)
            if round_:
                prefill[name].append((time.perf_counter() - start) * 1e3)
        for step in range(new - 1):
            for name in order:
                start = time.perf_counter()
                generators[name].generate_next_token()
                if round_ and step:  # the first decode step settles the cache
                    steps[name].append((time.perf_counter() - start) * 1e3)
    anchor = np.asarray(steps[names[0]])
    return {name: {"prefill_ms": float(np.median(prefill[name])), "decode_ms": float(np.median(steps[name])),
                   "speed_vs_first": float(np.median(anchor / np.asarray(steps[name])))} for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="Folder for the checkpoint and builds (default: a temporary one).")
    parser.add_argument("--anchor-python", default=sys.executable,
                        help="A Python with transformers>=5 and onnxruntime-genai, for onnxruntime-genai's model builder.")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="A smaller model and 2 rounds: checks the script, not the figures.")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_decoder_"))
    work.mkdir(parents=True, exist_ok=True)
    rounds = 2 if args.quick else args.rounds
    checkpoint = make_checkpoint(work / "llama", args.quick)
    bundle = build_ours(checkpoint, work)
    binary = build_ours(binary_student(checkpoint, work), work, "bundle_w1a8")
    anchors = {p: build_anchor(checkpoint, work / f"anchor_{p}", p, args.anchor_python) for p in ("fp32", "int4")}
    manifest = json.loads((bundle / "manifest.json").read_text())
    decoder = bundle / manifest["targets"]["cpu"]["genai_folder"]
    binary_manifest = json.loads((binary / "manifest.json").read_text())
    graphs = {"anchor fp32 (builder)": (anchors["fp32"], "-"), "anchor int4 (builder)": (anchors["int4"], "-"),
              "edgecompile dense": (decoder, "dense.onnx"), "edgecompile cluster_0 (keeps all)": (decoder, "cluster_0.onnx"),
              "edgecompile cluster_1 (half)": (decoder, "cluster_1.onnx"),
              "edgecompile W1A8 dense": (binary / binary_manifest["targets"]["cpu"]["genai_folder"], "dense.onnx")}
    timings = round_robin(graphs, args.prompt_tokens, args.new_tokens, rounds)
    memory = {name: peak_memory(folder, filename, args.prompt_tokens, args.new_tokens) for name, (folder, filename) in graphs.items()}
    macs = {c["graph"]: c["macs_per_token"]["linear"] for c in manifest["clusters"]}
    ideal = manifest["dense"]["macs_per_token"]["linear"] / macs["cluster_1"]
    by_graph = {c["graph"]: c["bytes"]["cpu"] for c in manifest["clusters"]}
    sizes = {"anchor fp32 (builder)": folder_bytes(anchors["fp32"]), "anchor int4 (builder)": folder_bytes(anchors["int4"]),
             "edgecompile dense": manifest["dense"]["bytes"]["cpu"], "edgecompile cluster_0 (keeps all)": by_graph["cluster_0"],
             "edgecompile cluster_1 (half)": by_graph["cluster_1"],
             "edgecompile W1A8 dense": binary_manifest["dense"]["bytes"]["cpu"]}
    print(f"{cpu_flags()}; onnxruntime-genai, 1 intra-op thread; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens; medians over {rounds} rounds interleaved per token")
    print("| graph | prefill ms | decode ms/token | decode speed vs anchor fp32 | peak RSS MB (load + generate) | files MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in timings.items():
        print(f"| {name} | {t['prefill_ms']:.1f} | {t['decode_ms']:.2f} | {t['speed_vs_first']:.3f}x | {memory[name]:.0f} | "
              f"{sizes[name] / 1e6:.1f} |")
    keeps = timings["edgecompile cluster_0 (keeps all)"]["speed_vs_first"]
    half = timings["edgecompile cluster_1 (half)"]["speed_vs_first"]
    print(f"decoder folder on disk (dense + 2 clusters, shared weights.bin): {folder_bytes(decoder) / 1e6:.1f} MB")
    print(f"aim 1: cluster keeping everything >= 0.9x anchor decode speed: {keeps:.3f}x -> {'met' if keeps >= 0.9 else 'NOT met'}")
    print(f"aim 2: half cluster speed-up {half:.3f}x vs ideal {ideal:.3f}x (weight MACs per decoded token, lm_head included): "
          f"{half / ideal:.1%} of ideal -> {'met' if half / ideal >= 0.85 else 'NOT met'} (aim 85%)")
    w1 = timings["edgecompile W1A8 dense"]
    print(f"W1A8 (exact XTC contract, MatMulIntegerToFloat): decode {w1['speed_vs_first']:.2f}x the fp32 anchor, "
          f"{w1['speed_vs_first'] / timings['anchor int4 (builder)']['speed_vs_first']:.2f}x the int4 anchor; files {sizes['edgecompile W1A8 dense'] / 1e6:.1f} MB vs "
          f"{sizes['anchor fp32 (builder)'] / 1e6:.1f} (fp32) and {sizes['anchor int4 (builder)'] / 1e6:.1f} (int4) MB")
    routed = router_ms(bundle, rounds)
    generation = {name: t["prefill_ms"] + args.new_tokens * t["decode_ms"] for name, t in timings.items()}
    end_to_end = routed + generation["edgecompile cluster_1 (half)"]
    print(f"routed generation end to end (router {routed:.2f} ms, full all-MiniLM-L6-v2, on the prompt once + half cluster "
          f"prefill + {args.new_tokens} tokens): {end_to_end:.0f} ms vs dense {generation['edgecompile dense']:.0f} ms "
          f"({end_to_end / generation['edgecompile dense']:.3f}x) and anchor fp32 {generation['anchor fp32 (builder)']:.0f} ms "
          f"({end_to_end / generation['anchor fp32 (builder)']:.3f}x); router share {routed / end_to_end:.1%}")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
