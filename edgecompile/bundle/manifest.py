"""The bundle manifest: what a person or an app needs to know about every file in the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecompile.bundle.store import SCHEMA_VERSION, WEIGHTS
from edgecompile.inputs.files import sha256_file


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
    weights = f"{own.rsplit('/', 1)[0]}/{WEIGHTS}"  # shared weights live beside the graph
    names = [own] + ([weights] if own.endswith(".onnx") and weights in files else [])
    return {name: files[name]["sha256"] for name in names}


def _router_encoder(router: Any) -> dict[str, Any]:
    if router.kind == "static":
        return {"pooling": "mean", "normalize": router.static["normalize"], "layers": None,
                "table_dtype": router.static["dtype"]}
    return {"pooling": router.encoder.pooling_mode, "normalize": router.encoder.normalize, "layers": router.layers}


def build_manifest(inputs: Any, models: Any, compiled: Any, written: Any) -> dict[str, Any]:
    """An encoder bundle's manifest (`written`: build/publish.Written)."""
    from edgecompile.families import family_of
    from edgecompile.inputs.lowbit import describe_plan

    spec, masks = inputs.student, inputs.masks
    family = family_of(spec)
    target_entries, graph_bytes, files = written.target_entries, written.graph_bytes, written.files
    tokenizers, reference = written.tokenizers, written.reference
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
        "export_opset": family.opset,  # each graph's own opset (after its target's steps) is under targets.*.graphs
        "student": {
            "name": spec.path.name,
            "family": spec.family,
            "architecture": spec.architecture,
            "weights_sha256": sha256_file(spec.transformer_dir / "model.safetensors"),
            "layers": spec.num_layers, "heads": spec.num_heads, "head_size": spec.head_size,
            **family.manifest_fields(spec),
            "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "outputs": list(models.student.output_names),
            **({"pooling": spec.pooling_mode, "normalize": spec.normalize} if spec.family == "sentence-transformers" else {}),
            "max_seq_length": models.max_length,
            "vocab_size": int(spec.config["vocab_size"]),
            "tokenizer": tokenizers["student"],
            "precision": describe_plan(models.lowbit),
        },
        "router": router_manifest(inputs, models.router.max_length, tokenizers["router"], compiled.router_entry, graph_bytes),
        "masks": {"name": Path(masks.path).name, "sha256": sha256_file(masks.path), "kind": masks.kind},
        "samples": {"count": len(inputs.samples.texts), "source": Path(inputs.samples.source).name, "file": reference["samples"]},
        "dense": dense,
        "clusters": clusters,
        "targets": target_entries,
        "parity": {"passed": True, "report": "parity.md", "data": "parity.json", "reference_outputs": reference["outputs"]},
        "files": files,
    }


