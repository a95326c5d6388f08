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
    s, r = m["student"], m["router"]
    tool = m["tool"]
    lines = [
        f"bundle   {bundle.root}  ({m['schema']}; edgecompile {tool['edgecompile']}, onnx {tool['onnx']}, "
        f"onnxruntime {tool['onnxruntime']}, exported at opset {m['export_opset']}; each target's own opset below)",
        f"student  {s['name']}: {s['architecture']} ({s['family']}), {s['layers']} layers x {s['heads']} heads"
        f"{' (%d KV heads)' % s['kv_heads'] if 'kv_heads' in s else ''}, "
        f"hidden {s['hidden_size']}, FFN {s['intermediate_size']}; outputs {', '.join(s['outputs'])}"
        + "".join(f"; layer {layer} lacks heads {','.join(map(str, heads))} (pruned_heads)" for layer, heads in s.get("pruned_heads", {}).items()),
        f"router   {r['name']}: {r['pooling']} pooling{', normalized' if r['normalize'] else ''}"
        f"{', projection ' + 'x'.join(map(str, r['projection'])) if r['projection'] else ''}; "
        f"{r['metric']} distance to {r['clusters']} centroids; ties -> {r['tie_break']}"
        + (f"\n         encoder: {r['encoder']}, width {r['embedding_dim']}; masks "
           + ("name this router" if r.get("masks_name_this_router") else "name no router (centroids not checked)")
           if "encoder" in r else ""),
        f"masks    {m['masks']['name']} ({m['masks']['kind']}); parity samples: {m['samples']['count']}",
    ]
    for name, t in m["targets"].items():
        shapes = "dynamic shapes" if t["dynamic_shapes"] else f"fixed batch {t['batch']} x sequence {t['sequence']}"
        lines.append(f"target   {name}: {t['provider']}, {t['precision']}, {shapes}, {t['format']}; parity on {t['parity_executed_on']}")
        lines.append(f"           {target_bytes(m, name) / 1e6:.1f} MB in {name}/; {runtime_line(t)}")
        for graph, p in t.get("placement", {}).items():
            off = ", ".join(f"{u['op_type']} x{len(u['nodes'])}" for u in p["unsupported"]) or "none"
            kind = "executed" if p["method"].startswith("onnxruntime session") else "ESTIMATED"
            lines.append(f"           {graph:<11} {p['nodes_by_ep'].get(p['ep'], 0):>4}/{p['total_nodes']:<4} nodes on EP, "
                         f"{p['partitions']} partition(s) [{kind}]; not on EP: {off}")
    lines.append(f"parity   {'PASSED' if m['parity']['passed'] else 'FAILED'} (details: {m['parity']['report']})")
    try:
        parity = json.loads((bundle.root / m["parity"]["data"]).read_text())
        for name, t in parity["targets"].items():
            lowbit = set(m["targets"][name].get("lowbit_graphs", []))

            def is_lowbit(row: dict) -> bool:  # the rows gated by the lowbit_* tolerances
                return "integer" not in row["output"] and (row["graph"] in lowbit or (row["graph"] == "end-to-end" and bool(lowbit)))

            tol = t["tolerances"]
            parts = []
            for label, rows, limit in (("exact", [r for r in t["rows"] if not is_lowbit(r)], tol["max_relative_error"]),
                                       ("low-bit end to end", [r for r in t["rows"] if is_lowbit(r)], tol["lowbit_max_relative_error"])):
                rel = [r["max_relative_error"] for r in rows if r["max_relative_error"] is not None]
                if rel:
                    parts.append(f"{label}: worst max rel error {max(rel):.3g} (tolerance {limit:g})")
            agree = [row["agreement"] for row in t["rows"] if row["output"] == "cluster_id"]
            lines.append(f"         {name}: {'; '.join(parts)}; router agreement {min(agree) if agree else 1:.3f}")
    except (OSError, ValueError, KeyError):
        lines.append("         (parity.json unreadable)")

    d = m["dense"]
    decoder = s.get("task") == "causal-lm"
    macs_key = "linear" if decoder else "total"  # decoders: weight MACs per decoded token, lm_head included
    targets = list(m["targets"])
    layers = s["layers"]
    columns = ["graph", "attention", "ffn", "heads", "neurons", "params", "MMACs/tok", "vs dense"] + [f"MB {t}" for t in targets]
    rows = [[
        "dense", f"{layers}/{layers}", f"{layers}/{layers}", str(d["kept"]["heads_kept"] if "kept" in d else layers * s["heads"]),
        str(layers * s["intermediate_size"]),
        _millions(d["parameters"]), f"{d['macs_per_token'][macs_key] / 1e6:.2f}", "1.00",
    ] + [f"{d['bytes'][t] / 1e6:.1f}" for t in targets]]
    if "macs_per_token" in r:  # bundles from before routers recorded their cost have no router row
        rows.insert(0, [
            "router", "", "", "", "", _millions(r["parameters"]), f"{r['macs_per_token']['total'] / 1e6:.2f}",
            f"{r['macs_per_token']['total'] / d['macs_per_token']['total']:.2f}" if d["macs_per_token"]["total"] else "—",
        ] + [f"{r['bytes'][t] / 1e6:.1f}" for t in targets])
    for c in m["clusters"]:
        k = c["kept"]
        rows.append([
            f"cluster {c['id']}", f"{k['attention_blocks_kept']}/{layers}", f"{k['ffn_blocks_kept']}/{layers}",
            str(k["heads_kept"]), str(k["neurons_kept"]), _millions(c["parameters"]),
            f"{c['macs_per_token'][macs_key] / 1e6:.2f}", f"{c['macs_ratio_vs_dense']:.2f}",
        ] + [f"{c['bytes'][t] / 1e6:.1f}" for t in targets])
    widths = [max(len(row[i]) for row in rows + [columns]) for i in range(len(columns))]
    lines.append("")
    for row in [columns] + rows:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    lines.append("")
    if decoder:
        lines.append("MMACs/tok = weight MACs per decoded token (projections and lm_head); MB = the graph's .onnx plus the "
                     "tensors it reads (what it weighs shipped alone; all graphs share the decoder folder's weights.bin).")
    else:
        lines.append(f"MACs per token at sequence {d['macs_per_token']['sequence']}; MB = the graph's .onnx plus the tensors it reads (what it weighs shipped alone).")
    for c in m["clusters"]:
        k = c["kept"]
        removed_attention = [layer["layer"] for layer in k["layers"] if not layer["attention"]]
        removed_ffn = [layer["layer"] for layer in k["layers"] if not layer["ffn"]]
        soft = [layer["layer"] for layer in k["layers"] if any(x in layer for x in ("attention_scale", "ffn_scale", "soft_heads", "soft_neurons"))]
        if decoder:
            kv = " ".join(f"{e['layer']}:{e['shape'][1]}" for e in c["kv_cache"]) or "none"
            zeroed = sum(len(layer["heads_zeroed"]) for layer in k["layers"])
            lines.append(f"cluster {c['id']}: attention removed in layers {_layers(removed_attention)}; FFN removed in layers "
                         f"{_layers(removed_ffn)}; KV cache (layer:heads) {kv}; {zeroed} query heads computed with gate 0 "
                         "(their KV group stays)")
            continue
        lines.append(
            f"cluster {c['id']}: attention removed in layers {_layers(removed_attention)}; FFN removed in layers "
            f"{_layers(removed_ffn)}; no matmuls left in layers {_layers(k['layers_without_compute'])}; soft gates folded in layers {_layers(soft)}"
        )
    return "\n".join(lines)
