"""The bundle manifest: what a person or an app needs to know about every file in the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecompile.bundle.store import SCHEMA_VERSION, WEIGHTS, sha256_file


def tool_versions() -> dict[str, str]:
    import onnx
    import onnx_ir as ir
    import onnxruntime
    import torch
    import transformers

    from edgecompile import __version__

    return {
        "edgecompile": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "onnx_ir": ir.__version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
    }


def graph_files(files: dict[str, dict[str, Any]], entry: dict[str, Any], target: str, graph: str) -> dict[str, str]:
    """The files one graph needs on a target, with their sha256."""
    own = entry["graphs"][graph]["file"]
    names = [own] + ([f"{target}/{WEIGHTS}"] if own.endswith(".onnx") and f"{target}/{WEIGHTS}" in files else [])
    return {name: files[name]["sha256"] for name in names}


def build_manifest(
    inputs: Any,
    models: Any,
    compiled: Any,
    target_entries: dict[str, dict[str, Any]],
    graph_bytes: dict[str, dict[str, int]],
    files: dict[str, dict[str, Any]],
    tokenizers: dict[str, str],
    reference: dict[str, str],
) -> dict[str, Any]:
    from edgecompile.families.bert import OPSET
    from edgecompile.inputs.lowbit import describe_plan

    spec, router, masks = inputs.student, inputs.router, inputs.masks
    targets = list(target_entries)
    def lowbit(graph: str) -> dict[str, Any]:
        reports = {t: target_entries[t]["lowering"][graph]["lowbit"] for t in targets
                   if "lowbit" in target_entries[t]["lowering"].get(graph, {})}
        return {"lowbit": reports} if reports else {}

    dense = dict(compiled.dense_entry, bytes={t: graph_bytes[t]["dense"] for t in targets}, **lowbit("dense"))
    clusters = [
        dict(entry, files={t: graph_files(files, target_entries[t], t, entry["graph"]) for t in targets},
             bytes={t: graph_bytes[t][entry["graph"]] for t in targets}, **lowbit(entry["graph"]))
        for entry in compiled.cluster_entries
    ]
    return {
        "schema": SCHEMA_VERSION,
        "tool": tool_versions(),
        "export_opset": OPSET,  # each graph's own opset (after its target's steps) is under targets.*.graphs
        "student": {
            "name": spec.path.name,
            "family": spec.family,
            "architecture": spec.architecture,
            "weights_sha256": sha256_file(spec.transformer_dir / "model.safetensors"),
            "layers": spec.num_layers, "heads": spec.num_heads, "head_size": spec.head_size,
            "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "outputs": list(models.student.output_names),
            **({"pooling": spec.pooling_mode, "normalize": spec.normalize} if spec.family == "sentence-transformers" else {}),
            "max_seq_length": models.student_max_length,
            "vocab_size": int(spec.config["vocab_size"]),
            "tokenizer": tokenizers["student"],
            "precision": describe_plan(models.lowbit),
        },
        "router": {
            "name": router.path.name,
            "weights_sha256": sha256_file(router.transformer_dir / "model.safetensors"),
            "pooling": router.pooling_mode, "normalize": router.normalize,
            "projection": None if masks.projection_weight is None else list(masks.projection_weight.shape),
            "metric": masks.metric,
            "clusters": masks.num_clusters,
            "max_seq_length": models.router_max_length,
            "vocab_size": int(router.config["vocab_size"]),
            "tokenizer": tokenizers["router"],
            "tie_break": "lowest cluster id",
        },
        "masks": {"name": Path(masks.path).name, "sha256": sha256_file(masks.path), "kind": masks.kind},
        "samples": {"count": len(inputs.samples.texts), "source": Path(inputs.samples.source).name, "file": reference["samples"]},
        "dense": dense,
        "clusters": clusters,
        "targets": target_entries,
        "parity": {"passed": True, "report": "parity.md", "data": "parity.json", "reference_outputs": reference["outputs"]},
        "files": files,
    }
