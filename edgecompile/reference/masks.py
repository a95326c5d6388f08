"""Block, head and neuron gates on a transformer, in eager PyTorch, for every model family.

The semantics (see docs/inputs.md, `--masks`): a gate multiplies what its unit contributes.
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


class GatedOutput(nn.Module):
    """y = module(x) * output_gate: a block gate on a branch whose output is not a Linear's (Gemma's output norms)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("output_gate", torch.ones(()))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.module(*args, **kwargs) * self.output_gate


class ModelGates:
    """Installs GatedLinear on every layer's attention output and FFN output projection.

    `heads_present[i]` (optional): the mask's head ids that layer i's projection holds, in order
    (a checkpoint may already lack some heads); a gate of a head it lacks has nothing to scale.
    `block_sites` (optional, per layer like `sites`): the modules whose outputs the branches add to the
    residual stream, when those are not the output projections (a norm after them): block gates go there.
    """

    def __init__(self, sites: GatedSites, head_size: int, heads_present: Sequence[np.ndarray] | None = None,
                 block_sites: GatedSites | None = None) -> None:
        self.sites = sites
        self.block_sites = block_sites
        self.head_size = head_size
        self.heads_present = heads_present
        for pair in sites:
            for parent, name in pair:
                if not isinstance(getattr(parent, name), GatedLinear):
                    setattr(parent, name, GatedLinear(getattr(parent, name)))
        for pair in block_sites or ():
            for parent, name in pair:
                if not isinstance(getattr(parent, name), GatedOutput):
                    setattr(parent, name, GatedOutput(getattr(parent, name)))

    def units(self, i: int) -> tuple[GatedLinear, GatedLinear]:
        """Layer i's output projections, whose input gates are the head and neuron gates."""
        (attention_parent, attention), (ffn_parent, ffn) = self.sites[i]
        return getattr(attention_parent, attention), getattr(ffn_parent, ffn)

    def layer(self, i: int) -> tuple[nn.Module, nn.Module]:
        """Layer i's attention and FFN branch ends, whose `output_gate` is the block gate (trainers write it)."""
        if self.block_sites is None:
            return self.units(i)
        (attention_parent, attention), (ffn_parent, ffn) = self.block_sites[i]
        return getattr(attention_parent, attention), getattr(ffn_parent, ffn)

    @torch.no_grad()
    def set(self, masks: ClusterMasks) -> None:
        for i in range(len(self.sites)):
            attention_block, ffn_block = self.layer(i)
            attention_block.output_gate.fill_(float(masks.blocks[i, 0]))
            ffn_block.output_gate.fill_(float(masks.blocks[i, 1]))
            attention, ffn = self.units(i)
            gates = masks.heads[i] if self.heads_present is None else masks.heads[i][self.heads_present[i]]
            heads = torch.from_numpy(np.ascontiguousarray(gates)).to(attention.input_gate.dtype)
            attention.input_gate.copy_(heads.repeat_interleave(self.head_size))
            ffn.input_gate.copy_(torch.from_numpy(masks.neurons[i]).to(ffn.input_gate.dtype))

    def remove(self) -> None:
        """Put the original modules back (the model is then exactly as loaded)."""
        for pair in self.sites:
            for parent, name in pair:
                module = getattr(parent, name)
                if isinstance(module, GatedLinear):
                    setattr(parent, name, module.linear)
        for pair in self.block_sites or ():
            for parent, name in pair:
                module = getattr(parent, name)
                if isinstance(module, GatedOutput):
                    setattr(parent, name, module.module)
