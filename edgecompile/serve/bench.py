"""Latency of a bundle's graphs beside its dense export, and of routed inference, in one run.

Two parts, both timed round-robin so slow drifts of a noisy machine hit every graph alike:

* graphs: every graph on the same random token ids (batch x sequence), p50 / p90 and ratios against
  the dense export;
* routed: what an app pays per input: the router, then the cluster it picked, on real texts (the
  build's samples or --samples) at their own lengths (fixed-shape targets: padded to the target's
  shape), against the dense export on the same inputs. Per input the median over runs is taken;
  p50 / p90 are over inputs. The router's share is its time over the routed time (means).
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompile.bundle.store import MANIFEST, Bundle
from edgecompile.errors import BundleError, input_error
from edgecompile.lowering.targets import Target, target_from_dict
from edgecompile.runtime.sessions import bundle_session
from edgecompile.serve.bench_settings import BenchSettings

DEFAULT_BATCH, DEFAULT_SEQUENCE = 1, 128


@dataclass
class BenchRow:
    graph: str
    p50_ms: float
    p90_ms: float
    ratio_vs_dense: float | None
    macs_ratio: float | None
    macs_per_token: int | None = None


@dataclass
class RoutedBench:
    inputs: int
    source: str
    tokens_median: float  # student tokens per input (before any padding)
    padded_to: int | None  # fixed-shape targets pad every input to their sequence
    router_p50_ms: float
    router_p90_ms: float
    routed_p50_ms: float
    routed_p90_ms: float
    dense_p50_ms: float
    dense_p90_ms: float
    routed_vs_dense: float  # routed p50 / dense p50
    router_vs_dense: float  # router p50 / dense p50
    router_share: float  # mean router time / mean routed time
    clusters_chosen: dict[str, int]
    routed_macs_ratio: float | None  # mean over inputs of (router + chosen cluster) / dense MACs per token


@dataclass
class BenchReport:
    metadata: dict[str, Any]
    graphs: list[BenchRow]
    routed: RoutedBench | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"metadata": self.metadata, "graphs": [asdict(r) for r in self.graphs],
                "routed": asdict(self.routed) if self.routed else None}


def _random_feed(session, batch: int, sequence: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, max(vocab, 6), size=(batch, sequence), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 2, 3
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {i.name: data[i.name] for i in session.get_inputs()}


def resolve_shape(target: Target, batch: int | None, sequence: int | None) -> tuple[int, int]:
    """Dynamic targets: the given shape or 1 x 128. Fixed-shape targets: their own; a different one is an error."""
    if target.dynamic_shapes:
        return batch or DEFAULT_BATCH, sequence or DEFAULT_SEQUENCE
    for option, given, fixed in (("--batch", batch, target.batch), ("--sequence", sequence, target.sequence)):
        if given is not None and given != fixed:
            raise input_error(option, f"{option[2:]} on target '{target.name}'", f"{fixed} (its graphs have fixed shapes)", given)
    return target.batch, target.sequence


def _macs(bundle: Bundle) -> dict[str, int]:
    """MACs per token by graph, from the manifest (load_bundle checked that the sections are tables)."""
    m = bundle.manifest
    sections = {c.get("graph"): (f"clusters[{i}]", c) for i, c in enumerate(m["clusters"])}
    sections["dense"] = ("dense", m["dense"])
    if "macs_per_token" in m["router"]:  # bundles from before routers recorded their cost have none
        sections["router"] = ("router", m["router"])
    macs = {}
    for graph, (where, section) in sections.items():
        total = section["macs_per_token"].get("total") if isinstance(section["macs_per_token"], dict) else None
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise BundleError(f"{bundle.root / MANIFEST}: {where}.macs_per_token.total: expected a number of MACs, "
                              f"found {total!r}"[:300])
        macs[graph] = total
    graphs = {f"cluster_{c['id']}" for c in m["clusters"] if isinstance(c.get("id"), int)}
    if set(macs) - {"dense", "router"} != graphs:
        raise BundleError(f"{bundle.root / MANIFEST}: clusters: expected graph names cluster_<id> for ids "
                          f"{sorted(int(g[8:]) for g in graphs)}, found {sorted(g for g in macs if g not in ('dense', 'router'))}"[:300])
    return macs


def bench_bundle(bundle: Bundle, target_name: str | None = None, settings: BenchSettings = BenchSettings()) -> BenchReport:
    """Every graph on random ids round-robin beside dense, then routed inference on real texts (`settings.samples`)."""
    import onnxruntime

    threads, runs, warmup = settings.threads, settings.runs, settings.warmup
    batch, sequence = settings.batch, settings.sequence
    entry = bundle.target(target_name)
    target = target_from_dict(entry["target"])
    limit = min(bundle.manifest["student"]["max_seq_length"], bundle.manifest["router"]["max_seq_length"])
    if target.dynamic_shapes and sequence is None:
        sequence = min(DEFAULT_SEQUENCE, limit)
    batch, sequence = resolve_shape(target, batch, sequence)
    if target.dynamic_shapes and sequence > limit:
        raise input_error("--sequence", "sequence length", f"at most {limit} (the models' max_seq_length)", sequence)
    names = list(settings.graphs or entry["graphs"])
    sessions, feeds = {}, {}
    for name in names:
        session = bundle_session(bundle, entry, name, target, threads)
        vocab = bundle.manifest["router" if name == "router" else "student"]["vocab_size"]
        sessions[name], feeds[name] = session, _random_feed(session, batch, sequence, vocab, settings.seed)
    for _ in range(warmup):
        for name in names:
            sessions[name].run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(runs):
        for name in names:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    macs = _macs(bundle)
    dense_macs = macs["dense"]
    dense_p50 = float(np.median(times["dense"])) if "dense" in times else None
    rows = []
    for name in names:
        p50, p90 = float(np.median(times[name])), float(np.percentile(times[name], 90))
        ratio = p50 / dense_p50 if dense_p50 else None
        macs_ratio = macs[name] / dense_macs if name in macs and dense_macs else None
        rows.append(BenchRow(name, p50 * 1e3, p90 * 1e3, ratio, macs_ratio, macs.get(name)))
    metadata = {
        "bundle": str(bundle.root), "target": entry["target"]["name"], "target_provider": target.provider,
        "executed_on": target.parity_provider, "onnxruntime": onnxruntime.__version__, "threads": threads,
        "runs": runs, "warmup": warmup, "graphs_shape": {"batch": batch, "sequence": sequence, "tokens": "random ids"},
        "machine": platform.machine(), "processor": _cpu_name(),
    }
    report = BenchReport(metadata, rows)
    if settings.routed and {"router", "dense"} <= set(names):
        report.routed = _bench_routed(bundle, entry, target, sessions, runs, warmup, settings.samples, macs, threads)
        metadata["routed_shape"] = {"batch": 1, "sequence": report.routed.padded_to or "each input's own length"}
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _bench_routed(bundle: Bundle, entry: dict, target: Target, sessions: dict, runs: int, warmup: int,
                  samples: Path | None, macs: dict[str, int], threads: int) -> RoutedBench:
    from edgecompile.check.parity import check_fits
    from edgecompile.inputs.router import encode_role
    from edgecompile.inputs.samples import load_samples
    from edgecompile.inputs.tokens import pad_batch

    if samples is not None:
        loaded = load_samples(samples)
        texts, source = list(loaded.texts), str(samples)
    else:
        from edgecompile.check.verify import read_samples

        texts = read_samples(bundle)
        source = f"the build's {len(texts)} samples"
    length = None if target.dynamic_shapes else target.sequence
    router_samples = encode_role(bundle, "router", texts)
    student_samples = encode_role(bundle, "student", texts)
    check_fits(router_samples, target, source, which="router")
    check_fits(student_samples, target, source, which="student")

    def feed(session, encoded) -> dict[str, np.ndarray]:
        batch = pad_batch([encoded], length)
        return {i.name: batch[i.name] for i in session.get_inputs()}

    router = sessions["router"]
    router_feeds = [feed(router, s) for s in router_samples]
    picked = [int(router.run(["cluster_id"], f)[0].reshape(-1)[0]) for f in router_feeds]
    for k in set(picked):
        if f"cluster_{k}" not in sessions:
            sessions[f"cluster_{k}"] = bundle_session(bundle, entry, f"cluster_{k}", target, threads)
    dense = sessions["dense"]
    student_feeds = [feed(dense, s) for s in student_samples]
    n = len(texts)
    router_t, routed_t, dense_t = ([[] for _ in range(n)] for _ in range(3))
    for round_ in range(warmup + runs):
        for i in range(n):
            start = time.perf_counter()
            cluster_id = router.run(["cluster_id"], router_feeds[i])[0]
            routed_at = time.perf_counter()
            sessions[f"cluster_{int(cluster_id.reshape(-1)[0])}"].run(None, student_feeds[i])
            done = time.perf_counter()
            dense.run(None, student_feeds[i])
            end = time.perf_counter()
            if round_ >= warmup:
                router_t[i].append(routed_at - start)
                routed_t[i].append(done - start)
                dense_t[i].append(end - done)
    router_ms, routed_ms, dense_ms = (np.array([np.median(x) for x in t]) * 1e3 for t in (router_t, routed_t, dense_t))
    chosen: dict[str, int] = {}
    for k in picked:
        chosen[f"cluster_{k}"] = chosen.get(f"cluster_{k}", 0) + 1
    macs_ratio = None
    if "router" in macs and macs["dense"]:
        macs_ratio = float(np.mean([(macs["router"] + macs[f"cluster_{k}"]) / macs["dense"] for k in picked]))

    def p(values: np.ndarray, q: int) -> float:
        return float(np.percentile(values, q))

    return RoutedBench(
        n, source, float(np.median([s.length for s in student_samples])), length,
        p(router_ms, 50), p(router_ms, 90), p(routed_ms, 50), p(routed_ms, 90), p(dense_ms, 50), p(dense_ms, 90),
        p(routed_ms, 50) / p(dense_ms, 50), p(router_ms, 50) / p(dense_ms, 50),
        float(router_ms.mean() / routed_ms.mean()), dict(sorted(chosen.items())), macs_ratio,
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def bench_table(report: BenchReport) -> str:
    m = report.metadata
    shape = m["graphs_shape"]
    where = m["executed_on"] + ("" if m["executed_on"] == m["target_provider"] else f" ({m['target_provider']} cannot run here)")
    lines = [
        f"target {m['target']}: {where}, onnxruntime {m['onnxruntime']}, {m['threads']} thread(s), {m['runs']} runs; "
        f"CPU {m['processor']}",
        "",
        f"graphs: batch {shape['batch']} x sequence {shape['sequence']} (random token ids); ratio = p50 / dense p50",
        "| graph | p50 ms | p90 ms | latency ratio | MMACs/token | MACs ratio | latency / MACs ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.graphs:
        # a graph doing under 1% of dense's MACs (a static-embedding router) is bound by gathers and call
        # overhead, not MACs: its latency / MACs ratio would be a meaningless 10^4
        rel = f"{r.ratio_vs_dense / r.macs_ratio:.3f}" if r.ratio_vs_dense and r.macs_ratio and r.macs_ratio >= 0.01 else "—"
        mmacs = "—" if r.macs_per_token is None else f"{r.macs_per_token / 1e6:.3f}"
        lines.append(f"| {r.graph} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | {_fmt(r.ratio_vs_dense)} | {mmacs} | "
                     f"{_fmt(r.macs_ratio)} | {rel} |")
    routed = report.routed
    if routed:
        shape = f"padded to 1 x {routed.padded_to}" if routed.padded_to else "batch 1 at their own lengths"
        chosen = ", ".join(f"{k} x{v}" for k, v in routed.clusters_chosen.items())
        lines += [
            "",
            f"routed: {routed.inputs} inputs ({routed.source}), {shape} (median {routed.tokens_median:g} student tokens); "
            f"router + the cluster it picks, per input, vs dense on the same inputs",
            "| path | p50 ms | p90 ms | vs dense p50 |",
            "|---|---:|---:|---:|",
            f"| router | {routed.router_p50_ms:.3f} | {routed.router_p90_ms:.3f} | {routed.router_vs_dense:.3f} |",
            f"| routed (router + cluster) | {routed.routed_p50_ms:.3f} | {routed.routed_p90_ms:.3f} | {routed.routed_vs_dense:.3f} |",
            f"| dense | {routed.dense_p50_ms:.3f} | {routed.dense_p90_ms:.3f} | 1.000 |",
            f"router share of routed time {routed.router_share:.1%}; clusters picked: {chosen}"
            + (f"; routed MACs / dense MACs {routed.routed_macs_ratio:.3f}" if routed.routed_macs_ratio is not None else ""),
        ]
    return "\n".join(lines)


def write_plot(report: BenchReport, path: Path) -> Path:
    """Latency p50 (p90 whiskers) and MACs per token per graph, routed vs dense, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.graph for r in report.graphs]
    p50 = [r.p50_ms for r in report.graphs]
    p90 = [r.p90_ms - r.p50_ms for r in report.graphs]
    macs = [(r.macs_per_token or 0) / 1e6 for r in report.graphs]
    colors = ["tab:orange" if g == "router" else "tab:gray" if g == "dense" else "tab:blue" for g in labels]
    panels = 3 if report.routed else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    m = report.metadata
    axes[0].bar(labels, p50, yerr=[[0] * len(p90), p90], color=colors, capsize=3)
    axes[0].set_ylabel("ms (p50, whisker p90)")
    axes[0].set_title(f"latency, {m['graphs_shape']['batch']} x {m['graphs_shape']['sequence']} random ids")
    if report.routed and report.routed.routed_macs_ratio is not None:
        dense_macs = next((r.macs_per_token for r in report.graphs if r.graph == "dense"), 0) or 0
        labels, colors = labels + ["routed (mean)"], colors + ["tab:green"]
        macs = macs + [report.routed.routed_macs_ratio * dense_macs / 1e6]
    axes[1].bar(labels, macs, color=colors)
    axes[1].set_ylabel("MMACs per token")
    axes[1].set_title("compute per graph")
    if report.routed:
        r = report.routed
        axes[2].bar(["router", "routed", "dense"], [r.router_p50_ms, r.routed_p50_ms, r.dense_p50_ms],
                    yerr=[[0, 0, 0], [r.router_p90_ms - r.router_p50_ms, r.routed_p90_ms - r.routed_p50_ms,
                                      r.dense_p90_ms - r.dense_p50_ms]],
                    color=["tab:orange", "tab:green", "tab:gray"], capsize=3)
        axes[2].set_ylabel("ms per input (p50 over inputs, whisker p90)")
        axes[2].set_title(f"routed vs dense, {r.inputs} texts: {r.routed_vs_dense:.2f}x")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{Path(m['bundle']).name}: target {m['target']} on {m['executed_on']}, {m['threads']} thread(s), "
                 f"onnxruntime {m['onnxruntime']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
