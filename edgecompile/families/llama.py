"""The Llama family (LlamaForCausalLM): config rules, decoder graph, where its sub-layers are, its gates.

The decoder graph is written directly from the checkpoint's weights (no tracing), in the I/O
conventions of onnxruntime-genai so its apps load it unchanged:

  inputs   input_ids [batch, sequence_length], attention_mask [batch, total_sequence_length],
           past_key_values.{i}.key|value [batch, kv_heads_i, past_sequence_length, head_dim]
  outputs  logits [batch, sequence_length, vocab], present.{i}.key|value

with `i` the original layer index: a cluster that removes layer i's attention has no KV for i.
One graph serves prefill and decode. Per layer (pre-norm, so a removed branch is the identity):

  x += o_proj(GroupQueryAttention(q_proj(n), k_proj(n), v_proj(n), past, rotary)),  n = RMSNorm(x)
  x += down_proj(silu(gate_proj(n)) * up_proj(n)),                                  n = RMSNorm(x)

RoPE is computed here from config.json (rope types default / linear / llama3), independently of
transformers, so the parity gate (whose reference is transformers' own LlamaForCausalLM) would
see a config that one of the two reads differently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from edgecompile.errors import InputError, input_error
from edgecompile.families.graph_writer import GraphWriter, tensor_value
from edgecompile.inputs.compat import transformers_major
from edgecompile.passes.sites import HEAD_IDS_KEY, BranchSites, LayerSites, linear_site, nodes_by_module, residual_add

ARCHITECTURES = ("LlamaForCausalLM",)
MS_DOMAIN = "com.microsoft"
OPSET = 17
ROPE_TYPES = ("default", "linear", "llama3")

# config.json fields this module implements (their values are checked below) ...
IMPLEMENTED = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "hidden_act", "attention_bias", "mlp_bias", "pretraining_tp", "rope_parameters", "rope_theta", "rope_scaling",
    "bos_token_id", "eos_token_id", "pad_token_id", "n_future_tokens",
}
# ... and fields that do not change an inference forward pass (training, bookkeeping, generation defaults
# that `run` and parity do not use: they decode greedily).
INERT = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "initializer_range",
    "use_cache", "attention_dropout", "output_attentions", "output_hidden_states", "return_dict", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "torchscript", "tf_legacy_loss",
    "use_bfloat16", "tie_encoder_decoder", "cross_attention_hidden_size", "decoder_start_token_id", "sep_token_id",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "pruned_heads",
}
EXPECTED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "is_encoder_decoder": False,
            "add_cross_attention": False}


@dataclass(frozen=True)
class LlamaDims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    eps: float
    tied: bool
    rope: dict[str, Any] = field(default_factory=dict)
    extra_heads: int = 0  # multi-token prediction: heads beyond the next-token one

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LlamaDims":
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            layers=int(config["num_hidden_layers"]), hidden=hidden, heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]), max_positions=int(config.get("max_position_embeddings", 2048)),
            eps=float(config.get("rms_norm_eps", 1e-6)), tied=bool(config.get("tie_word_embeddings", False)),
            rope=rope_parameters(config), extra_heads=max(int(config.get("n_future_tokens", 1)) - 1, 0),
        )


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings as transformers 5 stores them (`rope_parameters`), from either major's config.json."""
    if "rope_parameters" in config:
        return dict(config["rope_parameters"] or {})
    scaling = dict(config.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    return {"rope_type": rope_type, "rope_theta": config.get("rope_theta", 10000.0), **scaling}


def check_config(path: Path, config: dict[str, Any]) -> tuple[str, list[str]]:
    """Refuse (one line, naming the field) anything the decoder graph would not compute exactly; returns the
    architecture and the bookkeeping fields accepted because transformers defines and reads none of them."""
    from transformers import LlamaConfig

    from edgecompile.families.config_fields import undefined_fields

    architecture = (config.get("architectures") or ["LlamaForCausalLM"])[0]
    if architecture not in ARCHITECTURES:
        raise input_error(path, "'architectures'", " or ".join(ARCHITECTURES), repr(architecture))
    ignored = undefined_fields(config, LlamaConfig, IMPLEMENTED | INERT)
    for key in sorted(config):
        if key not in IMPLEMENTED and key not in INERT and key not in ignored:
            raise InputError(f"{path}: field '{key}' is not implemented by edgecompile's llama family "
                             f"(value {config[key]!r:.60}); expected it absent")
    for key, expected in EXPECTED.items():
        if key in config and config[key] != expected:
            raise input_error(path, f"'{key}'", repr(expected), repr(config[key]))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise input_error(path, f"'{key}'", "a positive integer", repr(value))
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise input_error(path, "'num_key_value_heads'", f"a positive divisor of num_attention_heads ({heads})", repr(kv))
    if "head_dim" not in config and config["hidden_size"] % heads:
        raise input_error(path, "'hidden_size' / 'num_attention_heads'", "an integer head size", f"{config['hidden_size']} / {heads}")
    if "rope_parameters" in config and transformers_major() < 5:
        import transformers

        raise InputError(
            f"{path}: field 'rope_parameters' was written by transformers 5; the installed transformers "
            f"{transformers.__version__} would read this model with rope_theta 10000 and no scaling (a different model); "
            "install transformers>=5"
        )
    if "rope_parameters" in config and config.get("rope_scaling"):
        # transformers 5 never writes both; given both it applies rope_scaling, so reading either one alone could
        # compile a different RoPE than the model has
        raise input_error(path, "'rope_scaling'", "absent beside 'rope_parameters' (transformers 5 keeps RoPE there)",
                          json.dumps(config["rope_scaling"]))
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise input_error(path, "rope type", " or ".join(ROPE_TYPES), repr(rope_type))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise input_error(path, "'partial_rotary_factor'", "1.0", repr(rope["partial_rotary_factor"]))
    n_future = config.get("n_future_tokens", 1)
    if isinstance(n_future, bool) or not isinstance(n_future, int) or n_future < 1:
        raise input_error(path, "'n_future_tokens'", "a positive integer", repr(n_future))
    return architecture, ignored


def inverse_frequencies(dims: LlamaDims) -> np.ndarray:
    """RoPE inverse frequencies per rope type, float32, as the Llama papers define them."""
    import torch

    rope = dims.rope
    base = float(rope.get("rope_theta", 10000.0))
    d = dims.head_dim
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float) / d))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(rope["factor"])
    elif kind == "llama3":
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_context = float(rope["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv.numpy().astype(np.float32)


def rotary_caches(dims: LlamaDims) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin of position * inverse frequency, [max_positions, head_dim / 2] (GroupQueryAttention's layout)."""
    import torch

    inv = torch.from_numpy(inverse_frequencies(dims))
    positions = torch.arange(dims.max_positions, dtype=torch.int64).float()
    angles = positions[:, None] * inv[None, :]
    return angles.cos().numpy(), angles.sin().numpy()


# ---------------------------------------------------------------------------------------------------
# the decoder graph

def kv_names(layer: int) -> tuple[str, str, str, str]:
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", f"present.{layer}.key", f"present.{layer}.value")


def _rms_norm(w: GraphWriter, x: ir.Value, weight: np.ndarray, module: str, eps: float) -> ir.Value:
    return w.op("SimplifiedLayerNormalization", [x, w.const(f"{module}.weight", weight)], module, name="LayerNorm",
                axis=-1, epsilon=eps, stash_type=1)


def _linear(w: GraphWriter, x: ir.Value, weights: dict[str, np.ndarray], module: str) -> ir.Value:
    weight = np.ascontiguousarray(weights[f"{module}.weight"].T)
    return w.op("MatMul", [x, w.const(f"{module}.weight_t", weight)], module)


@dataclass
class _Shared:
    """Values every decoder layer reads."""

    seqlens_k: ir.Value
    total_length: ir.Value
    cos: ir.Value
    sin: ir.Value


def _decoder_layer(w: GraphWriter, x: ir.Value, weights: dict[str, np.ndarray], prefix: str, kv_index: int, dims: LlamaDims,
                   shared: _Shared, inputs: list[ir.Value], outputs: list[ir.Value]) -> ir.Value:
    """One pre-norm decoder layer whose parameters are `{prefix}.*`, its KV cache named by `kv_index`."""
    n = _rms_norm(w, x, weights[f"{prefix}.input_layernorm.weight"], f"{prefix}.input_layernorm", dims.eps)
    attn = f"{prefix}.self_attn"
    q, k, v = (_linear(w, n, weights, f"{attn}.{p}_proj") for p in ("q", "k", "v"))
    past_k, past_v, present_k, present_v = kv_names(kv_index)
    cache_dims = ["batch_size", dims.kv_heads, "past_sequence_length", dims.head_dim]
    past = [tensor_value(past_k, ir.DataType.FLOAT, cache_dims), tensor_value(past_v, ir.DataType.FLOAT, cache_dims)]
    inputs.extend(past)
    context, key, value = w.op(
        "GroupQueryAttention", [q, k, v, *past, shared.seqlens_k, shared.total_length, shared.cos, shared.sin], attn,
        domain=MS_DOMAIN, outputs=3, num_heads=dims.heads, kv_num_heads=dims.kv_heads, scale=1.0 / math.sqrt(dims.head_dim),
        do_rotary=1, rotary_interleaved=0, local_window_size=-1,
    )
    key.name, value.name = present_k, present_v
    present_dims = ["batch_size", dims.kv_heads, "total_sequence_length", dims.head_dim]
    for out in (key, value):
        out.shape, out.type = ir.Shape(present_dims), ir.TensorType(ir.DataType.FLOAT)
    outputs.extend([key, value])
    context.producer().metadata_props[HEAD_IDS_KEY] = ",".join(str(h) for h in range(dims.heads))
    x = w.op("Add", [x, _linear(w, context, weights, f"{attn}.o_proj")], prefix, name="attention_residual/Add")
    n = _rms_norm(w, x, weights[f"{prefix}.post_attention_layernorm.weight"], f"{prefix}.post_attention_layernorm", dims.eps)
    mlp = f"{prefix}.mlp"
    gate = _linear(w, n, weights, f"{mlp}.gate_proj")
    silu = w.op("Mul", [gate, w.op("Sigmoid", [gate], f"{mlp}.act_fn")], f"{mlp}.act_fn")
    hidden = w.op("Mul", [silu, _linear(w, n, weights, f"{mlp}.up_proj")], mlp)
    return w.op("Add", [x, _linear(w, hidden, weights, f"{mlp}.down_proj")], prefix, name="mlp_residual/Add")


def export_decoder(weights: dict[str, np.ndarray], dims: LlamaDims, name: str = "dense") -> ir.Model:
    """The dense decoder graph (see the module docstring), fp32, dynamic batch and lengths.

    With multi-token-prediction heads (`dims.extra_heads` > 0, weights `extra_heads.{j}.*`), the
    trunk (layers 0..L-2) runs once; head 0 is layer L-1 and gives `logits`; extra head j takes the
    trunk output too and gives `logits_{j+1}` (token t+2+j), with its KV cache at index L+j. All
    heads share the final norm and the unembedding.
    """
    w = GraphWriter()
    input_ids = tensor_value("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
    attention_mask = tensor_value("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
    inputs, outputs = [input_ids, attention_mask], []
    helper = "model.attention_inputs"
    one = w.const("model.attention_inputs.one", np.array([1], np.int64))
    lengths = w.op("ReduceSum", [attention_mask, one], helper, keepdims=0)
    seqlens_k = w.op("Cast", [w.op("Sub", [lengths, one], helper)], helper, to=int(ir.DataType.INT32))
    total = w.op("Gather", [w.op("Shape", [attention_mask], helper), w.const("model.attention_inputs.axis", np.array(1, np.int64))],
                 helper, axis=0)
    total_length = w.op("Cast", [total], helper, name="Cast_total", to=int(ir.DataType.INT32))
    cos, sin = rotary_caches(dims)
    shared = _Shared(seqlens_k, total_length, w.const("model.rotary_emb.cos_cache", cos), w.const("model.rotary_emb.sin_cache", sin))

    x = w.op("Gather", [w.const("model.embed_tokens.weight", weights["model.embed_tokens.weight"]), input_ids], "model.embed_tokens", axis=0)
    trunk_layers = dims.layers - 1 if dims.extra_heads else dims.layers
    for i in range(trunk_layers):
        x = _decoder_layer(w, x, weights, f"model.layers.{i}", i, dims, shared, inputs, outputs)
    heads = [("logits", f"model.layers.{dims.layers - 1}", dims.layers - 1)] if dims.extra_heads else []
    heads += [(f"logits_{j + 1}", f"extra_heads.{j}", dims.layers + j) for j in range(dims.extra_heads)]
    lm_head = weights["model.embed_tokens.weight"] if dims.tied else weights["lm_head.weight"]
    unembedding = w.const("lm_head.weight_t", np.ascontiguousarray(lm_head.T))
    norm = w.const("model.norm.weight", weights["model.norm.weight"])
    logits_outputs = []
    for output_name, prefix, kv_index in heads or [("logits", None, None)]:
        h = x if prefix is None else _decoder_layer(w, x, weights, prefix, kv_index, dims, shared, inputs, outputs)
        suffix = "" if output_name == "logits" else f"_{output_name}"
        n = w.op("SimplifiedLayerNormalization", [h, norm], "model.norm", name=f"LayerNorm{suffix}", axis=-1,
                 epsilon=dims.eps, stash_type=1)
        logits = w.op("MatMul", [n, unembedding], "lm_head", name=f"MatMul{suffix}")
        logits.name = output_name
        logits.shape, logits.type = ir.Shape(["batch_size", "sequence_length", dims.vocab]), ir.TensorType(ir.DataType.FLOAT)
        logits_outputs.append(logits)
    return w.model(name, inputs, logits_outputs + outputs, {"": OPSET, MS_DOMAIN: 1})



# ---------------------------------------------------------------------------------------------------
# where the sub-layers are (for the pruning passes) and the reference gates

def _head_ids(node: ir.Node) -> np.ndarray:
    return np.array([int(h) for h in node.metadata_props[HEAD_IDS_KEY].split(",") if h], np.int64)


def _resize_attention(node: ir.Node):
    """The family's `on_resize`: a GroupQueryAttention's head counts, head ids and KV shapes follow the kept heads."""

    def resize(kept_units: np.ndarray, kept_groups: np.ndarray) -> None:
        node.metadata_props[HEAD_IDS_KEY] = ",".join(str(h) for h in _head_ids(node)[kept_units])
        node.attributes["num_heads"] = ir.AttrInt64("num_heads", int(kept_units.size))
        node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", int(kept_groups.size))
        for value in list(node.inputs[3:5]) + list(node.outputs[1:3]):
            if value is not None and value.shape is not None:
                dims = list(value.shape)
                dims[1] = int(kept_groups.size)
                value.shape = ir.Shape(dims)

    return resize


@dataclass(frozen=True)
class LlamaStructure:
    """Where a decoder graph's layers are (pre-norm: each branch's RMSNorm goes with it)."""

    num_layers: int
    head_dim: int
    lowbit_modules: frozenset[str] = frozenset()

    def find_layers(self, model: ir.Model) -> list[LayerSites]:
        by_module = nodes_by_module(model)
        inputs = {v.name: v for v in model.graph.inputs}
        outputs = {v.name: v for v in model.graph.outputs}

        def site(path: str):
            return linear_site(path, by_module.get(path, []), bias=False)

        layers = []
        for i in range(self.num_layers):
            prefix = f"model.layers.{i}"
            attention = ffn = None
            o_proj = site(f"{prefix}.self_attn.o_proj")
            add = residual_add(prefix, by_module.get(prefix, []), o_proj) if o_proj else None
            cores = [n for n in by_module.get(f"{prefix}.self_attn", []) if n.op_type == "GroupQueryAttention"]
            if add is not None and len(cores) == 1:
                core = cores[0]
                ids = _head_ids(core)
                per_group = int(core.attributes["num_heads"].value) // int(core.attributes["kv_num_heads"].value)
                past_k, past_v, present_k, present_v = kv_names(i)
                attention = BranchSites(
                    add, [site(f"{prefix}.self_attn.q_proj")], o_proj, unit_size=self.head_dim, unit_ids=ids,
                    unit_groups=np.arange(len(ids)) // per_group,
                    group_ups=[site(f"{prefix}.self_attn.k_proj"), site(f"{prefix}.self_attn.v_proj")],
                    state_inputs=[inputs[n] for n in (past_k, past_v) if n in inputs],
                    state_outputs=[outputs[n] for n in (present_k, present_v) if n in outputs],
                    on_resize=_resize_attention(core),
                )
            down = site(f"{prefix}.mlp.down_proj")
            add = residual_add(prefix, by_module.get(prefix, []), down) if down else None
            if add is not None:
                ffn = BranchSites(add, [site(f"{prefix}.mlp.gate_proj"), site(f"{prefix}.mlp.up_proj")], down)
            layers.append(LayerSites(i, attention, ffn))
        return layers


def gated_linears(model: Any) -> list[tuple[tuple[Any, str], tuple[Any, str]]]:
    """Per layer of a transformers LlamaForCausalLM: (parent, attribute) of o_proj and of down_proj."""
    return [((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")) for layer in model.model.layers]


# ---------------------------------------------------------------------------------------------------
# loading: the checkpoint's tensors (for the graph) and transformers' model (the parity reference)

LAYER_TENSORS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    *(f"self_attn.{p}_proj.weight" for p in "qkvo"), *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
)


def expected_shapes(dims: LlamaDims) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of these dimensions holds, with its shape (the contract, nothing more)."""
    h, d = dims.hidden, dims.head_dim
    layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (dims.heads * d, h), "self_attn.k_proj.weight": (dims.kv_heads * d, h),
        "self_attn.v_proj.weight": (dims.kv_heads * d, h), "self_attn.o_proj.weight": (h, dims.heads * d),
        "mlp.gate_proj.weight": (dims.intermediate, h), "mlp.up_proj.weight": (dims.intermediate, h),
        "mlp.down_proj.weight": (h, dims.intermediate),
    }
    shapes = {"model.embed_tokens.weight": (dims.vocab, h), "model.norm.weight": (h,)}
    if not dims.tied:
        shapes["lm_head.weight"] = (dims.vocab, h)
    prefixes = [f"model.layers.{i}" for i in range(dims.layers)] + [f"extra_heads.{j}" for j in range(dims.extra_heads)]
    for prefix in prefixes:
        shapes.update({f"{prefix}.{name}": shape for name, shape in layer.items()})
    return shapes


def load_weights(path: Path, dims: LlamaDims) -> dict[str, np.ndarray]:
    """model.safetensors as float32 arrays; a missing, unexpected, misshapen or non-finite tensor is an error naming it."""
    from safetensors import safe_open

    expected = expected_shapes(dims)
    weights: dict[str, np.ndarray] = {}
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        if dims.tied and "lm_head.weight" in names:  # transformers may save the tied copy; the graph reads embed_tokens
            names.discard("lm_head.weight")
            if "model.embed_tokens.weight" in names and not handle.get_tensor("lm_head.weight").equal(
                    handle.get_tensor("model.embed_tokens.weight")):
                raise input_error(path.parent / "config.json", "'tie_word_embeddings'", "false (model.safetensors holds an "
                                  "lm_head.weight that differs from model.embed_tokens.weight: which one transformers "
                                  "uses depends on its release)", "true")
        missing = sorted(set(expected) - names)
        if missing:
            raise input_error(path, f"tensor {missing[0]}", f"present (shape {list(expected[missing[0]])})",
                              "missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unexpected = sorted(n for n in names - set(expected) if not n.endswith("rotary_emb.inv_freq"))
        if unexpected:
            raise input_error(path, f"tensor {unexpected[0]}", "only the tensors config.json describes",
                              "an unexpected tensor" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        for name, shape in expected.items():
            tensor = handle.get_tensor(name)
            if tuple(tensor.shape) != shape:
                raise input_error(path, f"tensor {name} shape", list(shape), list(tensor.shape))
            array = tensor.float().numpy()
            if not np.isfinite(array).all():
                raise input_error(path, f"tensor {name}", "finite values", "NaN or Inf")
            weights[name] = array
    return weights


def load_reference(directory: Path) -> Any:
    """transformers' own LlamaForCausalLM, fp32, eager attention, eval mode: the parity oracle."""
    import logging

    import torch
    import transformers
    from transformers import LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = LlamaForCausalLM.from_pretrained(str(directory), attn_implementation="eager", dtype=torch.float32,
                                             local_files_only=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# what a cluster keeps, and its MACs per decoded token

def kept_structure(dims: LlamaDims, blocks: np.ndarray, heads: np.ndarray, neurons: np.ndarray) -> dict[str, Any]:
    """Per layer what the cluster graph computes, the way the passes rewrite it (see passes/prune_units.py).

    Under grouped-query attention a query head leaves the graph only with its whole group (then its
    KV head goes too); a removed head in a kept group is still computed, multiplied by 0
    (`heads_zeroed`). A layer whose attention keeps no head has no attention and no KV cache.
    """
    per_group = dims.heads // dims.kv_heads
    layers = []
    for i in range(dims.layers):
        gates = heads[i]
        groups = sorted({int(h) // per_group for h in np.flatnonzero(gates)})
        attention = bool(blocks[i, 0] != 0) and bool(groups)
        computed = [h for g in groups for h in range(g * per_group, (g + 1) * per_group)] if attention else []
        ffn = bool(blocks[i, 1] != 0) and bool(np.count_nonzero(neurons[i]))
        layers.append({
            "layer": i, "attention": attention, "ffn": ffn,
            "heads": [h for h in computed if gates[h] != 0], "heads_zeroed": [h for h in computed if gates[h] == 0],
            "kv_heads": groups if attention else [], "neurons": int(np.count_nonzero(neurons[i])) if ffn else 0,
        })
    return {
        "layers": layers,
        "attention_blocks_kept": sum(layer["attention"] for layer in layers),
        "ffn_blocks_kept": sum(layer["ffn"] for layer in layers),
        "heads_kept": sum(len(layer["heads"]) for layer in layers),
        "kv_heads_kept": sum(len(layer["kv_heads"]) for layer in layers),
        "neurons_kept": sum(layer["neurons"] for layer in layers),
    }


def macs_per_token(dims: LlamaDims, kept: dict[str, Any], context: int = 128) -> dict[str, int]:
    """Weight MACs per decoded token (projections, lm_head included) and attention MACs at `context` tokens.

    Multi-token-prediction heads (never pruned) are counted too: every forward pass computes them.
    """
    h, d = dims.hidden, dims.head_dim
    linear = attention = 0
    full_layer = {"heads": list(range(dims.heads)), "heads_zeroed": [], "kv_heads": list(range(dims.kv_heads)),
                  "neurons": dims.intermediate}
    for layer in kept["layers"] + [full_layer] * dims.extra_heads:
        q = (len(layer["heads"]) + len(layer["heads_zeroed"])) * d
        linear += 2 * h * q + 2 * h * len(layer["kv_heads"]) * d + 3 * h * layer["neurons"]
        attention += 2 * context * q
    linear += h * dims.vocab * (1 + dims.extra_heads)
    return {"context": context, "linear": linear, "attention": attention, "total": linear + attention}
