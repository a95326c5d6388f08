"""The BERT family: its fp32 export (once, provenance kept), where its sub-layers are, its gates.

We use the TorchScript exporter (as optimum does) because its node names carry the module scope
(`/model/encoder/layer.0/attention/self/query/MatMul`), which the rewrites use to find
sub-layers; `passes.provenance` turns that into explicit node metadata. The signature is
optimum's for BERT (input names, `batch_size` / `sequence_length` axes); dummy inputs come from
optimum core's text input generator, as optimum's BertOnnxConfig made them.

Self-attention must be traced with head-count-agnostic reshapes (`view(B, S, -1, head_size)`) so
that pruning heads is purely a weight-slicing rewrite. transformers 5's BertSelfAttention already
reshapes that way (and is traced as is, eager attention); 4.x bakes the head count in, so there its
forward is swapped during export for the same arithmetic with -1 for the head dim.
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

from edgecompile.inputs.compat import transformers_major
from edgecompile.passes.sites import BranchSites, LayerSites, linear_site, nodes_by_module, residual_add

OPSET = 17
# optimum's dynamic axis names for encoder text inputs (BertOnnxConfig.inputs).
PER_TOKEN_AXES = {0: "batch_size", 1: "sequence_length"}
PER_SAMPLE_AXES = {0: "batch_size"}


def _head_agnostic_self_attention_v4(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    *args: object,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 4.57's eager BertSelfAttention (absolute positions, encoder) with -1 for the head dim."""
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
    """While tracing, BERT self-attention reshapes with -1 heads (a no-op on transformers 5, which does)."""
    if transformers_major() >= 5:
        yield
        return
    from transformers.models.bert.modeling_bert import BertSelfAttention

    patched = [m for m in module.modules() if type(m) is BertSelfAttention]
    for m in patched:
        m.forward = types.MethodType(_head_agnostic_self_attention_v4, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def bert_dummy_inputs(config: object, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Dummy inputs from optimum core's DummyTextInputGenerator (BertOnnxConfig's shapes and value ranges).

    `config` is the loaded model's transformers config (only `vocab_size` is read)."""
    from optimum.utils.input_generators import DummyTextInputGenerator
    from optimum.utils.normalized_config import NormalizedTextConfig

    generator = DummyTextInputGenerator("feature-extraction", NormalizedTextConfig(config))
    return tuple(generator.generate(name, framework="pt") for name in names)


def bert_dynamic_axes(input_names: Sequence[str], output_names: Sequence[str], per_token: Sequence[str]) -> dict:
    """Every input is [batch, sequence]; outputs named in `per_token` too, the others [batch, ...]."""
    dynamic = {name: dict(PER_TOKEN_AXES) for name in input_names}
    for name in output_names:
        dynamic[name] = dict(PER_TOKEN_AXES if name in per_token else PER_SAMPLE_AXES)
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

    args = bert_dummy_inputs(student.bert.config, INPUT_NAMES)
    axes = bert_dynamic_axes(INPUT_NAMES, student.output_names, PER_TOKEN_OUTPUTS)
    model = export_module(student, args, INPUT_NAMES, student.output_names, axes)
    model.graph.name = "dense"
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
