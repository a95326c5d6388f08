"""`edgecompile inspect`: a readable summary of a bundle."""

from __future__ import annotations

import json

from edgecompile.bundle.store import MANIFEST, Bundle
from edgecompile.errors import BundleError, one_line


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _layers(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids) if ids else "none"


def target_bytes(manifest: dict, target: str) -> int:
    """Everything an app ships for one target: the files of its folder."""
    return sum(f.get("bytes", 0) for rel, f in manifest["files"].items() if rel.startswith(f"{target}/"))


def runtime_line(t: dict) -> str:
    if "min_onnxruntime" not in t:  # bundles written before targets declared a floor
        opsets = sorted({g.get("opset", 0) for g in t["graphs"].values()})
        return f"opset {', '.join(map(str, opsets))}; oldest onnxruntime not recorded"
    return (f"opset {t['opset']}, IR version {t['ir_version']}; needs onnxruntime >= {t['files_need_onnxruntime']} "
            f"(target declares >= {t['min_onnxruntime']})")


def bundle_summary(bundle: Bundle) -> str:
    """The summary; a manifest lacking a key it shows, or holding a value of another form, is one BundleError.

    load_bundle checked the keys every command needs; the descriptive ones only `inspect` reads are
    checked here, by reading them: this function only formats manifest data, so such an error is the data's.
    """
    try:
        return _summary(bundle)
    except KeyError as exc:
        raise BundleError(f"{bundle.root / MANIFEST}: key {exc.args[0]!r}: expected it (edgecompile writes it), "
                          "found it missing") from None
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        raise BundleError(f"{bundle.root / MANIFEST}: expected the keys and value types edgecompile writes, found a "
                          f"value `inspect` cannot show ({type(exc).__name__}: {one_line(exc)})") from None


def _summary(bundle: Bundle) -> str:
    m = bundle.manifest
    decoder = m["student"].get("task") == "causal-lm"
    lines = _header(bundle) + [line for name, t in m["targets"].items() for line in _target(m, name, t)]
    lines += _parity(bundle)
    lines += ["", *_graph_table(m, decoder), ""]
    if decoder:
        lines.append("MMACs/tok = weight MACs per decoded token (projections and lm_head); MB = the graph's .onnx plus the "
                     "tensors it reads (what it weighs shipped alone; all graphs share the decoder folder's weights.bin).")
    else:
        lines.append(f"MACs per token at sequence {m['dense']['macs_per_token']['sequence']}; MB = the graph's .onnx plus the "
                     "tensors it reads (what it weighs shipped alone).")
    lines += [_cluster_line(cluster, decoder) for cluster in m["clusters"]]
    return "\n".join(lines)


def _header(bundle: Bundle) -> list[str]:
    m = bundle.manifest
    student, router, tool = m["student"], m["router"], m["tool"]
    kv_heads = f" ({student['kv_heads']} KV heads)" if "kv_heads" in student else ""
    pruned = "".join(f"; layer {layer} lacks heads {','.join(map(str, heads))} (pruned_heads)"
                     for layer, heads in student.get("pruned_heads", {}).items())
    projection = f", projection {'x'.join(map(str, router['projection']))}" if router["projection"] else ""
    encoder = ""
    if "encoder" in router:
        named = "name this router" if router.get("masks_name_this_router") else "name no router (centroids not checked)"
        encoder = f"\n         encoder: {router['encoder']}, width {router['embedding_dim']}; masks {named}"
    return [
        f"bundle   {bundle.root}  ({m['schema']}; edgecompile {tool['edgecompile']}, onnx {tool['onnx']}, "
        f"onnxruntime {tool['onnxruntime']}, exported at opset {m['export_opset']}; each target's own opset below)",
        f"student  {student['name']}: {student['architecture']} ({student['family']}), {student['layers']} layers x "
        f"{student['heads']} heads{kv_heads}, hidden {student['hidden_size']}, FFN {student['intermediate_size']}; "
        f"outputs {', '.join(student['outputs'])}{pruned}",
        f"router   {router['name']}: {router['pooling']} pooling{', normalized' if router['normalize'] else ''}{projection}; "
        f"{router['metric']} distance to {router['clusters']} centroids; ties -> {router['tie_break']}{encoder}",
        f"masks    {m['masks']['name']} ({m['masks']['kind']}); parity samples: {m['samples']['count']}",
    ]


