"""Router export: whatever the encoder (a BERT sentence-transformers model, truncated or not, or a model2vec
static-embedding table), one graph input_ids / attention_mask -> cluster_id [batch] int64, distances [batch, K].

Exported once per build with the TorchScript exporter, like the student (families/bert.py), with dynamic
batch and sequence axes.
"""

from __future__ import annotations

import onnx_ir as ir
import torch
from torch import nn

from edgecompile.families.bert import bert_dummy_inputs, bert_dynamic_axes, export_module
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
