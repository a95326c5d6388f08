"""The BERT family: its fp32 export (once, provenance kept), where its sub-layers are, its gates.

We use the TorchScript exporter (as optimum does) because its node names carry the module scope
(`/model/encoder/layer.0/attention/self/query/MatMul`), which the rewrites use to find
sub-layers; `passes.provenance` turns that into explicit node metadata. Inputs, dynamic axes and
dummy inputs come from optimum's BertOnnxConfig so the exported signature matches optimum's.

During export, BERT self-attention is traced with head-count-agnostic reshapes
(`view(B, S, -1, head_size)`): numerically identical to transformers' forward, but no head count
is baked into the graph, so pruning heads is purely a weight-slicing rewrite.
"""

from __future__ import annotations

import contextlib
import io
import math
import types
import warnings
from collections.abc import Iterator, Sequence

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from edgecompile.passes.sites import BranchSites, LayerSites, linear_site, nodes_by_module, residual_add

OPSET = 17


def _head_agnostic_self_attention(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    *args: object,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager BertSelfAttention (absolute positions, encoder) with -1 for the head dim."""
    batch, seq, _ = hidden_states.shape
    size = self.attention_head_size
    query = self.query(hidden_states).view(batch, seq, -1, size).transpose(1, 2)
    key = self.key(hidden_states).view(batch, seq, -1, size).transpose(1, 2)
    value = self.value(hidden_states).view(batch, seq, -1, size).transpose(1, 2)
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(size)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    if head_mask is not None:
        probs = probs * head_mask
    context = torch.matmul(probs, value).permute(0, 2, 1, 3).reshape(batch, seq, -1)
    return context, probs


@contextlib.contextmanager
def head_agnostic_attention(module: nn.Module) -> Iterator[None]:
    from transformers.models.bert.modeling_bert import BertSelfAttention

    patched = [m for m in module.modules() if type(m) is BertSelfAttention]
    for m in patched:
        m.forward = types.MethodType(_head_agnostic_self_attention, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def bert_dummy_inputs(config: dict, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Dummy inputs from optimum's BertOnnxConfig (its shapes and value ranges)."""
    from optimum.exporters.onnx.model_configs import BertOnnxConfig
    from transformers import BertConfig

    onnx_config = BertOnnxConfig(BertConfig(**config), task="feature-extraction")
    dummy = onnx_config.generate_dummy_inputs(framework="pt")
    return tuple(dummy[name] for name in names)


def bert_dynamic_axes(input_names: Sequence[str], output_names: Sequence[str], per_token: Sequence[str]) -> dict:
    from optimum.exporters.onnx.model_configs import BertOnnxConfig
    from transformers import BertConfig

    axes = dict(BertOnnxConfig(BertConfig(), task="feature-extraction").inputs)
    dynamic = {name: dict(axes[name]) for name in input_names}
    for name in output_names:
        dynamic[name] = {0: "batch_size", 1: "sequence_length"} if name in per_token else {0: "batch_size"}
    return dynamic


def export_module(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict | None,
) -> ir.Model:
    """torch -> ONNX (in memory) -> onnx-ir, with provenance tagged on every node."""
    from onnx_ir.passes.common import IdentityEliminationPass

    from edgecompile.passes.provenance import TagModuleProvenance

    buffer = io.BytesIO()
    with warnings.catch_warnings(), head_agnostic_attention(module), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buffer,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    model = ir.from_proto(onnx.load_from_string(buffer.getvalue()))
    # The exporter merges bit-identical tensors (e.g. a fresh model's all-zero biases) and routes the
    # duplicates through Identity; without those, every later pass sees its constants directly.
    IdentityEliminationPass()(model)
    TagModuleProvenance()(model)
    return model


def export_student(student: nn.Module) -> ir.Model:
    """The dense student: inputs input_ids / attention_mask / token_type_ids, dynamic batch and sequence."""
    from edgecompile.reference.evaluate import PER_TOKEN_OUTPUTS
    from edgecompile.reference.student import INPUT_NAMES

    args = bert_dummy_inputs(student.spec.config, INPUT_NAMES)
    axes = bert_dynamic_axes(INPUT_NAMES, student.output_names, PER_TOKEN_OUTPUTS)
    model = export_module(student, args, INPUT_NAMES, student.output_names, axes)
    model.graph.name = "dense"
    return model


def export_router(router: nn.Module) -> ir.Model:
    """The router: input_ids / attention_mask -> cluster_id [batch] int64, distances [batch, K]."""
    from edgecompile.reference.router import ROUTER_INPUT_NAMES, ROUTER_OUTPUT_NAMES

    args = bert_dummy_inputs(router.encoder.spec.config, ROUTER_INPUT_NAMES)
    axes = bert_dynamic_axes(ROUTER_INPUT_NAMES, ROUTER_OUTPUT_NAMES, ())
    model = export_module(router, args, ROUTER_INPUT_NAMES, ROUTER_OUTPUT_NAMES, axes)
    model.graph.name = "router"
    return model


@dataclass(frozen=True)
class BertStructure:
    """Where a BERT encoder's layers are in its export (post-LayerNorm: the norms stay outside the branches).

    A layer's residual adds are the Add nodes directly in `...attention.output` and `...output`
    (the branch enters from the dense projection, the other input is the residual stream).
    """

    encoder_path: str  # e.g. "model.encoder"
    num_layers: int
    num_heads: int
    head_size: int
    lowbit_modules: frozenset[str] = frozenset()

    def find_layers(self, model: ir.Model) -> list[LayerSites]:
        by_module = nodes_by_module(model)

        def site(path: str):
            return linear_site(path, by_module.get(path, []))

        def branch(ups: list[str], down: str, residual: str, unit_size: int) -> BranchSites | None:
            down_site = site(down)
            add = residual_add(residual, by_module.get(residual, []), down_site)
            if down_site is None or add is None:
                return None
            return BranchSites(add, [site(u) for u in ups], down_site, unit_size=unit_size)

        layers = []
        for i in range(self.num_layers):
            p = f"{self.encoder_path}.layer.{i}"
            attention = branch([f"{p}.attention.self.{n}" for n in ("query", "key", "value")], f"{p}.attention.output.dense",
                               f"{p}.attention.output", self.head_size)
            ffn = branch([f"{p}.intermediate.dense"], f"{p}.output.dense", f"{p}.output", 1)
            layers.append(LayerSites(i, attention, ffn))
        return layers


def gated_linears(bert: nn.Module) -> list[tuple[tuple[nn.Module, str], tuple[nn.Module, str]]]:
    """Per layer, (parent, attribute) of the attention output projection and of the FFN output projection."""
    return [((layer.attention.output, "dense"), (layer.output, "dense")) for layer in bert.encoder.layer]


def bert_gates(bert: nn.Module) -> "ModelGates":
    """The reference gates (reference/masks.py) on a transformers BertModel."""
    from edgecompile.reference.masks import ModelGates

    return ModelGates(gated_linears(bert), bert.config.hidden_size // bert.config.num_attention_heads)
