"""Numeric rules shared by the PyTorch reference, the input loaders and the graph rewrites.

Each rule has ONE definition here; everything else calls it. See ../shared/DESIGN.md
("Numeric contract") for where the rules come from.
"""

from __future__ import annotations

import torch

# Hard-concrete stretch limits (Louizos et al. 2018), as used by IG-Pruning's learned masks.
HARD_CONCRETE_LOW = -0.1
HARD_CONCRETE_HIGH = 1.1


def hard_concrete_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """Deterministic (test-time) hard-concrete gate: clamp(sigmoid(a) * (h - l) + l, 0, 1)."""
    stretched = torch.sigmoid(log_alpha) * (HARD_CONCRETE_HIGH - HARD_CONCRETE_LOW) + HARD_CONCRETE_LOW
    return stretched.clamp(0.0, 1.0)


def gate_is_removed(value: float) -> bool:
    """A unit whose gate is exactly 0 is removed from the graph; any other value scales it."""
    return value == 0.0


def gate_is_identity(value: float) -> bool:
    return value == 1.0
