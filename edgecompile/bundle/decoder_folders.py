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
import shutil
from pathlib import Path
from typing import Any

import onnx_ir as ir

from edgecompile.bundle.store import write_graphs, write_json

DECODER_FOLDER = "decoder"
GENAI_CONFIG = "genai_config.json"
DEFAULT_GRAPH = "dense"


def overlay(graph: str) -> str:
    """The onnxruntime-genai config overlay that selects one graph of the decoder folder."""
    return json.dumps({"model": {"decoder": {"filename": f"{graph}.onnx"}}})


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


def genai_config(config: dict[str, Any], num_layers: int, heads: int, kv_heads: int, head_dim: int, hidden: int,
                 context_length: int) -> dict[str, Any]:
    """onnxruntime-genai's config for the decoder folder, in the form its own model builder writes.

    Layer and head counts are the checkpoint's: onnxruntime-genai reads which KV inputs a graph has
    and each one's head count from the graph itself (so clusters need no config of their own).
    """
    eos = config.get("eos_token_id")
    pad = config.get("pad_token_id")
    model = {
        "bos_token_id": config.get("bos_token_id"),
        "context_length": context_length,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": f"{DEFAULT_GRAPH}.onnx",
            "head_size": head_dim,
            "hidden_size": hidden,
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            "num_attention_heads": heads,
            "num_hidden_layers": num_layers,
            "num_key_value_heads": kv_heads,
        },
        "eos_token_id": eos,
        "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
        "type": "llama",
        "vocab_size": config["vocab_size"],
    }
    return {
        "model": {k: v for k, v in model.items() if v is not None},
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
