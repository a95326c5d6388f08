"""IG-Pruning stage 1, the part every student shares: the mask-training settings, the hard-concrete
training loop over [L, 2] block gates, and how a mask is printed. The student-specific part (what the
pruned model is distilled toward) is a function the recipe passes in."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from common import cycle_shuffled, require

from edgecompile.reference.hard_concrete import HardConcreteGates
from edgecompile.reference.masks import ModelGates


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clusters", type=int, default=4, help="K, number of clusters [default: %(default)s]")
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of sub-layers removed, in [0, 1) [default: %(default)s]")
    parser.add_argument("--steps", type=int, default=100, help="training steps per mask [default: %(default)s]")
    parser.add_argument("--batch-size", type=int, default=16, help="[default: %(default)s]")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate of log_alpha [default: %(default)s]")
    parser.add_argument("--multiplier-lr", type=float, default=0.02, help="Adam learning rate (ascent) of the L0 constraint's multiplier [default: %(default)s]")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text in training and evaluation [default: %(default)s]")


def check_mask_arguments(args: argparse.Namespace) -> None:
    require(0.0 <= args.sparsity < 1.0, "--sparsity", "a share of sub-layers in [0, 1)", args.sparsity)
    for name in ("clusters", "steps", "batch_size", "max_length"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')}", "at least 1", getattr(args, name))
    require(args.lr > 0 and args.multiplier_lr > 0, "--lr, --multiplier-lr", "positive numbers", f"{args.lr}, {args.multiplier_lr}")


def layout(blocks: np.ndarray) -> str:
    """Which sub-layers a mask keeps, per layer: A = attention, F = FFN, - = removed."""
    return " ".join(("A" if a else "-") + ("F" if f else "-") for a, f in blocks)


def train_block_mask(gates: ModelGates, batches: list, kept: int, args: argparse.Namespace, seed: int,
                     distillation: Callable[[dict, torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, float]:
    """Hard-concrete gates over [L, 2] sub-layers; `distillation(batch, gates)` is the loss of the student
    with those sampled gates, which it sets (reference/gate_training.set_block_gates). An augmented-Lagrangian L0
    penalty drives the expected kept share to `kept` of 2L. Returns the hard 0/1 mask keeping the `kept`
    sub-layers with the largest log_alpha, and the mean distillation loss of the last 10 steps."""
    torch.manual_seed(seed)
    layers = len(gates.sites)
    mask = HardConcreteGates((layers, 2))
    optimizer = torch.optim.Adam([
        {"params": mask.gate_parameters(), "lr": args.lr},
        {"params": mask.lagrangian_parameters(), "lr": args.multiplier_lr, "maximize": True},  # the constraint's multiplier ascends
    ])
    stream = cycle_shuffled(batches, seed)
    recent: list[float] = []
    for _ in range(args.steps):
        batch = next(stream)
        distill = distillation(batch, mask())
        loss = distill + mask.penalty(kept / (2 * layers))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recent = (recent + [distill.item()])[-10:]
    return mask.top_k_hard(kept).numpy().astype(np.float32), float(np.mean(recent))

