"""What 4-bit weights cost SmolLM2, and what buys it back: held-out perplexity and decode speed per weight format.

Builds (cached in --work, shared with bench_decoder.py) the same two-cluster bundle, a cluster keeping everything and
one skipping about a fifth of the MACs, for `cpu` (fp32), `cpu-int4` (onnxruntime-genai's builder's scheme) and
`cpu-int4-lm8` (the unembedding 8-bit); scores each dense graph's next-token perplexity on held-out text (the first
--texts docstrings of the corpus' held-out split, its sha256 recorded so every machine reads the same; at most 96
tokens each, those of more than 8); with --hqq also onnxruntime's HQQ quantizer on the fp32 dense graph (its float zero points run on a slow
kernel path: timed too). Then decode speed of the int4 graphs beside the builder's int4, interleaved per token.

    python examples/bench_int4_quality.py --work examples/out/bench_smollm2 [--hqq]
    python examples/bench_int4_quality.py --quick      # a small random Llama: checks the script, figures meaningless
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decoder import build_anchor, build_ours, decoder_folder, fifth_blocks, random_checkpoint, round_robin  # noqa: E402
from common import cpu_flags, folder_bytes, half_blocks  # noqa: E402

FORMATS = {"fp32": "cpu", "int4": "cpu-int4", "int4, lm_head int8": "cpu-int4-lm8"}


def held_out_ids(checkpoint: Path, texts: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from corpus import load_corpus, split

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    _, held = split(load_corpus())
    return [ids for ids in (tokenizer(d.text)["input_ids"][:96] for d in held[:texts]) if len(ids) > 8]


def perplexity(graph: Path, ids: list[list[int]]) -> float:
    import onnxruntime as ort

    from edgecompile.runtime.decode import empty_cache

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    total = count = 0.0
    for row in ids:
        x = np.array([row], np.int64)
        logits = session.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x), **empty_cache(session)})[0][0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total += -log_probs[np.arange(len(row) - 1), x[0, 1:]].sum()
        count += len(row) - 1
    return math.exp(total / count)


def hqq_graph(fp32_folder: Path, out: Path) -> tuple[Path, str]:
    """onnxruntime's HQQ quantizer (block 32, 4 bits) on the fp32 dense graph, beside its genai_config (for the timing),
    and what its lm_head is: the quantizer takes MatMul nodes only, so a tied lm_head edgecompile stores once
    (FusedMatMul over the embedding table) stays fp32."""
    import logging
    import shutil

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    head = next(n.op_type for n in onnx.load(str(fp32_folder / "dense.onnx"), load_external_data=False).graph.node if "logits" in n.output)
    lm_head = "lm_head 4-bit" if head == "MatMul" else "lm_head fp32"
    out.mkdir(parents=True, exist_ok=True)
    graph = out / "dense_hqq.onnx"
    if not graph.is_file():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_folder / "dense.onnx")), algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4))
        quantizer.process()
        quantizer.model.save_model_to_file(str(graph), use_external_data_format=True)
        for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(fp32_folder / name, out / name)
    return graph, lm_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for the builds (bench_decoder.py's work folder shares them) [default: a temporary one]")
    parser.add_argument("--texts", type=int, default=48, help="held-out docstrings read (those of more than 8 tokens are scored) [default: %(default)s]")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the interleaved decode timing [default: %(default)s]")
    parser.add_argument("--hqq", action="store_true", help="also onnxruntime's HQQ quantizer on the fp32 dense graph")
    parser.add_argument("--quick", action="store_true", help="a small random Llama, 2 rounds, 6 texts: checks the script")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_int4_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        checkpoint, blocks, rounds, texts = random_checkpoint(work / "llama", True), half_blocks(8), 2, 6
    else:
        from real_models import smollm2_checkpoint

        checkpoint, blocks, rounds, texts = smollm2_checkpoint(), fifth_blocks(30), args.rounds, args.texts
    folders = {name: decoder_folder(build_ours(checkpoint, work, f"bundle_{target.removeprefix('cpu-') if target != 'cpu' else 'fp32'}",
                                               blocks, target))[0] for name, target in FORMATS.items()}
    ids = held_out_ids(checkpoint, texts)
    graphs = {name: folder / "dense.onnx" for name, folder in folders.items()}
    hqq = None
    if args.hqq:
        graph, lm_head = hqq_graph(folders["fp32"], work / "hqq")
        hqq = f"int4 HQQ, float zero points ({lm_head})"
        graphs[hqq] = graph
    print(f"held-out perplexity of each dense graph ({len(ids)} texts, {sum(len(i) - 1 for i in ids)} scored tokens, onnxruntime)")
    print("| weights | perplexity | vs fp32 | decoder folder MB |\n|---|---:|---:|---:|")
    scores = {name: perplexity(graph, ids) for name, graph in graphs.items()}
    for name, score in scores.items():
        size = f"{folder_bytes(folders[name]) / 1e6:.0f}" if name in folders else "—"
        print(f"| {name} | {score:.2f} | {score / scores['fp32']:.3f}x | {size} |", flush=True)
    anchor = build_anchor(checkpoint, work / "anchor_int4", "int4", sys.executable)
    timed = {"builder int4": (anchor, "-")}
    for name in ("int4", "int4, lm_head int8"):
        timed[f"{name} dense"] = (folders[name], "dense.onnx")
        timed[f"{name} cluster skipping ~1/5 MACs" if not args.quick else f"{name} cluster skipping half"] = (folders[name], "cluster_1.onnx")
    if hqq:
        timed[f"{hqq} dense"] = (graphs[hqq].parent, "dense_hqq.onnx")
    timings = round_robin(timed, 64, 64, rounds)
    base = timings["builder int4"]["speed_vs_first"]
    print(f"\ndecode, onnxruntime-genai, 1 thread, prompt 64 + 64 new tokens, medians over {rounds} interleaved rounds; {cpu_flags()}")
    print("| graph | decode ms/token | vs builder int4 |\n|---|---:|---:|")
    for name, t in timings.items():
        print(f"| {name} | {t['decode_ms']:.2f} | {t['speed_vs_first'] / base:.3f}x |")


if __name__ == "__main__":
    main()