def _target(manifest: dict, name: str, target: dict) -> list[str]:
    shapes = "dynamic shapes" if target["dynamic_shapes"] else f"fixed batch {target['batch']} x sequence {target['sequence']}"
    weights = target["target"].get("linear_weights", {})
    tag = weights.get("format", "fp32") + ("+nbits" if weights.get("lowbit_kernel") == "nbits" else "")
    lines = [f"target   {name}: {target['provider']}, {target['precision']}, weights {tag}, {shapes}, {target['format']}; "
             f"parity on {target['parity_executed_on']}",
             f"           {target_bytes(manifest, name) / 1e6:.1f} MB in {name}/; {runtime_line(target)}"]
    if cost := target.get("quantization_cost"):
        lines.append(f"           quantizing cost (dense graph vs the fp32 model, {cost['on']}): perplexity "
                     f"{cost['perplexity_fp32']:.3f} -> {cost['perplexity_quantized']:.3f}, greedy tokens agreeing "
                     f"{cost['greedy_token_agreement']:.1%}")
    for graph, placement in target.get("placement", {}).items():
        off = ", ".join(f"{u['op_type']} x{len(u['nodes'])}" for u in placement["unsupported"]) or "none"
        kind = "executed" if placement["method"].startswith("onnxruntime session") else "ESTIMATED"
        lines.append(f"           {graph:<11} {placement['nodes_by_ep'].get(placement['ep'], 0):>4}/{placement['total_nodes']:<4} "
                     f"nodes on EP, {placement['partitions']} partition(s) [{kind}]; not on EP: {off}")
    return lines


def _parity(bundle: Bundle) -> list[str]:
    """The parity verdict, and per target its worst errors by contract (exact, low-bit, quantized weights)."""
    m = bundle.manifest
    lines = [f"parity   {'PASSED' if m['parity']['passed'] else 'FAILED'} (details: {m['parity']['report']})"]
    try:
        parity = json.loads((bundle.root / m["parity"]["data"]).read_text())
        for name, target in parity["targets"].items():
            lines.append(f"         {name}: {_worst_errors(m['targets'][name], target)}")
    except (OSError, ValueError, KeyError):
        lines.append("         (parity.json unreadable)")
    return lines


def _worst_errors(entry: dict, target: dict) -> str:
    lowbit = set(entry.get("lowbit_graphs", [])) | set(entry.get("quantized_graphs", []))
    quantized = set(entry.get("quantized_graphs", []))

    def contract(row: dict) -> str:  # which of the target's tolerances gate a row
        graph, output = row["graph"], row["output"]
        if "integer" in output or "accuracy level 0" in output:
            return "exact"
        if graph in quantized:
            return "quantized weights"
        return "low-bit end to end" if graph in lowbit or (graph == "end-to-end" and lowbit) else "exact"

    tolerances = target["tolerances"]
    limits = {"exact": tolerances["max_relative_error"], "low-bit end to end": tolerances["lowbit_max_relative_error"],
              "quantized weights": tolerances.get("quantized_max_relative_error")}
    parts = []
    for label, limit in limits.items():
        errors = [r["max_relative_error"] for r in target["rows"] if contract(r) == label and r["max_relative_error"] is not None]
        if errors:
            parts.append(f"{label}: worst max rel error {max(errors):.3g} (tolerance {limit:g})")
    agreement = [row["agreement"] for row in target["rows"] if row["output"] == "cluster_id"]
    return f"{'; '.join(parts)}; router agreement {min(agreement) if agreement else 1:.3f}"


