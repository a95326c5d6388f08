"""Latency of a bundle's graphs beside its dense export, in one run (ratios and medians).

Graphs are timed round-robin (one run of each graph per round) so slow drifts of a noisy
machine hit every graph alike; the report gives p50 / p90 and ratios against the dense export.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgecompile.bundle.store import Bundle
from edgecompile.errors import input_error
from edgecompile.serve.runtime import create_session
from edgecompile.lowering.targets import target_from_dict


@dataclass
class BenchRow:
    graph: str
    p50_ms: float
    p90_ms: float
    ratio_vs_dense: float | None
    macs_ratio: float | None


def _random_feed(session, batch: int, sequence: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, max(vocab, 6), size=(batch, sequence), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 2, 3
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {i.name: data[i.name] for i in session.get_inputs()}


def bench_bundle(
    bundle: Bundle,
    target_name: str | None = None,
    *,
    batch: int = 1,
    sequence: int = 128,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    graphs: list[str] | None = None,
    seed: int = 0,
) -> list[BenchRow]:
    entry = bundle.target(target_name)
    target = target_from_dict(entry["target"])
    if not target.dynamic_shapes:
        batch, sequence = target.batch, target.sequence
    limit = min(bundle.manifest["student"]["max_seq_length"], bundle.manifest["router"]["max_seq_length"])
    if sequence > limit:
        raise input_error("--sequence", "sequence length", f"at most {limit} (the models' max_seq_length)", sequence)
    names = graphs or list(entry["graphs"])
    sessions, feeds = {}, {}
    for name in names:
        session = create_session(bundle.graph_file(entry, name), target, threads)
        vocab = bundle.manifest["router" if name == "router" else "student"]["vocab_size"]
        sessions[name], feeds[name] = session, _random_feed(session, batch, sequence, vocab, seed)
    for _ in range(warmup):
        for name in names:
            sessions[name].run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(runs):
        for name in names:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    macs = {c["graph"]: c["macs_ratio_vs_dense"] for c in bundle.manifest["clusters"]}
    macs["dense"] = 1.0
    dense_p50 = float(np.median(times["dense"])) if "dense" in times else None
    rows = []
    for name in names:
        p50, p90 = float(np.median(times[name])), float(np.percentile(times[name], 90))
        ratio = p50 / dense_p50 if dense_p50 and name != "router" else None
        rows.append(BenchRow(name, p50 * 1e3, p90 * 1e3, ratio, macs.get(name)))
    return rows


def bench_table(rows: list[BenchRow], batch: int, sequence: int, threads: int) -> str:
    lines = [
        f"batch {batch}, sequence {sequence}, {threads} thread(s); ratio = p50 / dense p50",
        "| graph | p50 ms | p90 ms | latency ratio | MACs ratio | latency / MACs ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r.ratio_vs_dense:.3f}" if r.ratio_vs_dense is not None else "—"
        macs = f"{r.macs_ratio:.3f}" if r.macs_ratio is not None and r.graph != "router" else "—"
        rel = f"{r.ratio_vs_dense / r.macs_ratio:.3f}" if r.ratio_vs_dense and r.macs_ratio else "—"
        lines.append(f"| {r.graph} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | {ratio} | {macs} | {rel} |")
    return "\n".join(lines)
