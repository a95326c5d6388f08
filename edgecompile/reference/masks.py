"""Block, head and neuron gates on a transformer, in eager PyTorch, for every model family.

The semantics (see README "Masks"): a gate multiplies what its unit contributes.
- block gate (layer i, attention|FFN): multiplies the sub-layer's branch, the tensor added to the
  residual stream; whatever is outside the branch (BERT's post-LayerNorm) is untouched.
- head gate: multiplies that head's slice of the context before the attention output projection.
- neuron gate: multiplies that FFN intermediate activation before the FFN output projection.

Gates live in buffers of `GatedLinear` wrappers so trainers can reuse them (make them Parameters,
or write hard-concrete samples into them); `ModelGates.set(masks)` loads one cluster. A family
module says which Linears to wrap (its `gated_linears`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from edgecompile.inputs.masks import ClusterMasks

# Per layer: (parent module, attribute) of the attention output projection, then of the FFN's.
GatedSites = list[tuple[tuple[nn.Module, str], tuple[nn.Module, str]]]


class GatedLinear(nn.Module):
    """y = linear(x * input_gate) * output_gate."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("input_gate", torch.ones(linear.in_features))
        self.register_buffer("output_gate", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.input_gate) * self.output_gate


class ModelGates:
    """Installs GatedLinear on every layer's attention output and FFN output projection.

    `heads_present[i]` (optional): the mask's head ids that layer i's projection holds, in order
    (a checkpoint may already lack some heads); a gate of a head it lacks has nothing to scale.
    """

    def __init__(self, sites: GatedSites, head_size: int, heads_present: Sequence[np.ndarray] | None = None) -> None:
        self.sites = sites
        self.head_size = head_size
        self.heads_present = heads_present
        for pair in sites:
            for parent, name in pair:
                if not isinstance(getattr(parent, name), GatedLinear):
                    setattr(parent, name, GatedLinear(getattr(parent, name)))

    def layer(self, i: int) -> tuple[GatedLinear, GatedLinear]:
        (attention_parent, attention), (ffn_parent, ffn) = self.sites[i]
        return getattr(attention_parent, attention), getattr(ffn_parent, ffn)

    @torch.no_grad()
    def set(self, masks: ClusterMasks) -> None:
        for i in range(len(self.sites)):
            attention, ffn = self.layer(i)
            attention.output_gate.fill_(float(masks.blocks[i, 0]))
            ffn.output_gate.fill_(float(masks.blocks[i, 1]))
            gates = masks.heads[i] if self.heads_present is None else masks.heads[i][self.heads_present[i]]
            heads = torch.from_numpy(np.ascontiguousarray(gates)).to(attention.input_gate.dtype)
            attention.input_gate.copy_(heads.repeat_interleave(self.head_size))
            ffn.input_gate.copy_(torch.from_numpy(masks.neurons[i]).to(ffn.input_gate.dtype))

    def remove(self) -> None:
        """Put the original nn.Linear modules back (the model is then exactly as loaded)."""
        for pair in self.sites:
            for parent, name in pair:
                module = getattr(parent, name)
                if isinstance(module, GatedLinear):
                    setattr(parent, name, module.linear)

