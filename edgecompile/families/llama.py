"""The Llama family (LlamaForCausalLM; SmolLM2 is one): the decoder of families/decoder.py as it stands."""

from __future__ import annotations

from edgecompile.families.base import register
from edgecompile.families.decoder import DecoderFamily


@register
class Llama(DecoderFamily):
    name = "llama"
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM",)
    description = "LlamaForCausalLM"
    genai_type = "llama"
    config_class = "LlamaConfig"
    model_class = "LlamaForCausalLM"
    layer_module = "transformers.models.llama.modeling_llama"
    layer_class = "LlamaDecoderLayer"
    implemented = frozenset({"hidden_act", "attention_bias", "mlp_bias", "pretraining_tp"})
    expected = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    multi_token_heads = True
