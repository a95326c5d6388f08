"""The Gemma 3 family (Gemma3ForCausalLM, `gemma3_text`; Gemma 3 270M is one).

What differs from Llama, all in transformers' Gemma3 modules: sliding-window layers beside global ones,
each kind with its own RoPE base (`rope_parameters` per layer type; transformers 4: rope_theta and
rope_local_base_freq); RMSNorms that scale by (1 + weight); q / k norms per head; four norms per layer
(the outputs of both branches are normalized before the residual add, so a block gate scales the
normalized branch); GeGLU (gelu_pytorch_tanh); embeddings multiplied by sqrt(hidden); the attention
scale query_pre_attn_scalar ** -0.5.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgecompile.errors import input_error
from edgecompile.families.base import register
from edgecompile.families.decoder import FULL_ATTENTION, SLIDING_ATTENTION, DecoderFamily

DEFAULT_THETA = {FULL_ATTENTION: 1_000_000.0, SLIDING_ATTENTION: 10_000.0}  # transformers' Gemma3TextConfig


def _normalized(scaling: dict[str, Any] | None) -> dict[str, Any]:
    scaling = dict(scaling or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    return {"rope_type": rope_type, **scaling}


@register
class Gemma3(DecoderFamily):
    name = "gemma3"
    model_types = ("gemma3_text",)
    architectures = ("Gemma3ForCausalLM",)
    description = "Gemma3ForCausalLM"
    genai_type = "gemma3_text"
    config_class = "Gemma3TextConfig"
    model_class = "Gemma3ForCausalLM"
    layer_module = "transformers.models.gemma3.modeling_gemma3"
    layer_class = "Gemma3DecoderLayer"
    implemented = frozenset({
        "hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types", "sliding_window_pattern",
        "_sliding_window_pattern", "rope_local_base_freq", "attn_logit_softcapping", "final_logit_softcapping",
        "use_bidirectional_attention", "attention_bias", "cache_implementation",
    })
    expected = {"hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": None, "final_logit_softcapping": None,
                "use_bidirectional_attention": False, "attention_bias": False}
    rope_types = ("default", "linear")
    qk_norm = True
    ffn_norm = "pre_feedforward_layernorm"
    branch_norms = ("post_attention_layernorm", "post_feedforward_layernorm")
    norm_offset = 1.0
    activation = "gelu_tanh"
    embedding_scale = True

    @classmethod
    def layer_types(cls, config: dict[str, Any]) -> list[str]:
        """As transformers derives them: given, or every `sliding_window_pattern`-th layer global (default 6)."""
        if config.get("layer_types") is not None:
            return list(config["layer_types"])
        pattern = int(config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6)))
        return [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(int(config["num_hidden_layers"]))]

    @classmethod
    def check_layers(cls, path: Path, config: dict[str, Any]) -> None:
        types = cls.layer_types(config)
        if len(types) != int(config["num_hidden_layers"]) or any(t not in DEFAULT_THETA for t in types):
            raise input_error(path, "'layer_types'", f"one of '{FULL_ATTENTION}' or '{SLIDING_ATTENTION}' per layer",
                              json.dumps(types)[:80])
        window = config.get("sliding_window")
        if SLIDING_ATTENTION in types and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise input_error(path, "'sliding_window'", "a positive integer (the model has sliding-window layers)", repr(window))
        scalar = config.get("query_pre_attn_scalar", 256)
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or scalar <= 0:
            raise input_error(path, "'query_pre_attn_scalar'", "a positive number", repr(scalar))

    @classmethod
    def rope_by_layer_type(cls, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """RoPE per layer type, as transformers 5 stores it, from either major's config.json."""
        if "rope_parameters" in config:
            given = dict(config["rope_parameters"] or {})
            ropes = {kind: dict(given.get(kind) or {"rope_type": "default"}) for kind in DEFAULT_THETA}
        else:  # transformers 4: rope_scaling applies to the global layers
            ropes = {FULL_ATTENTION: _normalized(config.get("rope_scaling")), SLIDING_ATTENTION: {"rope_type": "default"}}
        ropes[FULL_ATTENTION].setdefault("rope_theta", config.get("rope_theta", DEFAULT_THETA[FULL_ATTENTION]))
        ropes[SLIDING_ATTENTION].setdefault("rope_theta", config.get("rope_local_base_freq", DEFAULT_THETA[SLIDING_ATTENTION]))
        return ropes

    @classmethod
    def layer_ropes(cls, config: dict[str, Any]) -> list[dict[str, Any]]:
        ropes = cls.rope_by_layer_type(config)
        return [ropes[kind] if kind in ropes else ropes[FULL_ATTENTION] for kind in cls.layer_types(config)]

    @classmethod
    def layer_windows(cls, config: dict[str, Any]) -> list[int]:
        return [int(config["sliding_window"]) if kind == SLIDING_ATTENTION else -1 for kind in cls.layer_types(config)]

    @classmethod
    def attention_scale(cls, config: dict[str, Any], head_dim: int) -> float:
        return float(config.get("query_pre_attn_scalar", 256)) ** -0.5
