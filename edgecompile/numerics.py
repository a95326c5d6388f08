"""Numeric rules shared by the PyTorch reference, the input loaders and the graph rewrites.

Each rule has ONE definition here (the low-bit rules live in reference/lowbit.py beside their
straight-through estimators); everything else calls it. See docs/inputs.md, "Inputs" and "Binary and
ternary students" for the contract.
"""

from __future__ import annotations

import numpy as np
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


def kept_units(gates: np.ndarray) -> np.ndarray:
    """Indices of the units a gate vector keeps (every non-zero gate)."""
    return np.flatnonzero(gates != 0.0)


def all_identity(gates: np.ndarray) -> bool:
    """True when no unit is removed or scaled: the rewrite has nothing to do."""
    return bool((gates == 1.0).all())
