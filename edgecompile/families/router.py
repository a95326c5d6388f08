"""Routers: a router encoder folder validated (a sentence-transformers BERT, truncated or not, or a model2vec
static-embedding table), and the router graph exported from it.

Router export: whatever the encoder (a BERT sentence-transformers model, truncated or not, or a model2vec
static-embedding table), one graph input_ids / attention_mask -> cluster_id [batch] int64, distances [batch, K].

Exported once per build with the TorchScript exporter, like the student (families/bert.py), with dynamic
batch and sequence axes.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn

from edgecompile.errors import input_error
from edgecompile.families.bert import bert_dummy_inputs, bert_dynamic_axes, export_module
from edgecompile.inputs.router import RouterSpec, is_model2vec, load_static_router
from edgecompile.reference.router import ROUTER_INPUT_NAMES, ROUTER_OUTPUT_NAMES, StaticSentenceEncoder


def _static_dummy_inputs(encoder: StaticSentenceEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    rows = encoder.token_mapping.shape[0] if encoder.token_mapping is not None else encoder.table.shape[0]
    ids = torch.arange(16, dtype=torch.int64).reshape(2, 8) % rows
    return ids, torch.ones_like(ids)


def export_router(router: nn.Module) -> ir.Model:
    """The router graph: encoder -> (projection) -> distances -> ArgMin."""
    encoder = router.encoder
    if isinstance(encoder, StaticSentenceEncoder):
        args = _static_dummy_inputs(encoder)
    else:
        args = bert_dummy_inputs(encoder.student.bert.config, ROUTER_INPUT_NAMES)
    axes = bert_dynamic_axes(ROUTER_INPUT_NAMES, ROUTER_OUTPUT_NAMES, ())
    model = export_module(router, args, ROUTER_INPUT_NAMES, ROUTER_OUTPUT_NAMES, axes)
    model.graph.name = "router"
    return model


def load_router(path: Path, layers: int | None = None) -> RouterSpec:
    """Validate a router encoder folder; `layers` truncates a transformer encoder to its first n layers."""
    path = Path(path)
    if is_model2vec(path):
        if layers is not None:
            raise input_error("--router-layers", "router encoder", "a transformer encoder (layers to keep)",
                              f"a static-embedding model2vec model ({path})")
        return load_static_router(path)
    from edgecompile.families import load_student

    encoder = load_student(path, role="router encoder")
    if encoder.family != "sentence-transformers":
        raise input_error(path, "router encoder", "a sentence-transformers folder (modules.json) or a model2vec model",
                          f"a plain {encoder.architecture} checkpoint")
    if not encoder.tokenizer_files():
        raise input_error(encoder.transformer_dir, "router encoder tokenizer", "tokenizer files (tokenizer.json or vocab.txt)", "none")
    encoder.check_tokenizer_files_readable()
    if layers is not None and not 1 <= layers <= encoder.num_layers:
        raise input_error("--router-layers", "layers", f"1 .. {encoder.num_layers} (the encoder's layers)", layers)
    return RouterSpec(path, "transformer", encoder.embedding_dim, encoder.transformer_dir / "model.safetensors",
                      encoder.transformer_dir, int(encoder.config["vocab_size"]), layers or encoder.num_layers, encoder)
