"""Hard-concrete gates for training masks (Louizos et al. 2018, "Learning Sparse Neural Networks through
L0 Regularization"), as IG-Pruning, CoFi and Sheared-LLaMA use them.

Training samples a stochastic gate per unit; a file stores `log_alpha` (or the hard 0/1 gates a
trainer derives from it), and compiling uses the deterministic test-time rule
`edgecompile.numerics.hard_concrete_gate`, whose stretch limits this module shares:

- sample:   u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
            z = clamp(s * (high - low) + low, 0, 1)              (beta = 2/3, low = -0.1, high = 1.1)
- P(z != 0) = sigmoid(log_alpha - beta * log(-low / high)): the expected L0 norm is its sum.
- L0 penalty toward a target: the augmented Lagrangian lambda (E - t) + rho (E - t)^2 on the expected
  kept fraction E, with the multiplier lambda trained to MAXIMISE it (so the constraint is met, not
  traded off) and rho fixed. (CoFi / Sheared-LLaMA also ascend on the quadratic coefficient from 0;
  with the few hundred steps a recipe affords, that oscillated (E fell to 0.17 for a target of 0.5 and
  stayed there); a fixed rho damps it and reaches the target within about a hundred steps.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgecompile.numerics import HARD_CONCRETE_HIGH, HARD_CONCRETE_LOW, hard_concrete_gate

TEMPERATURE = 2.0 / 3.0
_EPS = 1e-6


def sample_hard_concrete(log_alpha: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """One stochastic gate per unit, differentiable in log_alpha (reparameterised)."""
    u = torch.rand_like(log_alpha).clamp(_EPS, 1.0 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature)
    return (s * (HARD_CONCRETE_HIGH - HARD_CONCRETE_LOW) + HARD_CONCRETE_LOW).clamp(0.0, 1.0)


def probability_kept(log_alpha: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """P(gate != 0) per unit; its sum is the expected L0 norm."""
    return torch.sigmoid(log_alpha - temperature * math.log(-HARD_CONCRETE_LOW / HARD_CONCRETE_HIGH))


def l0_augmented_lagrangian(expected_kept_fraction: torch.Tensor, target_kept_fraction: float,
                            multiplier: torch.Tensor, rho: float) -> torch.Tensor:
    """multiplier (E - t) + rho (E - t)^2; minimise in the gates, maximise in the multiplier."""
    gap = expected_kept_fraction - target_kept_fraction
    return multiplier * gap + rho * gap * gap


class HardConcreteGates(nn.Module):
    """`log_alpha` of a gate tensor: stochastic samples in training, the deterministic rule in eval."""

    def __init__(self, shape: tuple[int, ...], initial_keep: float = 0.9, temperature: float = TEMPERATURE,
                 rho: float = 20.0) -> None:
        super().__init__()
        # Start with every unit likely kept (the dense model), sigmoid(log_alpha) = initial_keep.
        self.log_alpha = nn.Parameter(torch.full(shape, math.log(initial_keep / (1.0 - initial_keep))))
        self.temperature = temperature
        self.rho = rho
        self.multiplier = nn.Parameter(torch.zeros(()))

    def forward(self) -> torch.Tensor:
        if self.training:
            return sample_hard_concrete(self.log_alpha, self.temperature)
        return hard_concrete_gate(self.log_alpha)

    def expected_kept_fraction(self) -> torch.Tensor:
        return probability_kept(self.log_alpha, self.temperature).mean()

    def penalty(self, target_kept_fraction: float) -> torch.Tensor:
        return l0_augmented_lagrangian(self.expected_kept_fraction(), target_kept_fraction, self.multiplier, self.rho)

    def gate_parameters(self) -> list[nn.Parameter]:
        return [self.log_alpha]

    def lagrangian_parameters(self) -> list[nn.Parameter]:
        return [self.multiplier]

    @torch.no_grad()
    def top_k_hard(self, kept: int) -> torch.Tensor:
        """Hard 0/1 gates keeping exactly `kept` units, those with the largest log_alpha (ties: lowest index)."""
        flat = self.log_alpha.detach().flatten()
        order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
        hard = torch.zeros_like(flat)
        hard[order[:kept]] = 1.0
        return hard.reshape(self.log_alpha.shape)
