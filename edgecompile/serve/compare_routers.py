"""`edgecompile compare-routers`: the routers of several bundles on the same texts: cost and agreement.

Each bundle's router graph runs on every text (tokenized as that bundle's router expects), timed
round-robin; the report gives per router its encoder, MACs per token, file size and p50 / p90 per
input (and its share of the first bundle's dense latency on the same texts), then, for each router
against the first, the share of texts sent to the same cluster id and the confusion counts. Cluster ids
correspond only when the centroids were fitted from one clustering (examples/fit_router_centroids.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompile.bundle.store import MANIFEST, Bundle
from edgecompile.errors import BundleError
from edgecompile.lowering.targets import target_from_dict
from edgecompile.runtime.sessions import bundle_session


@dataclass
class RouterCost:
    bundle: str
    encoder: str
    clusters: int
    macs_per_token: int | None
    bytes: int
    p50_ms: float
    p90_ms: float
    share_of_dense: float | None  # router p50 / the first bundle's dense p50 on the same texts


@dataclass
class Agreement:
    bundle: str
    versus: str
    agreement: float  # share of texts routed to the same cluster id
    confusion: list[list[int]]  # rows: the first bundle's cluster, columns: this bundle's


@dataclass
class RouterComparison:
    texts: int
    source: str
    target: str
    threads: int
    routers: list[RouterCost]
    agreements: list[Agreement]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _texts(bundle: Bundle, samples: Path | None) -> tuple[list[str], str]:
    if samples is not None:
        from edgecompile.inputs.samples import load_samples

        return list(load_samples(samples).texts), str(samples)
    from edgecompile.check.verify import read_samples

    texts = read_samples(bundle)
    return texts, f"{bundle.root.name}'s {len(texts)} build samples"


def _router_description(bundle: Bundle, target: str, file_bytes: int) -> tuple[str, int, int | None, int]:
    """Encoder name, cluster count, MACs per token and bytes of a bundle's router, as its manifest describes it."""
    router, where = bundle.manifest["router"], f"{bundle.root / MANIFEST}: router"
    name, clusters = router.get("encoder", router.get("name")), router.get("clusters")
    macs, sizes = router.get("macs_per_token", {}), router.get("bytes", {})
    if not isinstance(name, str):
        raise BundleError(f"{where}.name: expected a string, found {name!r}"[:300])
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
        raise BundleError(f"{where}.clusters: expected a positive integer, found {clusters!r}"[:300])
    if not isinstance(macs, dict) or not isinstance(sizes, dict):
        raise BundleError(f"{where}.macs_per_token, bytes: expected tables, found {macs!r}, {sizes!r}"[:300])
    size, total = sizes.get(target, file_bytes), macs.get("total")
    if isinstance(size, bool) or not isinstance(size, int):
        raise BundleError(f"{where}.bytes.{target}: expected a number of bytes, found {size!r}"[:300])
    if total is not None and (isinstance(total, bool) or not isinstance(total, int)):
        raise BundleError(f"{where}.macs_per_token.total: expected a number of MACs, found {total!r}"[:300])
    return name, clusters, total, size


