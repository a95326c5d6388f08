"""The Qwen2 family (Qwen2ForCausalLM): a Llama decoder whose q/k/v projections have biases."""

from __future__ import annotations

from edgecompile.families.base import register
from edgecompile.families.decoder import DecoderFamily


@register
class Qwen2(DecoderFamily):
    name = "qwen2"
    model_types = ("qwen2",)
    architectures = ("Qwen2ForCausalLM",)
    description = "Qwen2ForCausalLM"
    genai_type = "qwen2"
    config_class = "Qwen2Config"
    model_class = "Qwen2ForCausalLM"
    layer_module = "transformers.models.qwen2.modeling_qwen2"
    layer_class = "Qwen2DecoderLayer"
    # sliding_window and max_window_layers only act with use_sliding_window, which is refused; layer_types must
    # then say full attention for every layer (DecoderFamily.check_layers)
    implemented = frozenset({"hidden_act", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})
    expected = {"hidden_act": "silu", "use_sliding_window": False}
    multi_token_heads = True
    qkv_bias = True
