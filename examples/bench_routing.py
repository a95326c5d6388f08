"""Does routing pay? all-MiniLM-L6-v2, K = 4 clusters that each skip half the sub-layers, three routers:
the full encoder, its first 2 layers, and a model2vec static-embedding model distilled from it. Prints, per
router, router / routed / dense p50 on the built-in samples (edgecompile bench, one run each), agreement with
the full router, and the size of a K = 4 xnnpack folder vs one model's files; `lscpu` flags beside them.

    python examples/bench_routing.py [--out examples/out/routing] [--runs 30] [--model2vec DIR]

Distilling the model2vec router takes minutes; it is cached in --out (or pass --model2vec DIR).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, OUT, cpu_flags, edgecompile, folder_bytes, half_blocks, minilm, text_lines


def half_skipping_gates(layers: int) -> dict[int, dict[str, np.ndarray]]:
    """Four clusters, each without half of the 2 x layers sub-layers (different halves)."""
    patterns = [half_blocks(layers, flip) for flip in (0, 1)]  # attention in odd / even layers, FFN in the others
    upper, lower = np.ones((layers, 2), np.float32), np.ones((layers, 2), np.float32)
    upper[layers // 2:], lower[: layers // 2] = 0.0, 0.0
    patterns += [upper, lower]
    return {k: {"blocks": b} for k, b in enumerate(patterns)}


def build(student: Path, masks: Path, router: Path, out: Path, target: str, layers: int | None = None) -> dict:
    start = time.perf_counter()
    edgecompile("build", student, "--masks", masks, "--router-encoder", router, "--out", out, "--force", "-q", "--target", target,
                *(["--router-layers", layers] if layers else []), quiet=True, fresh_process=True)
    print(f"built {out.name} ({target}) in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads((out / "manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT / "routing")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--model2vec", type=Path, default=None, help="a model2vec folder distilled from MiniLM [default: distil once]")
    parser.add_argument("--short", action="store_true", help="3 runs, no size comparison: checks the script works")
    args = parser.parse_args()
    from fit_router_centroids import distill_static_router, fit, write_router_masks

    from edgecompile.bundle.store import load_bundle
    from edgecompile.inputs.samples import BUILTIN_SAMPLES
    from edgecompile.serve.bench import bench_bundle
    from edgecompile.serve.bench_settings import BenchSettings

    full = minilm()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    m2v = args.model2vec or out / "m2v_minilm"
    if not (m2v / "model.safetensors").is_file():
        distill_static_router(full, 384, m2v, "pass --model2vec DIR")
    texts = text_lines()
    gates = half_skipping_gates(6)
    runs = 3 if args.short else args.runs
    routers = {"full (6 layers)": (full, None), "2-layer truncated": (full, 2), "model2vec (static)": (m2v, None)}
    rows = []
    for label, (encoder, layers) in routers.items():
        fitted = fit(full, encoder, layers, texts, list(BUILTIN_SAMPLES), 4)
        centroids = fitted["full_centroids"] if layers is None and encoder == full else fitted["cheap_centroids"]
        masks = out / f"masks_{label.split()[0]}.safetensors"
        write_router_masks(masks, centroids, encoder, layers, gates)
        bundle = out / f"bundle_{label.split()[0]}"
        manifest = build(full, masks, encoder, bundle, "cpu", layers)
        report = bench_bundle(load_bundle(bundle), "cpu", BenchSettings(threads=1, runs=runs, warmup=2))
        r = report.routed
        rows.append((label, fitted["agreement"], manifest["router"]["macs_per_token"]["total"],
                     manifest["dense"]["macs_per_token"]["total"], r))
    print(f"\nall-MiniLM-L6-v2, K = 4 (every cluster skips half the sub-layers), cpu target, 1 thread, {runs} runs per input, "
          f"{rows[0][4].inputs} built-in samples at their own lengths (median {rows[0][4].tokens_median:g} tokens); "
          "measured while other jobs shared the 2 cores")
    print("| router | agreement with full router (held out) | router MMACs/token | router p50 ms | routed p50 ms | dense p50 ms "
          "| router / dense | routed / dense | router share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, agreement, router_macs, dense_macs, r in rows:
        print(f"| {label} | {agreement:.1%} | {router_macs / 1e6:.2f} | {r.router_p50_ms:.3f} | {r.routed_p50_ms:.3f} | "
              f"{r.dense_p50_ms:.3f} | {r.router_vs_dense:.3f} | {r.routed_vs_dense:.3f} | {r.router_share:.1%} |")
    if not args.short:
        shared = out / "bundle_xnnpack"
        manifest = build(full, out / "masks_model2vec.safetensors", m2v, shared, "xnnpack")
        one_model = manifest["dense"]["bytes"]["xnnpack"]
        own = out / "xnnpack-ort.toml"
        own.write_text((HERE.parent / "targets" / "xnnpack.toml").read_text()
                       .replace('name = "xnnpack"', 'name = "xnnpack-ort"').replace('format = "onnx"', 'format = "ort"'))
        build(full, out / "masks_model2vec.safetensors", m2v, out / "bundle_xnnpack_ort", str(own))
        onnx_size, ort_size = folder_bytes(shared / "xnnpack"), folder_bytes(out / "bundle_xnnpack_ort" / "xnnpack-ort")
        print(f"\nxnnpack folder, K = 4 + dense + model2vec router: ONNX + shared weights.bin {onnx_size / 1e6:.1f} MB "
              f"({onnx_size / one_model:.2f}x one model's files, {one_model / 1e6:.1f} MB); self-contained .ort files "
              f"{ort_size / 1e6:.1f} MB ({ort_size / one_model:.2f}x)")
    print(f"\n{cpu_flags()}")


if __name__ == "__main__":
    main()