def compare_routers(bundles: list[Bundle], samples: Path | None = None, target_name: str | None = None,
                    threads: int = 1, runs: int = 20, warmup: int = 2) -> RouterComparison:
    from edgecompile.check.parity import check_fits
    from edgecompile.inputs.router import encode_role
    from edgecompile.inputs.tokens import pad_batch

    texts, source = _texts(bundles[0], samples)
    sessions, feeds, entries = [], [], []
    for bundle in bundles:
        entry = bundle.target(target_name or next(iter(bundles[0].manifest["targets"])))
        target = target_from_dict(entry["target"])
        length = None if target.dynamic_shapes else target.sequence
        encoded = encode_role(bundle, "router", texts)
        check_fits(encoded, target, source, which=f"{bundle.root.name} router")
        session = bundle_session(bundle, entry, "router", target, threads)
        names = [i.name for i in session.get_inputs()]
        sessions.append(session)
        feeds.append([{n: pad_batch([e], length)[n] for n in names} for e in encoded])
        entries.append(entry)
    first = bundles[0]
    dense_entry = entries[0]
    dense_target = target_from_dict(dense_entry["target"])
    dense = bundle_session(first, dense_entry, "dense", dense_target, threads)
    dense_names = [i.name for i in dense.get_inputs()]
    dense_length = None if dense_target.dynamic_shapes else dense_target.sequence
    student = encode_role(first, "student", texts)
    dense_feeds = [{n: pad_batch([e], dense_length)[n] for n in dense_names} for e in student]

    times = [[[] for _ in texts] for _ in bundles]
    dense_times: list[list[float]] = [[] for _ in texts]
    picked = [[0] * len(texts) for _ in bundles]
    for round_ in range(warmup + runs):
        for i in range(len(texts)):
            for b, session in enumerate(sessions):
                start = time.perf_counter()
                cluster = session.run(["cluster_id"], feeds[b][i])[0]
                elapsed = time.perf_counter() - start
                picked[b][i] = int(cluster.reshape(-1)[0])
                if round_ >= warmup:
                    times[b][i].append(elapsed)
            start = time.perf_counter()
            dense.run(None, dense_feeds[i])
            if round_ >= warmup:
                dense_times[i].append(time.perf_counter() - start)
    dense_p50 = float(np.percentile([np.median(t) for t in dense_times], 50)) * 1e3
    routers = []
    for b, bundle in enumerate(bundles):
        per_input = np.array([np.median(t) for t in times[b]]) * 1e3
        file_bytes = bundle.manifest["files"][entries[b]["graphs"]["router"]["file"]].get("bytes", 0)  # older bundles
        name, clusters, macs, size = _router_description(bundle, entries[b]["target"]["name"], file_bytes)
        if max(picked[b]) >= clusters:
            raise BundleError(f"{bundle.root / MANIFEST}: router.clusters: expected more than the cluster ids its router "
                              f"graph picks ({max(picked[b])}), found {clusters}")
        routers.append(RouterCost(
            str(bundle.root), name, clusters, macs, size,
            float(np.percentile(per_input, 50)), float(np.percentile(per_input, 90)),
            float(np.percentile(per_input, 50)) / dense_p50 if dense_p50 else None,
        ))
    agreements = []
    reference = np.array(picked[0])
    for b in range(1, len(bundles)):
        ours = np.array(picked[b])
        k_ref, k_ours = routers[0].clusters, routers[b].clusters
        confusion = np.zeros((k_ref, k_ours), np.int64)
        np.add.at(confusion, (reference, ours), 1)
        agreements.append(Agreement(str(bundles[b].root), str(first.root), float(np.mean(reference == ours)),
                                    confusion.tolist()))
    return RouterComparison(len(texts), source, entries[0]["target"]["name"], threads, routers, agreements)


def comparison_table(result: RouterComparison) -> str:
    lines = [
        f"{result.texts} texts ({result.source}), target {result.target}, {result.threads} thread(s); "
        "p50 / p90 over texts of each router's median time; share = router p50 / the first bundle's dense p50",
        "| bundle | router encoder | K | MMACs/token | MB | p50 ms | p90 ms | share of dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.routers:
        macs = "—" if r.macs_per_token is None else f"{r.macs_per_token / 1e6:.2f}"
        share = "—" if r.share_of_dense is None else f"{r.share_of_dense:.1%}"
        lines.append(f"| {Path(r.bundle).name} | {r.encoder} | {r.clusters} | {macs} | {r.bytes / 1e6:.1f} | "
                     f"{r.p50_ms:.3f} | {r.p90_ms:.3f} | {share} |")
    for a in result.agreements:
        lines += ["", f"{Path(a.bundle).name} vs {Path(a.versus).name}: same cluster for {a.agreement:.1%} of the texts "
                      f"(rows: {Path(a.versus).name}'s cluster, columns: {Path(a.bundle).name}'s)"]
        lines.append("| | " + " | ".join(str(k) for k in range(len(a.confusion[0]))) + " |")
        lines.append("|---|" + "---:|" * len(a.confusion[0]))
        lines += [f"| {k} | " + " | ".join(str(v) for v in row) + " |" for k, row in enumerate(a.confusion)]
    return "\n".join(lines)

