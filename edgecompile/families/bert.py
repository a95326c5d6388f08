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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from edgecompile.errors import input_error
from edgecompile.inputs.compat import transformers_major
from edgecompile.passes.sites import (
    HEAD_IDS_KEY, BranchSites, LayerSites, LinearSite, StructureError, linear_site, nodes_by_module, residual_add,
)

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


def _held_heads(down: LinearSite, exported: np.ndarray | None) -> np.ndarray | None:
    """Original ids of the heads an attention output projection holds: as the pruning pass last left
    them (node metadata), else as exported (the checkpoint's heads; None: all of them)."""
    held = down.matmul.metadata_props.get(HEAD_IDS_KEY)
    return exported if held is None else np.array([int(h) for h in held.split(",") if h], np.int64)


def _record_heads(down: LinearSite, ids: np.ndarray):
    """`on_resize` of an attention branch: remember which original heads remain."""

    def resize(kept_units: np.ndarray, kept_groups: np.ndarray) -> None:
        down.matmul.metadata_props[HEAD_IDS_KEY] = ",".join(str(h) for h in ids[kept_units])

    return resize


@dataclass(frozen=True)
class BertStructure:
    """Where a BERT encoder's layers are in its export (post-LayerNorm: the norms stay outside the branches).

    A layer's residual adds are the Add nodes directly in `...attention.output` and `...output`
    (the branch enters from the dense projection, the other input is the residual stream).
    `heads_present[i]`: the original ids of the heads layer i holds as exported (a checkpoint saved
    after `prune_heads` lacks some); empty means every layer holds all `num_heads`.
    """

    encoder_path: str  # e.g. "model.encoder"
    num_layers: int
    num_heads: int
    head_size: int
    lowbit_modules: frozenset[str] = frozenset()
    heads_present: tuple[np.ndarray, ...] = ()

    def find_layers(self, model: ir.Model) -> list[LayerSites]:
        by_module = nodes_by_module(model)

        def site(path: str):
            return linear_site(path, by_module.get(path, []))

        def branch(ups: list[str], down: str, residual: str) -> tuple[LinearSite, ir.Node, list[LinearSite]] | None:
            down_site = site(down)
            add = residual_add(residual, by_module.get(residual, []), down_site)
            return None if down_site is None or add is None else (down_site, add, [site(u) for u in ups])

        layers = []
        for i in range(self.num_layers):
            p = f"{self.encoder_path}.layer.{i}"
            attention = ffn = None
            if found := branch([f"{p}.attention.self.{n}" for n in ("query", "key", "value")], f"{p}.attention.output.dense",
                               f"{p}.attention.output"):
                down, add, ups = found
                ids = _held_heads(down, self.heads_present[i] if self.heads_present else None)
                attention = BranchSites(add, ups, down, unit_size=self.head_size, unit_ids=ids)
                if ids is None:
                    ids = attention.ids()
                elif attention.num_units != len(ids):
                    raise StructureError(f"{p}.attention.output.dense: expected {len(ids)} heads ({', '.join(map(str, ids))}), "
                                         f"found {attention.num_units}")
                attention.on_resize = _record_heads(down, ids)
            if found := branch([f"{p}.intermediate.dense"], f"{p}.output.dense", f"{p}.output"):
                down, add, ups = found
                ffn = BranchSites(add, ups, down)
            layers.append(LayerSites(i, attention, ffn))
        return layers


def gated_linears(bert: nn.Module) -> list[tuple[tuple[nn.Module, str], tuple[nn.Module, str]]]:
    """Per layer, (parent, attribute) of the attention output projection and of the FFN output projection."""
    return [((layer.attention.output, "dense"), (layer.output, "dense")) for layer in bert.encoder.layer]


