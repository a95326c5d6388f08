"""What decoder language-model families share: config rules, dimensions, RoPE, the decoder graph, where its
sub-layers are, its gates, the checkpoint's tensors, the reference model, MACs.

A family (families/llama.py, qwen2.py, qwen3.py, gemma3.py) is a `DecoderFamily` subclass that sets what
differs: the config fields it implements, q/k/v biases, per-head q/k norms, norms on the branch outputs,
the activation, the embedding scale, per-layer sliding windows and RoPE. The graph is written directly
from the checkpoint's weights (no tracing), in onnxruntime-genai's I/O conventions so its apps load it:

  inputs   input_ids [batch, sequence_length], attention_mask [batch, total_sequence_length],
           past_key_values.{i}.key|value [batch, kv_heads_i, past_sequence_length, head_dim]
  outputs  logits [batch, sequence_length, vocab], present.{i}.key|value

with `i` the original layer index: a cluster that removes layer i's attention has no KV for i.
One graph serves prefill and decode. Per layer (pre-norm, so a removed branch is the identity):

  x += post_attn_norm?(o_proj(GroupQueryAttention(qk_norm?(q, k, v)(n), past, rotary)))   n = input_norm(x)
  x += post_ffn_norm?(down_proj(act(gate_proj(n)) * up_proj(n)))                          n = ffn_norm(x)

RoPE is computed here from config.json, independently of transformers, so the parity gate (whose
reference is transformers' own model) would see a config that one of the two reads differently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from edgecompile.errors import InputError, input_error
from edgecompile.families.base import CAUSAL_LM, ConfigCheck, Family
from edgecompile.families.graph_writer import GraphWriter, tensor_value
from edgecompile.inputs.compat import transformers_major
from edgecompile.inputs.student import StudentSpec
from edgecompile.passes.sites import HEAD_IDS_KEY, BranchSites, LayerSites, linear_site, nodes_by_module, residual_add

MS_DOMAIN = "com.microsoft"
OPSET = 17
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# config.json fields every decoder family implements (their values are checked below) ...
IMPLEMENTED = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "rope_theta", "rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id",
})
# ... and fields that do not change an inference forward pass (training, bookkeeping, generation defaults
# that `run` and parity do not use: they decode greedily).
INERT = frozenset({
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
})
COMMON_EXPECTED = {"is_encoder_decoder": False, "add_cross_attention": False}


@dataclass(frozen=True)
class DecoderDims:
    """A decoder checkpoint's dimensions, per-layer attention (RoPE, sliding window) and multi-token heads."""

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
    rope: dict[str, Any] = field(default_factory=dict)  # as config.json gives it (the manifest records it)
    layer_ropes: tuple[dict[str, Any], ...] = ()  # per layer: rope_type, rope_theta, scaling parameters
    windows: tuple[int, ...] = ()  # per layer: -1 full attention, else the sliding window in tokens
    scale: float = 0.0  # attention's softmax scale
    extra_heads: int = 0  # multi-token prediction: heads beyond the next-token one

    def window(self, layer: int) -> int:
        return self.windows[layer] if layer < len(self.windows) else -1

    def layer_rope(self, layer: int) -> dict[str, Any]:
        return self.layer_ropes[min(layer, len(self.layer_ropes) - 1)]


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings as transformers 5 stores them (`rope_parameters`), from either major's config.json."""
    if "rope_parameters" in config:
        return dict(config["rope_parameters"] or {})
    scaling = dict(config.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    return {"rope_type": rope_type, "rope_theta": config.get("rope_theta", 10000.0), **scaling}


def _positive(path: Path, config: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise input_error(path, f"'{key}'", "a positive integer", repr(value))


class DecoderFamily(Family):
    """A decoder LM family; subclasses set the class attributes (and override hooks where the graph differs)."""

    task = CAUSAL_LM
    opset = OPSET
    graph_prefix = ""  # the graph's module paths are the Hugging Face names
    genai_type: ClassVar[str]  # onnxruntime-genai's model type (genai_config.json model.type)
    config_class: ClassVar[str]  # transformers' config class, e.g. "LlamaConfig"
    model_class: ClassVar[str]  # transformers' causal LM, e.g. "LlamaForCausalLM"
    layer_module: ClassVar[str]  # the transformers module holding its decoder layer class, for multi-token heads
    layer_class: ClassVar[str]
    implemented: ClassVar[frozenset[str]] = frozenset()  # the family's fields beyond IMPLEMENTED
    expected: ClassVar[dict[str, Any]] = {}  # fields with the one value the graph implements
    rope_types: ClassVar[tuple[str, ...]] = ("default", "linear", "llama3")
    multi_token_heads: ClassVar[bool] = False  # the `extra_heads.{j}.` contract (families/mtp.py)
    # the layer's form
    qkv_bias: ClassVar[bool] = False  # q/k/v projections have biases (o_proj never)
    qk_norm: ClassVar[bool] = False  # RMSNorm over head_dim on q and k, before RoPE
    ffn_norm: ClassVar[str] = "post_attention_layernorm"  # the norm before the MLP (Llama's name for it)
    branch_norms: ClassVar[tuple[str, str] | None] = None  # norms on the attention / MLP branch outputs (Gemma)
    norm_offset: ClassVar[float] = 0.0  # norms scale by (offset + weight) (Gemma: 1)
    activation: ClassVar[str] = "silu"  # of the gated MLP: "silu" or "gelu_tanh"
    embedding_scale: ClassVar[bool] = False  # embeddings multiplied by sqrt(hidden) (Gemma)

    # ------------------------------------------------------------------------------------------------
    # config rules

    @classmethod
    def check_config(cls, path: Path, config: dict[str, Any], *, sentence_transformers: bool = False) -> ConfigCheck:
        """Refuse (one line, naming the field) anything the decoder graph would not compute exactly; accept the
        bookkeeping fields transformers defines and reads none of (families/config_fields.py)."""
        import transformers

        from edgecompile.families.config_fields import undefined_fields

        architecture = (config.get("architectures") or [cls.architectures[0]])[0]
        if architecture not in cls.architectures:
            raise input_error(path, "'architectures'", " or ".join(cls.architectures), repr(architecture))
        known = IMPLEMENTED | INERT | cls.implemented | ({"n_future_tokens"} if cls.multi_token_heads else set())
        ignored = undefined_fields(config, getattr(transformers, cls.config_class), set(known))
        for key in sorted(config):
            if key not in known and key not in ignored:
                raise InputError(f"{path}: field '{key}' is not implemented by edgecompile's {cls.name} family "
                                 f"(value {config[key]!r:.60}); expected it absent")
        for key, expected in {**COMMON_EXPECTED, **cls.expected}.items():
            if key in config and config[key] != expected:
                raise input_error(path, f"'{key}'", repr(expected), repr(config[key]))
        _positive(path, config, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
        heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
        if not isinstance(kv, int) or kv <= 0 or heads % kv:
            raise input_error(path, "'num_key_value_heads'", f"a positive divisor of num_attention_heads ({heads})", repr(kv))
        if "head_dim" not in config and config["hidden_size"] % heads:
            raise input_error(path, "'hidden_size' / 'num_attention_heads'", "an integer head size", f"{config['hidden_size']} / {heads}")
        if "rope_parameters" in config and transformers_major() < 5:
            # name what transformers 4 would use instead: its config class's default rope_theta, no scaling
            theta = getattr(getattr(transformers, cls.config_class)(), "rope_theta", None)
            read_as = f"rope_theta {theta:g}" if isinstance(theta, (int, float)) else "its default RoPE"
            raise InputError(
                f"{path}: field 'rope_parameters' was written by transformers 5; the installed transformers "
                f"{transformers.__version__} would read this model with {read_as} and no scaling "
                "(a different model); install transformers>=5"
            )
        if "rope_parameters" in config and config.get("rope_scaling"):
            # transformers 5 never writes both; given both it applies rope_scaling, so reading either one alone could
            # compile a different RoPE than the model has
            raise input_error(path, "'rope_scaling'", "absent beside 'rope_parameters' (transformers 5 keeps RoPE there)",
                              json.dumps(config["rope_scaling"]))
        for rope in cls.layer_ropes(config):
            if rope.get("rope_type", "default") not in cls.rope_types:
                raise input_error(path, "rope type", " or ".join(cls.rope_types), repr(rope.get("rope_type")))
            if rope.get("partial_rotary_factor", 1.0) != 1.0:
                raise input_error(path, "'partial_rotary_factor'", "1.0", repr(rope["partial_rotary_factor"]))
        n_future = config.get("n_future_tokens", 1)
        if isinstance(n_future, bool) or not isinstance(n_future, int) or n_future < 1:
            raise input_error(path, "'n_future_tokens'", "a positive integer", repr(n_future))
        cls.check_layers(path, config)
        return ConfigCheck(architecture, tuple(ignored))

    @classmethod
    def check_layers(cls, path: Path, config: dict[str, Any]) -> None:
        """Family rules on per-layer attention (`layer_types`, sliding windows); by default every layer is full."""
        layer_types = config.get("layer_types")
        if layer_types is not None and any(t != FULL_ATTENTION for t in layer_types):
            raise input_error(path, "'layer_types'", f"'{FULL_ATTENTION}' for every layer", json.dumps(layer_types)[:80])

    @classmethod
    def student_spec(cls, checkpoint: Any, check: ConfigCheck, weight_names: set[str]) -> StudentSpec:
        config = checkpoint.config
        return StudentSpec(checkpoint.path, cls.name, check.architecture, checkpoint.transformer_dir, config,
                           max_seq_length=int(config.get("max_position_embeddings", 2048)), ignored_fields=check.ignored,
                           task=CAUSAL_LM)

    # ------------------------------------------------------------------------------------------------
    # dimensions and RoPE

    @classmethod
    def layer_ropes(cls, config: dict[str, Any]) -> list[dict[str, Any]]:
        """RoPE settings per layer (one shared by every layer, unless a family's layers differ)."""
        return [rope_parameters(config)] * int(config["num_hidden_layers"])

    @classmethod
    def layer_windows(cls, config: dict[str, Any]) -> list[int]:
        return [-1] * int(config["num_hidden_layers"])

    @classmethod
    def attention_scale(cls, config: dict[str, Any], head_dim: int) -> float:
        return 1.0 / math.sqrt(head_dim)

    @classmethod
    def config_default(cls, key: str) -> Any:
        """What transformers' config class of the family assumes for a field config.json leaves out (a config saved by
        transformers 4 omits fields at their default: Gemma 3's tie_word_embeddings is true, Llama's false)."""
        from edgecompile.families.config_fields import class_default

        return class_default(cls.config_class, key)

    @classmethod
    def dims(cls, config: dict[str, Any]) -> DecoderDims:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        return DecoderDims(
            layers=int(config["num_hidden_layers"]), hidden=hidden, heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=head_dim,
            intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
            max_positions=int(config.get("max_position_embeddings", 2048)), eps=float(config.get("rms_norm_eps", 1e-6)),
            tied=bool(config.get("tie_word_embeddings", cls.config_default("tie_word_embeddings"))), rope=rope_parameters(config),
            layer_ropes=tuple(cls.layer_ropes(config)), windows=tuple(cls.layer_windows(config)),
            scale=cls.attention_scale(config, head_dim),
            extra_heads=max(int(config.get("n_future_tokens", 1)) - 1, 0) if cls.multi_token_heads else 0,
        )

    # ------------------------------------------------------------------------------------------------
    # the checkpoint's tensors, transformers' model

    @classmethod
    def layer_tensors(cls, dims: DecoderDims) -> dict[str, tuple[int, ...]]:
        """Every tensor of one decoder layer, with its shape."""
        h, d = dims.hidden, dims.head_dim
        shapes = {
            "input_layernorm.weight": (h,), f"{cls.ffn_norm}.weight": (h,),
            "self_attn.q_proj.weight": (dims.heads * d, h), "self_attn.k_proj.weight": (dims.kv_heads * d, h),
            "self_attn.v_proj.weight": (dims.kv_heads * d, h), "self_attn.o_proj.weight": (h, dims.heads * d),
            "mlp.gate_proj.weight": (dims.intermediate, h), "mlp.up_proj.weight": (dims.intermediate, h),
            "mlp.down_proj.weight": (h, dims.intermediate),
        }
        if cls.qkv_bias:
            shapes.update({"self_attn.q_proj.bias": (dims.heads * d,), "self_attn.k_proj.bias": (dims.kv_heads * d,),
                           "self_attn.v_proj.bias": (dims.kv_heads * d,)})
        if cls.qk_norm:
            shapes.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
        for norm in cls.branch_norms or ():
            shapes[f"{norm}.weight"] = (h,)
        return shapes

    @classmethod
    def expected_shapes(cls, dims: DecoderDims) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint of these dimensions holds, with its shape (the contract, nothing more)."""
        layer = cls.layer_tensors(dims)
        shapes = {"model.embed_tokens.weight": (dims.vocab, dims.hidden), "model.norm.weight": (dims.hidden,)}
        if not dims.tied:
            shapes["lm_head.weight"] = (dims.vocab, dims.hidden)
        prefixes = [f"model.layers.{i}" for i in range(dims.layers)] + [f"extra_heads.{j}" for j in range(dims.extra_heads)]
        for prefix in prefixes:
            shapes.update({f"{prefix}.{name}": shape for name, shape in layer.items()})
        return shapes

    @classmethod
    def load_weights(cls, path: Path, dims: DecoderDims) -> dict[str, np.ndarray]:
        """model.safetensors as float32 arrays; a missing, unexpected, misshapen or non-finite tensor is an error naming it."""
        from safetensors import safe_open

        expected = cls.expected_shapes(dims)
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

    @classmethod
    def load_reference(cls, directory: Path) -> Any:
        """transformers' own causal LM, fp32, eager attention, eval mode: the parity oracle."""
        import logging

        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        model_class = getattr(transformers, cls.model_class)
        model = model_class.from_pretrained(str(directory), attn_implementation="eager", dtype=torch.float32,
                                            local_files_only=True)
        return model.eval()

    @classmethod
    def decoder_layer(cls, config: Any) -> Any:
        """transformers' decoder layer of this family, built as the last layer (a multi-token-prediction head is one
        beside it: the same kind of attention; its index only names a KV cache, and the reference runs it without)."""
        import importlib

        layer = getattr(importlib.import_module(cls.layer_module), cls.layer_class)
        return layer(config, layer_idx=config.num_hidden_layers - 1)

    @classmethod
    def gates(cls, model: Any, dims: DecoderDims) -> Any:
        """The reference gates (reference/masks.py) on transformers' model: head and neuron gates on the inputs of
        o_proj and down_proj; block gates on what each branch adds to the residual stream."""
        from edgecompile.reference.masks import ModelGates

        layers = model.model.layers
        units = [((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")) for layer in layers]
        blocks = None
        if cls.branch_norms is not None:
            attention_norm, ffn_norm = cls.branch_norms
            blocks = [((layer, attention_norm), (layer, ffn_norm)) for layer in layers]
        return ModelGates(units, dims.head_dim, block_sites=blocks)

    # ------------------------------------------------------------------------------------------------
    # the decoder graph

    @classmethod
    def export(cls, weights: dict[str, np.ndarray], dims: DecoderDims, name: str = "dense") -> ir.Model:
        """The dense decoder graph (see the module docstring), fp32, dynamic batch and lengths.

        With multi-token-prediction heads (`dims.extra_heads` > 0, weights `extra_heads.{j}.*`), the
        trunk (layers 0..L-2) runs once; head 0 is layer L-1 and gives `logits`; extra head j takes the
        trunk output too and gives `logits_{j+1}` (token t+2+j), with its KV cache at index L+j. All
        heads share the final norm and the unembedding.
        """
        return _DecoderWriter(cls, weights, dims).model(name)

    @classmethod
    def structure(cls, dims: DecoderDims, lowbit_modules: frozenset[str] = frozenset()) -> "DecoderStructure":
        return DecoderStructure(cls, dims.layers, dims.head_dim, lowbit_modules)

    # ------------------------------------------------------------------------------------------------
    # the reference of a graph whose weights were quantized after pruning

    @classmethod
    def reference_weights(cls, dims: DecoderDims, weights: dict[str, np.ndarray], graph_weights: dict[str, np.ndarray],
                          masks: Any | None, unfolded: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        """The checkpoint tensors (Hugging Face names and layout) under which the gated reference computes exactly what a
        graph with these weights computes. `graph_weights`: module -> the graph's [K, N] weight as it reads it
        (dequantized), for a cluster with `masks` (None: the dense graph), rows and columns being what the cluster
        keeps (passes/prune_units.py) with its soft gates folded in, which are divided out again here; the head /
        neuron gates of `unfolded` modules (low-bit: their codes stay codes) are a Mul on the input instead."""
        d, per_group = dims.head_dim, dims.heads // dims.kv_heads
        result: dict[str, np.ndarray] = {}

        def place(name: str, read: np.ndarray, rows: np.ndarray | None = None, columns: np.ndarray | None = None,
                  scale: np.ndarray | None = None) -> None:
            full = result.get(name, weights[name]).copy()  # [N, K] as Hugging Face stores it
            block = read.T if scale is None else read.T / np.where(scale == 0, 1, scale)[None, :]
            rows_out = slice(None) if columns is None else columns
            cols_in = slice(None) if rows is None else rows
            full[np.ix_(np.arange(full.shape[0])[rows_out], np.arange(full.shape[1])[cols_in])] = block
            result[name] = full.astype(np.float32)

        def features(units: np.ndarray) -> np.ndarray:
            return (np.asarray(units, np.int64)[:, None] * d + np.arange(d)[None, :]).reshape(-1)

        for module, read in graph_weights.items():
            if module == "lm_head":
                place("model.embed_tokens.weight" if dims.tied else "lm_head.weight", read)
                continue
            prefix, _, projection = module.rpartition(".")
            layer = int(prefix.split(".")[2]) if prefix.startswith("model.layers.") else None
            gated = masks is not None and layer is not None
            blocks = masks.blocks[layer] if gated else np.ones(2, np.float32)
            if projection in ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj"):
                gates = masks.heads[layer] if gated else np.ones(dims.heads, np.float32)
                groups = np.unique(np.flatnonzero(gates) // per_group)
                heads = np.array([h for g in groups for h in range(g * per_group, (g + 1) * per_group)], np.int64)
                q, kv = features(heads), features(groups)
                if projection == "qkv_proj":
                    parts = np.split(read, [q.size, q.size + kv.size], axis=1)
                    for name, part, columns in zip(("q_proj", "k_proj", "v_proj"), parts, (q, kv, kv)):
                        place(f"{prefix.rsplit('.', 1)[0]}.self_attn.{name}.weight", part, columns=columns)
                elif projection == "o_proj":
                    output = 1.0 if cls.branch_norms else float(blocks[0])  # Gemma scales its output norm instead
                    units = np.ones(q.size, np.float32) if module in unfolded else np.repeat(gates[heads], d)
                    place(f"{module}.weight", read, rows=q, scale=units * output)
                else:
                    place(f"{module}.weight", read, columns=q if projection == "q_proj" else kv)
            elif projection in ("gate_proj", "up_proj", "down_proj"):
                gates = masks.neurons[layer] if gated else np.ones(dims.intermediate, np.float32)
                kept = np.flatnonzero(gates)
                if projection == "down_proj":
                    output = 1.0 if cls.branch_norms else float(blocks[1])
                    units = np.ones(kept.size, np.float32) if module in unfolded else gates[kept]
                    place(f"{module}.weight", read, rows=kept, scale=units * output)
                else:
                    place(f"{module}.weight", read, columns=kept)
            else:
                raise ValueError(f"{module}: not a Linear of the {cls.name} family")
        return result

    # ------------------------------------------------------------------------------------------------
    # what a cluster keeps, and its MACs per decoded token

    @classmethod
    def kept_structure(cls, dims: DecoderDims, blocks: np.ndarray, heads: np.ndarray, neurons: np.ndarray) -> dict[str, Any]:
        return kept_structure(dims, blocks, heads, neurons)

    @classmethod
    def macs_per_token(cls, dims: DecoderDims, kept: dict[str, Any], context: int = 128) -> dict[str, int]:
        return macs_per_token(dims, kept, context)


# ---------------------------------------------------------------------------------------------------
# RoPE

def inverse_frequencies(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """RoPE inverse frequencies per rope type, float32, as the Llama papers define them."""
    import torch

    base = float(rope.get("rope_theta", 10000.0))
    d = head_dim
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


def rotary_caches(rope: dict[str, Any], head_dim: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin of position * inverse frequency, [positions, head_dim / 2] (GroupQueryAttention's layout)."""
    import torch

    inv = torch.from_numpy(inverse_frequencies(rope, head_dim))
    angles = torch.arange(positions, dtype=torch.int64).float()[:, None] * inv[None, :]
    return angles.cos().numpy(), angles.sin().numpy()


# ---------------------------------------------------------------------------------------------------
# the decoder graph

def kv_names(layer: int) -> tuple[str, str, str, str]:
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", f"present.{layer}.key", f"present.{layer}.value")


class _DecoderWriter:
    """Writes one family's decoder graph from the checkpoint's tensors."""

    def __init__(self, family: type[DecoderFamily], weights: dict[str, np.ndarray], dims: DecoderDims) -> None:
        self.family, self.weights, self.dims = family, weights, dims
        self.w = GraphWriter()
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self.rotary: dict[str, tuple[ir.Value, ir.Value]] = {}  # RoPE settings (as JSON) -> cos / sin caches
        self.norm_weights: dict[str, ir.Value] = {}

    def norm(self, x: ir.Value, module: str, name: str = "LayerNorm") -> ir.Value:
        if module not in self.norm_weights:  # the final norm serves every multi-token head: one initializer
            weight = self.weights[f"{module}.weight"]
            if self.family.norm_offset:
                weight = (np.float32(self.family.norm_offset) + weight).astype(np.float32)  # Gemma scales by (1 + w)
            self.norm_weights[module] = self.w.const(f"{module}.weight", weight)
        return self.w.op("SimplifiedLayerNormalization", [x, self.norm_weights[module]], module, name=name,
                         axis=-1, epsilon=self.dims.eps, stash_type=1)

    def linear(self, x: ir.Value, module: str) -> ir.Value:
        weight = np.ascontiguousarray(self.weights[f"{module}.weight"].T)
        y = self.w.op("MatMul", [x, self.w.const(f"{module}.weight_t", weight)], module)
        if f"{module}.bias" in self.weights:
            y = self.w.op("Add", [y, self.w.const(f"{module}.bias", self.weights[f"{module}.bias"])], module)
        return y

    def head_norm(self, x: ir.Value, module: str) -> ir.Value:
        """RMSNorm over each head's features ([B, S, heads * d] -> per head -> back; the head count is never baked in)."""
        d = self.dims.head_dim
        heads = self.w.op("Reshape", [x, self.w.const(f"{module}.per_head", np.array([0, 0, -1, d], np.int64))], module)
        normed = self.norm(heads, module)
        return self.w.op("Reshape", [normed, self.w.const(f"{module}.flat", np.array([0, 0, -1], np.int64))], module)

    def rope(self, layer: int) -> tuple[ir.Value, ir.Value]:
        settings = self.dims.layer_rope(layer)
        key = json.dumps(settings, sort_keys=True)
        if key not in self.rotary:
            cos, sin = rotary_caches(settings, self.dims.head_dim, self.dims.max_positions)
            suffix = "" if not self.rotary else f"_{len(self.rotary)}"
            self.rotary[key] = (self.w.const(f"model.rotary_emb.cos_cache{suffix}", cos),
                                self.w.const(f"model.rotary_emb.sin_cache{suffix}", sin))
        return self.rotary[key]

    def activation(self, gate: ir.Value, module: str) -> ir.Value:
        if self.family.activation == "gelu_tanh":  # gelu_pytorch_tanh: onnxruntime's FastGelu is that formula
            return self.w.op("FastGelu", [gate], module, domain=MS_DOMAIN)
        return self.w.op("Mul", [gate, self.w.op("Sigmoid", [gate], module)], module)

    def layer(self, x: ir.Value, prefix: str, kv_index: int, rope_layer: int) -> ir.Value:
        """One pre-norm decoder layer whose parameters are `{prefix}.*`, its KV cache named by `kv_index`."""
        family, dims, w = self.family, self.dims, self.w
        n = self.norm(x, f"{prefix}.input_layernorm")
        attn = f"{prefix}.self_attn"
        q, k, v = (self.linear(n, f"{attn}.{p}_proj") for p in ("q", "k", "v"))
        if family.qk_norm:
            q, k = self.head_norm(q, f"{attn}.q_norm"), self.head_norm(k, f"{attn}.k_norm")
        past_k, past_v, present_k, present_v = kv_names(kv_index)
        cache_dims = ["batch_size", dims.kv_heads, "past_sequence_length", dims.head_dim]
        past = [tensor_value(past_k, ir.DataType.FLOAT, cache_dims), tensor_value(past_v, ir.DataType.FLOAT, cache_dims)]
        self.inputs.extend(past)
        cos, sin = self.rope(rope_layer)
        context, key, value = w.op(
            "GroupQueryAttention", [q, k, v, *past, self.seqlens_k, self.total_length, cos, sin], attn,
            domain=MS_DOMAIN, outputs=3, num_heads=dims.heads, kv_num_heads=dims.kv_heads, scale=dims.scale,
            do_rotary=1, rotary_interleaved=0, local_window_size=dims.window(rope_layer),
        )
        key.name, value.name = present_k, present_v
        present_dims = ["batch_size", dims.kv_heads, "total_sequence_length", dims.head_dim]
        for out in (key, value):
            out.shape, out.type = ir.Shape(present_dims), ir.TensorType(ir.DataType.FLOAT)
        self.outputs.extend([key, value])
        context.producer().metadata_props[HEAD_IDS_KEY] = ",".join(str(h) for h in range(dims.heads))
        branch = self.linear(context, f"{attn}.o_proj")
        if family.branch_norms:
            branch = self.norm(branch, f"{prefix}.{family.branch_norms[0]}")
        x = w.op("Add", [x, branch], prefix, name="attention_residual/Add")
        n = self.norm(x, f"{prefix}.{family.ffn_norm}")
        mlp = f"{prefix}.mlp"
        gate = self.activation(self.linear(n, f"{mlp}.gate_proj"), f"{mlp}.act_fn")
        hidden = w.op("Mul", [gate, self.linear(n, f"{mlp}.up_proj")], mlp)
        branch = self.linear(hidden, f"{mlp}.down_proj")
        if family.branch_norms:
            branch = self.norm(branch, f"{prefix}.{family.branch_norms[1]}")
        return w.op("Add", [x, branch], prefix, name="mlp_residual/Add")

    def model(self, name: str) -> ir.Model:
        w, dims, weights = self.w, self.dims, self.weights
        input_ids = tensor_value("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        attention_mask = tensor_value("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
        self.inputs = [input_ids, attention_mask]
        helper = "model.attention_inputs"
        one = w.const("model.attention_inputs.one", np.array([1], np.int64))
        lengths = w.op("ReduceSum", [attention_mask, one], helper, keepdims=0)
        self.seqlens_k = w.op("Cast", [w.op("Sub", [lengths, one], helper)], helper, to=int(ir.DataType.INT32))
        total = w.op("Gather", [w.op("Shape", [attention_mask], helper),
                                w.const("model.attention_inputs.axis", np.array(1, np.int64))], helper, axis=0)
        self.total_length = w.op("Cast", [total], helper, name="Cast_total", to=int(ir.DataType.INT32))
        embedding = weights["model.embed_tokens.weight"]
        x = w.op("Gather", [w.const("model.embed_tokens.weight", embedding), input_ids], "model.embed_tokens", axis=0)
        if self.family.embedding_scale:
            scale = w.const("model.embed_tokens.embed_scale", np.array(dims.hidden ** 0.5, np.float32))
            x = w.op("Mul", [x, scale], "model.embed_tokens")
        trunk_layers = dims.layers - 1 if dims.extra_heads else dims.layers
        for i in range(trunk_layers):
            x = self.layer(x, f"model.layers.{i}", i, i)
        last = dims.layers - 1
        heads = [("logits", f"model.layers.{last}", last)] if dims.extra_heads else []
        heads += [(f"logits_{j + 1}", f"extra_heads.{j}", dims.layers + j) for j in range(dims.extra_heads)]
        lm_head = embedding if dims.tied else weights["lm_head.weight"]
        unembedding = w.const("lm_head.weight_t", np.ascontiguousarray(lm_head.T))
        logits_outputs = []
        draft_position = None
        for output_name, prefix, kv_index in heads or [("logits", None, None)]:
            h = x if prefix is None else self.layer(x, prefix, kv_index, last)
            suffix = "" if output_name == "logits" else f"_{output_name}"
            if draft_position is not None:  # an extra head: its layer runs everywhere (its KV cache), its logits at one position
                h = w.op("GatherElements", [h, draft_position], prefix, axis=1)
            n = self.norm(h, "model.norm", name=f"LayerNorm{suffix}")
            logits = w.op("MatMul", [n, unembedding], "lm_head", name=f"MatMul{suffix}")
            logits.name = output_name
            positions = "sequence_length" if output_name == "logits" else 1
            logits.shape, logits.type = ir.Shape(["batch_size", positions, dims.vocab]), ir.TensorType(ir.DataType.FLOAT)
            logits_outputs.append(logits)
            if output_name == "logits" and dims.extra_heads:
                draft_position = self.draft_position(input_ids, logits, dims.hidden)
        return w.model(name, self.inputs, logits_outputs + self.outputs, {"": OPSET, MS_DOMAIN: 1})

    def draft_position(self, input_ids: ir.Value, logits: ir.Value, hidden: int) -> ir.Value:
        """Where the extra heads' drafts are read: the last fed position head 0 confirms, as gather indices [B, 1, hidden].

        A speculative pass feeds the pending token and `draft_count` drafts; head 0's prediction at each fed position
        verifies the next draft, and the extra heads draft again from the last accepted position: only there are their
        norm and unembedding computed. `draft_count` is an input with a default of 0 (an initializer), so a caller
        that does not know it (prefill, plain greedy decoding, onnxruntime-genai) reads the drafts at the last position.
        """
        w, module = self.w, "model.draft_position"
        count = w.const("draft_count", np.array([0], np.int64))
        self.inputs.append(count)  # a graph input with an initializer: optional for callers
        one = w.const(f"{module}.one", np.array([1], np.int64))
        axis = w.const(f"{module}.axis", np.array([1], np.int64))
        length = w.op("Gather", [w.op("Shape", [input_ids], module), w.const(f"{module}.index", np.array([1], np.int64))], module, axis=0)
        start = w.op("Sub", [w.op("Sub", [length, one], module), count], module)  # the pending token's position, S-1-D
        predicted = w.op("ArgMax", [logits], module, axis=-1, keepdims=0)  # head 0's next token after each position
        verified = w.op("Slice", [predicted, start, w.op("Sub", [length, one], module), axis], module)
        drafts = w.op("Slice", [input_ids, w.op("Add", [start, one], module), length, axis], module)
        mismatch = w.op("Cast", [w.op("Not", [w.op("Equal", [verified, drafts], module)], module)], module, to=int(ir.DataType.INT64))
        unbroken = w.op("Equal", [w.op("CumSum", [mismatch, w.const(f"{module}.cumsum_axis", np.array(1, np.int64))], module),
                                  w.const(f"{module}.zero", np.array(0, np.int64))], module)
        accepted = w.op("ReduceSum", [w.op("Cast", [unbroken], module, to=int(ir.DataType.INT64)), axis], module, keepdims=1)
        position = w.op("Add", [start, accepted], module)  # [B, 1]
        index = w.op("Unsqueeze", [position, w.const(f"{module}.last", np.array([-1], np.int64))], module)
        shape = w.op("Concat", [w.op("Shape", [input_ids], module, start=0, end=1), one,
                                w.const(f"{module}.hidden", np.array([hidden], np.int64))], module, axis=0)
        return w.op("Expand", [index, shape], module)


# ---------------------------------------------------------------------------------------------------
# where the sub-layers are (for the pruning passes)

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
class DecoderStructure:
    """Where a decoder graph's layers are (pre-norm: each branch's input norm goes with it)."""

    family: type[DecoderFamily]
    num_layers: int
    head_dim: int
    lowbit_modules: frozenset[str] = frozenset()

    def find_layers(self, model: ir.Model) -> list[LayerSites]:
        by_module = nodes_by_module(model)
        inputs = {v.name: v for v in model.graph.inputs}
        outputs = {v.name: v for v in model.graph.outputs}
        norms = self.family.branch_norms

        def site(path: str):
            return linear_site(path, by_module.get(path, []), bias=None)

        def branch_output(prefix: str, down, column: int):
            """The value the branch adds to the residual stream: its output projection's, or its output norm's."""
            if down is None or norms is None:
                return None
            found = [n for n in by_module.get(f"{prefix}.{norms[column]}", []) if n.op_type == "SimplifiedLayerNormalization"]
            return found[0] if found else None

        layers = []
        for i in range(self.num_layers):
            prefix = f"model.layers.{i}"
            attention = ffn = None
            o_proj = site(f"{prefix}.self_attn.o_proj")
            norm = branch_output(prefix, o_proj, 0)
            add = residual_add(prefix, by_module.get(prefix, []), o_proj, norm.outputs[0] if norm else None) if o_proj else None
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
                    on_resize=_resize_attention(core), output_norm=norm,
                )
            down = site(f"{prefix}.mlp.down_proj")
            norm = branch_output(prefix, down, 1)
            add = residual_add(prefix, by_module.get(prefix, []), down, norm.outputs[0] if norm else None) if down else None
            if add is not None:
                ffn = BranchSites(add, [site(f"{prefix}.mlp.gate_proj"), site(f"{prefix}.mlp.up_proj")], down, output_norm=norm)
            layers.append(LayerSites(i, attention, ffn))
        return layers


# ---------------------------------------------------------------------------------------------------
# what a cluster keeps, and its MACs per decoded token

def kept_structure(dims: DecoderDims, blocks: np.ndarray, heads: np.ndarray, neurons: np.ndarray) -> dict[str, Any]:
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


def macs_per_token(dims: DecoderDims, kept: dict[str, Any], context: int = 128) -> dict[str, int]:
    """Weight MACs per decoded token (projections, lm_head included) and attention MACs at `context` tokens
    (a sliding layer attends to at most its window).

    Multi-token-prediction heads (never pruned) are counted too: every forward pass computes them.
    """
    h, d = dims.hidden, dims.head_dim
    linear = attention = 0
    full_layer = {"layer": dims.layers - 1, "heads": list(range(dims.heads)), "heads_zeroed": [],
                  "kv_heads": list(range(dims.kv_heads)), "neurons": dims.intermediate}
    for layer in kept["layers"] + [full_layer] * dims.extra_heads:
        q = (len(layer["heads"]) + len(layer["heads_zeroed"])) * d
        linear += 2 * h * q + 2 * h * len(layer["kv_heads"]) * d + 3 * h * layer["neurons"]
        window = dims.window(layer["layer"])
        attention += 2 * (context if window < 0 else min(context, window)) * q
    linear += h * dims.vocab * (1 + dims.extra_heads)
    return {"context": context, "linear": linear, "attention": attention, "total": linear + attention}
