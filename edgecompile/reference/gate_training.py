"""Differentiable gates for trainers, in the same GatedLinear buffers the parity oracle uses.

`ModelGates.set` (reference/masks.py) loads a finished cluster's gates as constants; during training
the block gates are tensors in the autograd graph (hard-concrete samples), written into the same
buffers so the forward a trainer optimises is the forward `edgecompile build` compiles.
"""

from __future__ import annotations

import torch

from edgecompile.reference.masks import ModelGates


def set_block_gates(gates: ModelGates, blocks: torch.Tensor) -> None:
    """Write an [L, 2] block-gate tensor (column 0 attention, 1 FFN) into the gate buffers, keeping its graph."""
    if tuple(blocks.shape) != (len(gates.sites), 2):
        raise ValueError(f"block gates: expected shape [{len(gates.sites)}, 2], found {list(blocks.shape)}")
    for i in range(len(gates.sites)):
        attention, ffn = gates.layer(i)
        attention.output_gate = blocks[i, 0].clone()
        ffn.output_gate = blocks[i, 1].clone()