def bert_gates(bert: nn.Module) -> "ModelGates":
    """The reference gates (reference/masks.py) on a transformers BertModel; a head mask indexes the
    original heads, of which a checkpoint saved after `prune_heads` holds only some (its config says which)."""
    from edgecompile.reference.masks import ModelGates

    config = bert.config
    present = heads_present(config.num_hidden_layers, config.num_attention_heads, getattr(config, "pruned_heads", None))
    return ModelGates(gated_linears(bert), config.hidden_size // config.num_attention_heads, present)


# --- checkpoints saved after transformers' `prune_heads` ----------------------------------------
#
# transformers 4.x's `model.prune_heads({layer: [heads]})` slices those heads out of the layer's
# Q/K/V (output features) and attention output projection (input features) and records them in
# config.json as `pruned_heads` (layer -> heads, numbered among the original num_attention_heads;
# pruning again adds to the lists). transformers 5 no longer reads that key, so both majors load
# such a checkpoint the same way (reference/student.py): built from a config without it
# (`loading_config`), then `load_pruned_attention` gives the pruned layers the checkpoint's widths
# and tensors.


def parse_pruned_heads(raw: Mapping[Any, Sequence[int]] | None) -> dict[int, tuple[int, ...]]:
    """config's `pruned_heads` (JSON keys are strings) -> {layer: sorted original head ids}; validated first."""
    return {int(layer): tuple(sorted({int(h) for h in heads})) for layer, heads in (raw or {}).items() if heads}


def heads_present(num_layers: int, num_heads: int, pruned: Mapping[Any, Sequence[int]] | None) -> tuple[np.ndarray, ...]:
    """Per layer, the original ids of the heads the checkpoint holds, in the order its tensors hold them."""
    gone = parse_pruned_heads(pruned)
    return tuple(np.setdiff1d(np.arange(num_heads), gone.get(i, ())).astype(np.int64) for i in range(num_layers))


def check_pruned_heads(config_path: Path, config: Mapping[str, Any]) -> None:
    """`pruned_heads` must name layers and heads the config has, and leave every layer a head."""
    raw = config.get("pruned_heads")
    if raw is None or raw == {}:
        return
    what = "'pruned_heads'"
    if not isinstance(raw, dict):
        raise input_error(config_path, what, "an object {layer: [head, ...]}", type(raw).__name__)
    layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    for key, value in raw.items():
        layer = int(key) if isinstance(key, str) and key.isdigit() else None
        if layer is None or layer >= layers:
            raise input_error(config_path, f"{what} key {key!r}", f"a layer index 0..{layers - 1}", repr(key))
        if not isinstance(value, list) or any(isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < heads for h in value):
            raise input_error(config_path, f"{what}[{key!r}]", f"a list of head indices 0..{heads - 1}", repr(value)[:80])
        if len(set(value)) == heads:
            raise input_error(config_path, f"{what}[{key!r}]", f"at least one of the layer's {heads} heads left "
                              "(an attention without heads cannot run, in transformers either)", f"all {heads} pruned")


def loading_config(transformer_dir: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for a checkpoint saved after prune_heads: its config without
    `pruned_heads`, so every layer is built full width on both majors (4.x would prune at construction)."""
    if not parse_pruned_heads(config.get("pruned_heads")):
        return {}
    from transformers import BertConfig

    loaded = BertConfig.from_pretrained(str(transformer_dir), local_files_only=True)
    loaded.pruned_heads = {}
    return {"config": loaded}


def load_pruned_attention(model: nn.Module, bert: nn.Module, weights: Path, pruned_heads: Mapping[Any, Sequence[int]] | None) -> set[str]:
    """Give each layer in `pruned_heads` the checkpoint's narrower self-attention.

    The model was built with every layer at num_attention_heads (`loading_config`), so those layers'
    Q/K/V and attention output projection are full width (transformers reports them mismatched):
    each is replaced by a Linear of the checkpoint's shape holding the checkpoint's tensors, with the
    head bookkeeping transformers 4 keeps, and the config records `pruned_heads` again. Returns the
    names (as in `model.state_dict()`) now loaded. A tensor whose shape does not follow from
    `pruned_heads` is an error naming it.
    """
    from safetensors import safe_open

    pruned = parse_pruned_heads(pruned_heads)
    if not pruned:
        return set()
    config = bert.config
    size = config.hidden_size // config.num_attention_heads
    prefix = next(name + "." for name, module in model.named_modules() if module is bert) if model is not bert else ""
    loaded: set[str] = set()
    with safe_open(str(weights), framework="pt") as handle:
        stored = set(handle.keys())

        def checkpoint_tensor(name: str, shape: tuple[int, ...], why: str) -> torch.Tensor:
            key = next((k for k in (name, "bert." + name, name.removeprefix("bert.")) if k in stored), None)
            if key is None:
                raise input_error(weights, f"tensor {name}", "in the checkpoint", "missing")
            found = tuple(handle.get_slice(key).get_shape())
            if found != shape:
                raise input_error(weights, f"tensor {key}", f"shape {list(shape)} ({why})", list(found))
            loaded.add(name)
            return handle.get_tensor(key)

        for layer, gone in pruned.items():
            attention = bert.encoder.layer[layer].attention
            heads = config.num_attention_heads - len(gone)
            width, hidden = heads * size, config.hidden_size
            why = f"config.json's pruned_heads leaves {heads} of {config.num_attention_heads} heads in layer {layer}"
            path = f"{prefix}encoder.layer.{layer}.attention"
            with torch.no_grad():
                for name in ("query", "key", "value"):
                    linear = nn.Linear(hidden, width)
                    linear.weight.copy_(checkpoint_tensor(f"{path}.self.{name}.weight", (width, hidden), why))
                    linear.bias.copy_(checkpoint_tensor(f"{path}.self.{name}.bias", (width,), why))
                    setattr(attention.self, name, linear)
                output = nn.Linear(width, hidden)
                output.weight.copy_(checkpoint_tensor(f"{path}.output.dense.weight", (hidden, width), why))
                output.bias.copy_(attention.output.dense.bias)  # hidden wide: transformers loaded it as usual
                attention.output.dense = output
            attention.self.num_attention_heads = heads  # transformers 4's forward reshapes with these
            attention.self.all_head_size = width
            attention.pruned_heads = set(gone)
    config.pruned_heads = {layer: list(heads) for layer, heads in pruned.items()}
    return loaded
