"""Block, head and neuron gates on a BERT encoder, in eager PyTorch.

The semantics (see README "Masks"): a gate multiplies what its unit contributes.
- block gate (layer i, attention|FFN): multiplies the sub-layer's branch, the tensor added to the
  residual stream; the post-LayerNorm after the residual add is untouched.
- head gate: multiplies that head's slice of the context before the attention output projection.
- neuron gate: multiplies that FFN intermediate activation before the FFN output projection.

Gates live in buffers of `GatedLinear` wrappers so trainers can reuse them (make them Parameters,
or write hard-concrete samples into them); `EncoderGates.set(masks)` loads one cluster.
"""

from __future__ import annotations

import torch
from torch import nn

from edgecompile.inputs.masks import ClusterMasks


class GatedLinear(nn.Module):
    """y = linear(x * input_gate) * output_gate."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("input_gate", torch.ones(linear.in_features))
        self.register_buffer("output_gate", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.input_gate) * self.output_gate


class EncoderGates:
    """Installs GatedLinear on every layer's attention output and FFN output projection."""

    def __init__(self, bert: nn.Module) -> None:
        self.layers = list(bert.encoder.layer)
        self.head_size = bert.config.hidden_size // bert.config.num_attention_heads
        for layer in self.layers:
            if not isinstance(layer.attention.output.dense, GatedLinear):
                layer.attention.output.dense = GatedLinear(layer.attention.output.dense)
                layer.output.dense = GatedLinear(layer.output.dense)

    @torch.no_grad()
    def set(self, masks: ClusterMasks) -> None:
        for i, layer in enumerate(self.layers):
            attention, ffn = layer.attention.output.dense, layer.output.dense
            attention.output_gate.fill_(float(masks.blocks[i, 0]))
            ffn.output_gate.fill_(float(masks.blocks[i, 1]))
            heads = torch.from_numpy(masks.heads[i]).to(attention.input_gate.dtype)
            attention.input_gate.copy_(heads.repeat_interleave(self.head_size))
            ffn.input_gate.copy_(torch.from_numpy(masks.neurons[i]).to(ffn.input_gate.dtype))

    def remove(self) -> None:
        """Put the original nn.Linear modules back (the model is then exactly as loaded)."""
        for layer in self.layers:
            if isinstance(layer.attention.output.dense, GatedLinear):
                layer.attention.output.dense = layer.attention.output.dense.linear
                layer.output.dense = layer.output.dense.linear