def _graph_table(m: dict, decoder: bool) -> list[str]:
    """One row per graph (router, dense, clusters): what it keeps, its size, MACs per token and bytes per target."""
    student, router, dense = m["student"], m["router"], m["dense"]
    macs_key = "linear" if decoder else "total"  # decoders: weight MACs per decoded token, lm_head included
    targets, layers = list(m["targets"]), student["layers"]
    columns = ["graph", "attention", "ffn", "heads", "neurons", "params", "MMACs/tok", "vs dense"] + [f"MB {t}" for t in targets]
    rows = [[
        "dense", f"{layers}/{layers}", f"{layers}/{layers}",
        str(dense["kept"]["heads_kept"] if "kept" in dense else layers * student["heads"]), str(layers * student["intermediate_size"]),
        _millions(dense["parameters"]), f"{dense['macs_per_token'][macs_key] / 1e6:.2f}", "1.00",
    ] + [f"{dense['bytes'][t] / 1e6:.1f}" for t in targets]]
    if "macs_per_token" in router:  # bundles from before routers recorded their cost have no router row
        share = router["macs_per_token"]["total"] / dense["macs_per_token"]["total"] if dense["macs_per_token"]["total"] else None
        rows.insert(0, ["router", "", "", "", "", _millions(router["parameters"]), f"{router['macs_per_token']['total'] / 1e6:.2f}",
                        "—" if share is None else f"{share:.2f}"] + [f"{router['bytes'][t] / 1e6:.1f}" for t in targets])
    for cluster in m["clusters"]:
        kept = cluster["kept"]
        rows.append([
            f"cluster {cluster['id']}", f"{kept['attention_blocks_kept']}/{layers}", f"{kept['ffn_blocks_kept']}/{layers}",
            str(kept["heads_kept"]), str(kept["neurons_kept"]), _millions(cluster["parameters"]),
            f"{cluster['macs_per_token'][macs_key] / 1e6:.2f}", f"{cluster['macs_ratio_vs_dense']:.2f}",
        ] + [f"{cluster['bytes'][t] / 1e6:.1f}" for t in targets])
    widths = [max(len(row[i]) for row in rows + [columns]) for i in range(len(columns))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in [columns] + rows]


def _cluster_line(cluster: dict, decoder: bool) -> str:
    kept = cluster["kept"]
    removed_attention = _layers([layer["layer"] for layer in kept["layers"] if not layer["attention"]])
    removed_ffn = _layers([layer["layer"] for layer in kept["layers"] if not layer["ffn"]])
    head = f"cluster {cluster['id']}: attention removed in layers {removed_attention}; FFN removed in layers {removed_ffn}"
    if decoder:
        zeroed = sum(len(layer["heads_zeroed"]) for layer in kept["layers"])
        return f"{head}; KV cache {_kv_cache(cluster['kv_cache'])}; {zeroed} query heads computed with gate 0 (their KV group stays)"
    soft = [layer["layer"] for layer in kept["layers"]
            if any(x in layer for x in ("attention_scale", "ffn_scale", "soft_heads", "soft_neurons"))]
    return f"{head}; no matmuls left in layers {_layers(kept['layers_without_compute'])}; soft gates folded in layers {_layers(soft)}"


def _kv_cache(entries: list[dict]) -> str:
    """`3 KV heads in layers 0-19,21-23` rather than one entry per layer."""
    if not entries:
        return "none"
    by_heads: dict[int, list[int]] = {}
    for entry in entries:
        by_heads.setdefault(entry["shape"][1], []).append(entry["layer"])
    return "; ".join(f"{heads} KV head{'s' if heads != 1 else ''} in layers {_ranges(layers)}" for heads, layers in by_heads.items())


def _ranges(numbers: list[int]) -> str:
    spans, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(spans)
