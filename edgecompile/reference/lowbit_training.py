"""Quantization-aware training modules for binary / ternary students (XTC, BinaryBERT / TernaryBERT).

Their forward is the contract's arithmetic (reference/lowbit.py) in fake-quantized form, their backward
the straight-through estimators of the same file: weights `codes * alpha` per group from the latent
floats, inputs of each Linear quantized to 8 bits (one scale per token, or a static one). A trainer
wraps the modules with `LowBitTraining`, trains the latent floats, calls `remove()` and saves the
latent checkpoint with a sidecar declaring the same bits, groups and activations (`stored: latent`),
so `edgecompile build` quantizes exactly what was trained. (The fake-quantized product
`(q * scale) @ (codes * alpha)^T` is the integer product `acc * alpha * scale` up to float rounding.)
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.nn import functional as F

from edgecompile.reference.lowbit import fake_quantize_activation_ste, quantize_weight_ste


class LowBitTrainingLinear(nn.Module):
    """y = linear(fake_quant8(x)) with the weight replaced by its low-bit STE image."""

    def __init__(self, linear: nn.Linear, bits: int, groups: str | int = "row", activations: str = "dynamic",
                 static_scale: float | None = None) -> None:
        super().__init__()
        self.linear, self.bits, self.groups = linear, bits, groups
        self.activations, self.static_scale = activations, static_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quantize_activation_ste(x, self.activations, self.static_scale)
        return F.linear(x, quantize_weight_ste(self.linear.weight, self.bits, self.groups), self.linear.bias)


class LowBitTrainingEmbedding(nn.Module):
    """A word-embedding table looked up in its low-bit STE image (one alpha per row)."""

    def __init__(self, embedding: nn.Embedding, bits: int) -> None:
        super().__init__()
        self.embedding, self.bits = embedding, bits
        self.weight = embedding.weight  # what code reading `.weight` (e.g. tied heads) expects

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, quantize_weight_ste(self.embedding.weight, self.bits, "row"), self.embedding.padding_idx)


class LowBitTraining:
    """Wraps the Linear modules matching `patterns` (shell patterns over module names, `*` crosses dots,
    as in the sidecar) and optionally the word embeddings; `remove()` puts the plain modules back."""

    def __init__(self, model: nn.Module, patterns: list[str], bits: int = 1, groups: str | int = "row",
                 activations: str = "dynamic", embedding_bits: int | None = None) -> None:
        self.installed: list[tuple[nn.Module, str, nn.Module]] = []
        modules = dict(model.named_modules())
        self.linear_names = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear)
                                   and any(fnmatch.fnmatchcase(n, p) for p in patterns))
        for name in self.linear_names:
            self._swap(model, modules, name, LowBitTrainingLinear(modules[name], bits, groups, activations))
        if embedding_bits is not None:
            embedding = model.get_input_embeddings()
            name = next(n for n, m in modules.items() if m is embedding)
            self._swap(model, modules, name, LowBitTrainingEmbedding(embedding, embedding_bits))

    def _swap(self, model: nn.Module, modules: dict[str, nn.Module], name: str, wrapper: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        self.installed.append((parent, child, getattr(parent, child)))
        setattr(parent, child, wrapper)

    def remove(self) -> None:
        for parent, child, original in reversed(self.installed):
            setattr(parent, child, original)
        self.installed.clear()
