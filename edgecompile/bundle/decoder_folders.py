"""A decoder target's folder: the router, and one onnxruntime-genai model folder holding every decoder graph.

    <target>/router.onnx (+ <target>/weights.bin)   the router, as for encoders
    <target>/decoder/genai_config.json              onnxruntime-genai's config; its decoder file is dense.onnx
    <target>/decoder/dense.onnx, cluster_<k>.onnx   one graph per cluster, prefill and decode in one graph
    <target>/decoder/weights.bin                    every tensor of >= 1 KiB, once, shared by all graphs
    <target>/decoder/tokenizer files                for onnxruntime_genai.Tokenizer

One folder, because onnxruntime only reads external data inside a model's own folder (and onnx and
onnx-ir refuse hard-linked data files), so separate per-cluster folders would each need a full copy
of the weights. An app picks a cluster with one config overlay:

    config = og.Config(folder)
    config.overlay('{"model": {"decoder": {"filename": "cluster_2.onnx"}}}')
    model = og.Model(config)          # og.Model(folder) alone runs dense.onnx
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from edgecompile.bundle.layout import DECODER_FOLDER, DEFAULT_GRAPH, GENAI_CONFIG, MANIFEST
from edgecompile.bundle.store import write_graphs, write_json
from edgecompile.errors import BundleError, one_line

PAST_KEY = re.compile(r"past_key_values\.(0|[1-9][0-9]*)\.key")
# The manifest's student keys genai_config() reads: the whole of what the file may say comes from them.
GENAI_KEYS = ("genai_model_type", "layers", "heads", "kv_heads", "head_size", "hidden_size", "max_seq_length", "vocab_size",
              "eos_token_ids", "bos_token_id", "pad_token_id")


def write_decoder_folder(folder: Path, graphs: dict[str, ir.Model], tokenizer_files: list[Path],
                         config: dict[str, Any]) -> dict[str, int]:
    """Write the router and the decoder folder; returns the bytes each graph needs (its file plus the tensors it reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    needs = write_graphs(folder, [("router.onnx", graphs["router"])], shared_weights=True) if "router" in graphs else {}
    decoder = folder / DECODER_FOLDER
    needs.update(write_graphs(decoder, [(f"{name}.onnx", m) for name, m in graphs.items() if name != "router"], shared_weights=True))
    for source in tokenizer_files:
        shutil.copyfile(source, decoder / source.name)
    write_json(decoder / GENAI_CONFIG, config)
    return {name.removesuffix(".onnx"): size for name, size in needs.items()}


def genai_config(student: dict[str, Any], session_config: dict[str, str] | None = None) -> dict[str, Any]:
    """onnxruntime-genai's config for a decoder folder, in the form its own model builder writes, from the manifest's
    student section (GENAI_KEYS) and the session config entries the target's files need (its [weights] table, as this
    edgecompile defines the target): `build` writes it, `verify` regenerates it and refuses any other file.

    Layer and head counts are the checkpoint's: onnxruntime-genai reads which KV inputs a graph has
    and each one's head count from the graph itself (so clusters need no config of their own).
    """
    eos = list(student["eos_token_ids"])
    pad = student["pad_token_id"]
    model = {
        "bos_token_id": student["bos_token_id"],
        "context_length": student["max_seq_length"],
        "decoder": {
            # onnxruntime-genai passes unknown string keys of session_options to AddConfigEntry (0.18)
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": [], **(session_config or {})},
            "filename": f"{DEFAULT_GRAPH}.onnx",
            "head_size": student["head_size"],
            "hidden_size": student["hidden_size"],
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            "num_attention_heads": student["heads"],
            "num_hidden_layers": student["layers"],
            "num_key_value_heads": student["kv_heads"],
        },
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": pad if pad is not None else (eos[0] if eos else None),
        "type": student["genai_model_type"],
        "vocab_size": student["vocab_size"],
    }
    return {
        "model": {k: v for k, v in model.items() if v is not None},
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": student["max_seq_length"], "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def check_genai_config(root: Path, manifest: dict[str, Any], target: str, session_config: dict[str, str] | None = None) -> None:
    """The decoder folder's genai_config.json must be exactly what `build` writes for this manifest.

    onnxruntime-genai acts on that file (it loads a `custom_ops_library` it names, opens the files it names,
    picks providers and their options), so it is code: a bundle whose copy says anything else is refused
    before onnxruntime-genai sees the folder (BundleError naming the first field that differs).
    """
    path = root / target / DECODER_FOLDER / GENAI_CONFIG
    student = manifest["student"]
    missing = [key for key in GENAI_KEYS if key not in student]
    if missing:
        raise BundleError(f"{root / MANIFEST}: student.{missing[0]}: expected it (edgecompile writes it for decoder bundles "
                          "and regenerates genai_config.json from it), found it missing; rebuild the bundle")
    try:
        expected = genai_config(student, session_config)
    except (TypeError, ValueError, KeyError) as exc:
        raise BundleError(f"{root / MANIFEST}: student: expected the values edgecompile writes, found ones genai_config.json "
                          f"cannot be made from ({type(exc).__name__}: {one_line(exc)})") from None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable ({one_line(exc)})") from None
    difference = json_difference(expected, found)
    if difference is not None:
        field, want, got = difference
        raise BundleError(f"{path}: {field}: expected {want}, found {got} (this file is read by onnxruntime-genai, which can "
                          "load libraries and files it names; edgecompile accepts only the file it writes)"[:400])


def json_difference(expected: Any, found: Any, where: str = "") -> tuple[str, str, str] | None:
    """(dotted field, expected, found) of the first place two JSON values differ, or None."""
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in list(expected) + [k for k in found if k not in expected]:
            field = f"{where}.{key}" if where else str(key)
            if key not in found:
                return field, json.dumps(expected[key])[:80], "it missing"
            if key not in expected:
                return field, "no such field", json.dumps(found[key])[:80]
            inner = json_difference(expected[key], found[key], field)
            if inner is not None:
                return inner
        return None
    if type(expected) is not type(found) or expected != found:
        return where or "(the whole file)", json.dumps(expected)[:80], json.dumps(found)[:80]
    return None


def kv_cache_entries(inputs: Iterable[tuple[str, Sequence[int | str]]]) -> list[dict[str, Any]]:
    """The KV inputs and outputs an app allocates for a graph with these inputs (name, shape), per original
    layer index: the manifest's `kv_cache` entry, written by `build` and compared with the graph by readers."""
    layers = []
    for name, shape in inputs:
        if (match := PAST_KEY.fullmatch(name)) is not None:
            index = int(match.group(1))
            layers.append({
                "layer": index,
                "inputs": [f"past_key_values.{index}.key", f"past_key_values.{index}.value"],
                "outputs": [f"present.{index}.key", f"present.{index}.value"],
                "shape": ["batch_size", int(shape[1]), "past_sequence_length", int(shape[3])],
            })
    return layers


def check_kv_cache(manifest_path: Path, entry: dict[str, Any], inputs: Iterable[tuple[str, Sequence[int | str]]]) -> None:
    """A graph's KV cache must be what the manifest tells apps to allocate for it (BundleError otherwise)."""
    found = kv_cache_entries(inputs)
    if entry.get("kv_cache") != found:
        described = lambda cache: " ".join(f"{e['layer']}:{e['shape'][1]}" for e in cache) or "none"  # noqa: E731
        recorded = entry.get("kv_cache")
        shown = described(recorded) if isinstance(recorded, list) and all(
            isinstance(e, dict) and isinstance(e.get("shape"), list) and len(e["shape"]) > 1 and "layer" in e for e in recorded
        ) else repr(recorded)[:80]
        raise BundleError(f"{manifest_path}: {entry.get('graph')}.kv_cache: expected the graph's own KV inputs "
                          f"(layer:heads {described(found)}), found {shown}")
