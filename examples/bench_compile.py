"""Benchmark for `edgecompile build` on the real all-MiniLM-L6-v2 (issue: the spine).

Measures, in one run on this machine:
1. compile time (wall, including export, rewrites, writing and parity) for K = 1, 2, 4, 8 clusters,
   beside the time of one full export, so growth with K can be compared with K full exports;
2. latency of every cluster of the K = 8 bundle vs the dense export (batch 1, sequence 128,
   1 thread, round-robin, medians), against the ideal MACs ratio.

    .venv/bin/python examples/bench_compile.py [--out examples/out/bench] [--runs 60]

Writes bench.md, bench.json and (with matplotlib) bench.png into --out.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, OUT, cpu_flags, minilm


def time_export(model: Path, repeats: int = 3) -> float:
    """Median wall time of one dense export (what every extra full export would cost)."""
    from edgecompile.families.bert import export_student
    from edgecompile.families import load_student
    from edgecompile.families.bert_model import load_student_module

    student = load_student_module(load_student(model))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        export_student(student)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT / "bench")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--clusters", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = minilm()
    python = sys.executable
    edgecompile = [python, "-m", "edgecompile"]

    builds, steps = {}, {}
    for k in args.clusters:
        masks = args.out / f"masks_k{k}.safetensors"
        subprocess.run([python, str(HERE / "make_example_masks.py"), "--encoder", str(model), "--clusters", str(k), "--out", str(masks)],
                       check=True, stdout=subprocess.DEVNULL)
        bundle = args.out / f"bundle_k{k}"
        start = time.perf_counter()
        run = subprocess.run(edgecompile + ["build", str(model), "--masks", str(masks), "--router-encoder", str(model),
                                            "--out", str(bundle), "--force"], check=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        builds[k] = time.perf_counter() - start
        steps[k] = {name.split(" (")[0]: float(t) for name, t in re.findall(r"==> (.+)\n(?:    .*\n)*?    done in ([0-9.]+) s", run.stderr)}
        rewrite = next((t for name, t in steps[k].items() if name.startswith("rewriting")), float("nan"))
        print(f"K={k}: build {builds[k]:.1f} s wall (new process: imports, load, export, rewrites, write, parity); "
              f"rewriting {rewrite:.2f} s", flush=True)
    export_s = time_export(model)
    print(f"one dense export: {export_s:.2f} s", flush=True)

    from edgecompile.serve.bench import bench_bundle, bench_table
    from edgecompile.serve.bench_settings import BenchSettings
    from edgecompile.bundle.store import load_bundle

    k_max = max(args.clusters)
    bundle = load_bundle(args.out / f"bundle_k{k_max}")
    report = bench_bundle(bundle, settings=BenchSettings(runs=args.runs, warmup=5, threads=1, batch=1, sequence=128))
    rows, table = report.graphs, bench_table(report)
    print(table)
    print(cpu_flags())

    ks = sorted(builds)
    per_cluster = (builds[ks[-1]] - builds[ks[0]]) / (ks[-1] - ks[0]) if len(ks) > 1 else None
    lines = [
        "# edgecompile build benchmark (all-MiniLM-L6-v2)",
        "",
        "| K | build wall s | of which rewriting clusters s | one export per cluster instead would add s |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {k} | {builds[k]:.1f} | {next((t for n, t in steps[k].items() if n.startswith('rewriting')), float('nan')):.2f} | "
              f"{(k - 1) * export_s:.1f} |" for k in ks]
    lines += [
        "",
        f"One dense export: {export_s:.2f} s. Marginal cost per extra cluster (K={ks[0]}..{ks[-1]}): "
        + (f"{per_cluster:.2f} s" if per_cluster is not None else "n/a") + " (rewrite + save + parity).",
        "",
        f"Latency of the K={k_max} bundle's graphs:",
        "",
        table,
        "",
        "latency / MACs ratio = (cluster p50 / dense p50) / (cluster MACs / dense MACs); 1.0 is ideal scaling.",
        "",
        f"{cpu_flags()}.",
    ]
    (args.out / "bench.md").write_text("\n".join(lines) + "\n")
    data = {"builds_s": builds, "steps_s": steps, "export_s": export_s, "per_cluster_s": per_cluster,
            "latency": [r.__dict__ for r in rows]}
    (args.out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(ks, [builds[k] for k in ks], "o-", label="edgecompile build (one export)")
        left.plot(ks, [builds[k] + (k - 1) * export_s for k in ks], "s--", label="same, but one full export per cluster")
        left.set_xlabel("clusters K"), left.set_ylabel("wall seconds"), left.legend(), left.set_title("compile time")
        clusters = [r for r in rows if r.ratio_vs_dense is not None]
        right.scatter([r.macs_ratio for r in clusters], [r.ratio_vs_dense for r in clusters])
        for r in clusters:
            right.annotate(r.graph.replace("cluster_", "c"), (r.macs_ratio, r.ratio_vs_dense))
        right.plot([0, 1], [0, 1], "k:", label="ideal (latency = MACs)")
        right.set_xlabel("MACs ratio vs dense"), right.set_ylabel("p50 latency ratio vs dense"), right.legend()
        right.set_title("batch 1, seq 128, 1 thread")
        fig.tight_layout()
        fig.savefig(args.out / "bench.png", dpi=110)
    except ImportError:
        pass
    print(f"wrote {args.out / 'bench.md'}")


if __name__ == "__main__":
    main()
