"""The Qwen3 family (Qwen3ForCausalLM): a Llama decoder with an RMSNorm over each head of q and k before RoPE."""

from __future__ import annotations

from edgecompile.families.base import register
from edgecompile.families.decoder import DecoderFamily


@register
class Qwen3(DecoderFamily):
    name = "qwen3"
    model_types = ("qwen3",)
    architectures = ("Qwen3ForCausalLM",)
    description = "Qwen3ForCausalLM"
    genai_type = "qwen3"
    config_class = "Qwen3Config"
    model_class = "Qwen3ForCausalLM"
    layer_module = "transformers.models.qwen3.modeling_qwen3"
    layer_class = "Qwen3DecoderLayer"
    implemented = frozenset({"hidden_act", "attention_bias", "use_sliding_window", "sliding_window", "max_window_layers",
                             "layer_types"})
    expected = {"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False}
    multi_token_heads = True
    qk_norm = True
