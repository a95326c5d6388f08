"""The BERT family (BertModel, BertForSequenceClassification, sentence-transformers folders of a BERT): its
config rules, its fp32 export (once, provenance kept), where its sub-layers are, its gates, its MACs.
Its reference model (and checkpoints saved after `prune_heads`) is families/bert_model.py.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from edgecompile.errors import InputError, input_error
from edgecompile.families.base import FEATURE_EXTRACTION, ConfigCheck, Family, register
from edgecompile.families.bert_model import INPUT_NAMES, check_pruned_heads, heads_present
from edgecompile.inputs.compat import transformers_major
from edgecompile.inputs.masks import ClusterMasks
from edgecompile.inputs.student import StudentSpec, refuse_unimplemented
from edgecompile.numerics import kept_units
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


def bert_gates(bert: nn.Module) -> Any:
    """The reference gates (reference/masks.py) on a transformers BertModel; a head mask indexes the
    original heads, of which a checkpoint saved after `prune_heads` holds only some (its config says which)."""
    from edgecompile.reference.masks import ModelGates

    config = bert.config
    present = heads_present(config.num_hidden_layers, config.num_attention_heads, getattr(config, "pruned_heads", None))
    return ModelGates(gated_linears(bert), config.hidden_size // config.num_attention_heads, present)


# ---------------------------------------------------------------------------------------------------
# config rules

ARCHITECTURES = ("BertModel", "BertForSequenceClassification")
ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_python", "silu", "swish", "tanh")
# Fields a BERT config may carry (saved by transformers 4.x or 5.x) that change the model but that the
# BERT export and passes do not implement: each is refused by name rather than compiled into a
# different model. (transformers 5 drops relative positions altogether; 4.57 would load them, so both
# lanes refuse them here. `pruned_heads`, which 5 drops too, is implemented.) Entries: key,
# accepted(value), what is accepted.
FIELDS_NOT_IMPLEMENTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("position_embedding_type", lambda v: v in (None, "absolute"), "'absolute'"),
    ("is_decoder", lambda v: not v, "an encoder (false)"),
    ("add_cross_attention", lambda v: not v, "no cross-attention (false)"),
    ("chunk_size_feed_forward", lambda v: not v, "0 (the FFN is exported unchunked)"),
    ("quantization_config", lambda v: v is None, "none (a float checkpoint)"),
)


@register
class Bert(Family):
    name = "bert"
    model_types = ("bert",)
    architectures = ARCHITECTURES
    task = FEATURE_EXTRACTION
    description = "BertModel, BertForSequenceClassification, a sentence-transformers folder whose first module is a BERT"

    @classmethod
    def check_config(cls, path: Path, config: dict[str, Any], *, sentence_transformers: bool = False) -> ConfigCheck:
        from edgecompile.families.base import supported

        allowed = ("BertModel",) if sentence_transformers else ARCHITECTURES
        architectures = config.get("architectures") or []
        architecture = architectures[0] if architectures else "BertModel"
        if architecture not in allowed:
            raise InputError(f"{path}: architecture '{architecture}' is not supported; supported: {supported()}")
        positive = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                    "max_position_embeddings", "type_vocab_size")
        for key in positive:
            value = config.get(key)
            if key in ("type_vocab_size", "max_position_embeddings", "vocab_size") and value is None:
                continue  # transformers' defaults apply
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise input_error(path, f"'{key}'", "a positive integer", repr(value))
        for key in ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise input_error(path, f"'{key}'", "a number", repr(value))
        if "hidden_act" in config and config["hidden_act"] not in ACTIVATIONS:
            raise input_error(path, "'hidden_act'", "a transformers activation name (e.g. 'gelu')", repr(config["hidden_act"]))
        if config["hidden_size"] % config["num_attention_heads"]:
            raise input_error(path, "'hidden_size' / 'num_attention_heads'", "an integer head size",
                              f"{config['hidden_size']} / {config['num_attention_heads']}")
        refuse_unimplemented(path, config, FIELDS_NOT_IMPLEMENTED)
        check_pruned_heads(path, config)  # implemented on both majors (families/bert_model.py)
        return ConfigCheck(architecture)

    opset = OPSET
    graph_prefix = "model."  # the exported module paths put StudentModule's `model.` before the Hugging Face names

    @classmethod
    def load_model(cls, spec: StudentSpec) -> Any:
        """The reference: transformers' BertModel in a StudentModule with the graph's signature (families/bert_model.py)."""
        from edgecompile.families.bert_model import load_student_module

        return load_student_module(spec)

    @classmethod
    def export(cls, student: Any) -> ir.Model:
        return export_student(student)

    @classmethod
    def structure(cls, spec: StudentSpec, student: Any, lowbit_modules: frozenset[str] = frozenset()) -> "BertStructure":
        return BertStructure(student.encoder_path, spec.num_layers, spec.num_heads, spec.head_size, lowbit_modules,
                             cls.heads_present(spec))

    @classmethod
    def heads_present(cls, spec: StudentSpec) -> tuple[np.ndarray, ...]:
        """Per layer, the original ids of the heads the checkpoint holds (one saved after prune_heads lacks some)."""
        return heads_present(spec.num_layers, spec.num_heads, spec.config.get("pruned_heads"))

    @classmethod
    def gates(cls, student: Any) -> Any:
        return bert_gates(student.bert)

    @classmethod
    def kept_structure(cls, spec: StudentSpec, masks: ClusterMasks) -> dict[str, Any]:
        return kept_structure(spec, masks)

    @classmethod
    def macs_per_token(cls, spec: StudentSpec, kept: dict[str, Any], sequence: int = 128) -> dict[str, int]:
        return macs_per_token(spec, kept, sequence)

    @classmethod
    def notes(cls, spec: StudentSpec, masks: Any) -> list[str]:
        """What the build should say about this checkpoint: the heads it already lacks, and gates with nothing to act on."""
        from edgecompile.families.bert_model import parse_pruned_heads

        pruned = parse_pruned_heads(spec.config.get("pruned_heads"))
        if not pruned:
            return []
        listed = "; ".join(f"layer {layer}: {', '.join(map(str, heads))}" for layer, heads in sorted(pruned.items()))
        gated = [c.index for c in masks.clusters if any(np.any(c.heads[layer, list(heads)] != 0) for layer, heads in pruned.items())]
        return [f"the checkpoint was saved after prune_heads ({listed}): those heads are absent from every graph"
                + (f"; non-zero gates for them (clusters {', '.join(map(str, gated))}) have nothing to act on" if gated else "")]

    @classmethod
    def manifest_fields(cls, spec: StudentSpec) -> dict[str, Any]:
        """A checkpoint saved after prune_heads lacks these heads (original ids) in every graph, whatever the masks say."""
        from edgecompile.families.bert_model import parse_pruned_heads

        pruned = parse_pruned_heads(spec.config.get("pruned_heads"))
        return {"pruned_heads": {str(layer): list(heads) for layer, heads in sorted(pruned.items())}} if pruned else {}

    @classmethod
    def student_spec(cls, checkpoint: Any, check: ConfigCheck, weight_names: set[str]) -> StudentSpec:
        """The StudentSpec of a checked folder: which of the three BERT kinds, and what its graph outputs."""
        from edgecompile.inputs.student import sentence_transformers_settings

        config = checkpoint.config
        positions = int(config.get("max_position_embeddings", 512))
        if checkpoint.modules is not None:
            st = sentence_transformers_settings(checkpoint)
            return StudentSpec(checkpoint.path, "sentence-transformers", check.architecture, checkpoint.transformer_dir, config,
                               pooling_mode=st.pooling_mode, normalize=st.normalize, max_seq_length=st.max_seq_length)
        if check.architecture == "BertForSequenceClassification":
            labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
            return StudentSpec(checkpoint.path, "bert-sequence-classification", check.architecture, checkpoint.transformer_dir,
                               config, max_seq_length=positions, num_labels=labels)
        return StudentSpec(checkpoint.path, "bert", check.architecture, checkpoint.transformer_dir, config,
                           max_seq_length=positions, has_pooler=any(n.endswith("pooler.dense.weight") for n in weight_names))


# ---------------------------------------------------------------------------------------------------
# what a cluster keeps, and its MACs per token

def kept_structure(spec: StudentSpec, masks: ClusterMasks) -> dict[str, Any]:
    """Per layer: blocks on, heads kept (original ids), neurons kept, soft gates; and the totals.

    Heads a checkpoint already lacks (saved after `prune_heads`) are never counted as kept, whatever their gate.
    """
    present = heads_present(spec.num_layers, spec.num_heads, spec.config.get("pruned_heads"))
    layers = []
    for i in range(spec.num_layers):
        attention_on = masks.blocks[i, 0] != 0
        ffn_on = masks.blocks[i, 1] != 0
        head_gates = masks.heads[i][present[i]]
        heads = [int(h) for h in present[i][kept_units(head_gates)]] if attention_on else []
        neurons = len(kept_units(masks.neurons[i])) if ffn_on else 0
        soft = {
            "attention_scale": float(masks.blocks[i, 0]) if attention_on and masks.blocks[i, 0] != 1 else None,
            "ffn_scale": float(masks.blocks[i, 1]) if ffn_on and masks.blocks[i, 1] != 1 else None,
            "soft_heads": int(np.count_nonzero((head_gates != 0) & (head_gates != 1))) if attention_on else 0,
            "soft_neurons": int(np.count_nonzero((masks.neurons[i] != 0) & (masks.neurons[i] != 1))) if ffn_on else 0,
        }
        layers.append({
            "layer": i,
            # A branch "kept" with zero heads / neurons reduces to its output bias.
            "attention": bool(attention_on),
            "ffn": bool(ffn_on),
            "heads": heads,
            "neurons": neurons,
            **{k: v for k, v in soft.items() if v},
        })
    return {
        "layers": layers,
        "attention_blocks_kept": sum(layer["attention"] for layer in layers),
        "ffn_blocks_kept": sum(layer["ffn"] for layer in layers),
        "heads_kept": sum(len(layer["heads"]) for layer in layers),
        "neurons_kept": sum(layer["neurons"] for layer in layers),
        "layers_without_compute": [layer["layer"] for layer in layers if not layer["heads"] and not layer["neurons"]],
    }


def macs_per_token(spec: StudentSpec, kept: dict[str, Any], sequence: int = 128) -> dict[str, int]:
    """MACs per token for one sequence of `sequence` tokens: weight projections (Q/K/V, attention output, FFN),
    attention scores and context (2 * sequence * kept_heads * head_size per layer), plus pooler / classifier
    once per sequence, divided by `sequence`."""
    h, d = spec.hidden_size, spec.head_size
    linear = attention = 0
    for layer in kept["layers"]:
        width = len(layer["heads"]) * d
        linear += 4 * h * width + 2 * h * layer["neurons"]
        attention += 2 * sequence * width
    per_sequence = 0
    if spec.family == "bert-sequence-classification":
        per_sequence = h * h + h * spec.num_labels
    elif spec.has_pooler:
        per_sequence = h * h
    total = linear + attention + per_sequence // sequence
    return {"sequence": sequence, "linear": linear, "attention": attention, "total": total}