def router_manifest(inputs: Any, max_length: int, tokenizer: str, entry: dict[str, Any],
                    graph_bytes: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The router's section with its cost (MACs, parameters, bytes per target)."""
    return {
        **router_section(inputs, max_length, tokenizer),
        **{k: v for k, v in entry.items() if k not in ("graph", "layers")},
        "bytes": {t: graph_bytes[t]["router"] for t in graph_bytes},
    }


def router_section(inputs: Any, max_length: int, tokenizer: str) -> dict[str, Any]:
    router, masks = inputs.router, inputs.masks
    return {
        "name": router.path.name,
        "weights_sha256": sha256_file(router.weights_file),
        **_router_encoder(router),
        "projection": None if masks.projection_weight is None else list(masks.projection_weight.shape),
        "metric": masks.metric,
        "clusters": masks.num_clusters,
        "max_seq_length": max_length,
        "vocab_size": router.vocab_size,
        "tokenizer": tokenizer,
        "tokenization": router.tokenization.to_dict(),
        "tie_break": "lowest cluster id",
        # the masks file named the router its centroids were fitted for, and it is this one
        "masks_name_this_router": inputs.router_checked,
    }


def build_decoder_manifest(inputs: Any, models: Any, entries: list[dict[str, Any]], router: dict[str, Any], written: Any,
                           new_tokens: int, student: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a decoder bundle: as an encoder's, plus per graph its KV cache and onnxruntime-genai folder."""
    from edgecompile.inputs.lowbit import describe_plan

    masks, dims = inputs.masks, models.dims
    target_entries, graph_bytes, files = written.target_entries, written.graph_bytes, written.files
    tokenizers, reference = written.tokenizers, written.reference
    targets = list(target_entries)

    def with_files(entry: dict[str, Any]) -> dict[str, Any]:
        graph = entry["graph"]
        needed = {t: graph_files(files, target_entries[t], t, graph) for t in targets}
        return dict(entry, files=needed, bytes={t: graph_bytes[t][graph] for t in targets})

    return {
        "schema": SCHEMA_VERSION,
        "tool": tool_versions(),
        "export_opset": models.family.opset,
        "student": {
            **student,
            "tokenizer": tokenizers["student"],
            "precision": describe_plan(models.lowbit),
        },
        "router": router_manifest(inputs, models.router.max_length, tokenizers["router"], router, graph_bytes),
        "masks": {"name": Path(masks.path).name, "sha256": sha256_file(masks.path), "kind": masks.kind},
        "samples": {"count": len(inputs.samples.texts), "source": Path(inputs.samples.source).name, "file": reference["samples"],
                    "chat": inputs.samples.chat},
        "generation": {"parity_new_tokens": new_tokens, "decoding": "greedy", "stops_on": "eos_token_ids or the token budget"},
        **({"multi_token_prediction": multi_token_prediction(dims)} if dims.extra_heads else {}),
        "dense": with_files(entries[0]),
        "clusters": [with_files(entry) for entry in entries[1:]],
        "targets": target_entries,
        "parity": {"passed": True, "report": "parity.md", "data": "parity.json", "reference_outputs": reference["outputs"]},
        "files": files,
    }


def decoder_student(spec: Any, family: Any, dims: Any, eos: frozenset[int]) -> dict[str, Any]:
    """The manifest's student section of a decoder, but its tokenizer and precision: all onnxruntime-genai's
    config is made from (bundle/decoder_folders.genai_config), at build time and again by `verify`."""
    return {
        "name": spec.path.name,
        "family": spec.family,
        "architecture": spec.architecture,
        "task": "causal-lm",
        "genai_model_type": family.genai_type,
        "weights_sha256": sha256_file(spec.transformer_dir / "model.safetensors"),
        "layers": dims.layers, "heads": dims.heads, "kv_heads": dims.kv_heads, "head_size": dims.head_dim,
        "hidden_size": dims.hidden, "intermediate_size": dims.intermediate,
        "rope": dims.rope,
        "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
        "max_seq_length": dims.max_positions,
        "vocab_size": dims.vocab,
        "eos_token_ids": sorted(eos),
        "bos_token_id": spec.config.get("bos_token_id"),
        "pad_token_id": spec.config.get("pad_token_id"),
        "config_fields_ignored": list(spec.ignored_fields),
    }


def multi_token_prediction(dims: Any) -> dict[str, Any]:
    """What an app needs to run the heads: which output predicts which token, and each head layer's KV cache."""
    last = dims.layers - 1
    heads = [{"output": "logits", "predicts": "token t+1", "layer": f"model.layers.{last}", "kv_index": last}]
    heads += [{"output": f"logits_{j + 1}", "predicts": f"token t+{j + 2}", "layer": f"extra_heads.{j}", "kv_index": dims.layers + j}
              for j in range(dims.extra_heads)]
    return {
        "n_future_tokens": dims.extra_heads + 1,
        "trunk_layers": f"model.layers.0 .. model.layers.{last - 1} (run once per pass; every head reads their output)",
        "heads": heads,
        "kv_layout": "past_key_values.{kv_index}.key|value / present.{kv_index}.key|value, "
                     "[batch, kv_heads, sequence, head_dim] like the trunk's; extra heads are never pruned, head 0 "
                     "(layer L-1) is: a cluster that removes its attention has no KV at kv_index L-1, and every graph's "
                     "exact KV inputs are its own kv_cache entry",
        "speculative_decoding": "edgecompile run --speculative: feed the pending token and the extra heads' drafts in one "
                                "pass, keep the prefix head 0 confirms, cut every KV cache back to it",
    }
