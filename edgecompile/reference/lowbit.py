"""Binary / ternary weights and 8-bit activations (XTC, BinaryBERT / TernaryBERT), in PyTorch.

One definition of every low-bit rule, used by trainers (straight-through estimators), by the
parity oracle (`QuantLinear`) and, through `recover_codes`, by the graph rewrites:

- binary:  codes = sign(W) (sign(0) = 0), alpha = mean|W| per group
- ternary: delta = 0.7 * mean|W| per group, codes = sign(W) where |W| > delta else 0,
           alpha = mean |W| over the weights above delta (0 when none is)
- groups:  "matrix" (one alpha), "row" (one per output row), or an integer g: W.reshape(g, -1),
           i.e. g contiguous chunks of the row-major [out, in] weight (DeepSpeed's layout). The
           compiler supports row-aligned groups (g divides out), so every row has ONE alpha.
- activations (8-bit symmetric): scale = max|x| / 128 per token ("dynamic") or a stored
  per-tensor scale ("static"); q = clamp(round(x / max(scale, FLT_TRUE_MIN)), -128, 127) with
  round half to even. The guard keeps an all-zero row at q = 0 instead of NaN; onnxruntime's
  QuantizeLinear divides the same way, so both agree bit for bit.
- y = (acc * alpha) * scale + bias for dynamic (onnxruntime's MatMulIntegerToFloat order), and
  acc * (scale * alpha) + bias for static; acc = q @ codes^T is an exact integer sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

ACTIVATION_LEVELS = 128.0  # 8-bit symmetric: max|x| maps to 128 (then clamped to 127)
ACTIVATION_MIN, ACTIVATION_MAX = -128.0, 127.0
SCALE_FLOOR = float(np.finfo(np.float32).smallest_subnormal)  # FLT_TRUE_MIN, 1.4e-45
TERNARY_THRESHOLD = 0.7


def _grouped(weight: torch.Tensor, groups: str | int) -> torch.Tensor:
    if groups == "matrix":
        return weight.reshape(1, -1)
    if groups == "row":
        return weight.reshape(weight.shape[0], -1)
    return weight.reshape(int(groups), -1)


def quantize_weight(weight: torch.Tensor, bits: int, groups: str | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent float weight [out, in] -> (codes in {-1, 0, 1} as float, alpha per group [g, 1])."""
    w = _grouped(weight.detach().float(), groups)
    magnitude = w.abs()
    if bits == 1:
        codes = torch.sign(w)
        alpha = magnitude.mean(dim=1, keepdim=True)
    elif bits == 2:
        delta = TERNARY_THRESHOLD * magnitude.mean(dim=1, keepdim=True)
        keep = magnitude > delta
        codes = torch.sign(w) * keep
        count = keep.sum(dim=1, keepdim=True)
        alpha = torch.where(count > 0, (magnitude * keep).sum(dim=1, keepdim=True) / count.clamp(min=1), torch.zeros_like(delta))
    else:
        raise ValueError(f"unsupported weight bits {bits}; supported: 1 (binary), 2 (ternary)")
    return codes.reshape(weight.shape), alpha


def fake_quantize_weight(weight: torch.Tensor, bits: int, groups: str | int) -> torch.Tensor:
    """codes * alpha in the weight's own shape: what redundancy_clean stores, and what we export."""
    codes, alpha = quantize_weight(weight, bits, groups)
    return (_grouped(codes, groups) * alpha).reshape(weight.shape)


class _WeightSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: int, groups: str | int) -> torch.Tensor:  # type: ignore[override]
        return fake_quantize_weight(weight, bits, groups).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None  # straight-through: d(quantized)/d(latent) := 1


def quantize_weight_ste(weight: torch.Tensor, bits: int, groups: str | int = "row") -> torch.Tensor:
    """For trainers: forward quantizes, backward passes the gradient straight through."""
    return _WeightSTE.apply(weight, bits, groups)


def activation_scale(x: torch.Tensor, mode: str, static_scale: float | None = None) -> torch.Tensor:
    if mode == "dynamic":
        return x.abs().amax(dim=-1, keepdim=True) / ACTIVATION_LEVELS
    if mode == "static":
        return torch.tensor(static_scale, dtype=x.dtype)
    raise ValueError(f"unknown activation mode {mode!r}; known: dynamic, static")


def quantize_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer codes (as float) of x for a given scale; scale 0 gives codes 0, never NaN."""
    safe = torch.clamp(scale, min=SCALE_FLOOR)
    return torch.clamp(torch.round(x / safe), ACTIVATION_MIN, ACTIVATION_MAX)


class _ActivationSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mode: str, static_scale: float | None) -> torch.Tensor:  # type: ignore[override]
        scale = activation_scale(x, mode, static_scale)
        return quantize_activation(x, scale) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


def fake_quantize_activation_ste(x: torch.Tensor, mode: str = "dynamic", static_scale: float | None = None) -> torch.Tensor:
    """For trainers: 8-bit symmetric fake quantization with a straight-through gradient."""
    return _ActivationSTE.apply(x, mode, static_scale)


@dataclass(frozen=True)
class RecoveredCodes:
    """Exact decomposition W = codes * alpha_row (row-wise), as recovered from floats."""

    codes: np.ndarray  # int8 [out, in] in {-1, 0, 1}
    alpha: np.ndarray  # float32 [out]


def recover_codes(weight: np.ndarray) -> RecoveredCodes | None:
    """Recover codes and per-row alphas from `sign * alpha` floats, or None if W is not exactly that.

    Exact by construction: alpha is taken from the stored magnitude (never recomputed as a mean),
    and the reconstruction codes * alpha must reproduce every float bit for bit.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        return None
    alpha = np.abs(w).max(axis=1)
    codes = np.sign(w).astype(np.int8)
    # Float equality of finite non-zero values is bit equality; -0.0 decodes as +0.0 (same products).
    if not np.array_equal(codes.astype(np.float32) * alpha[:, None], w):
        return None
    return RecoveredCodes(codes, alpha.astype(np.float32))


def describe_mismatch(weight: np.ndarray) -> tuple[int, float]:
    """For an almost-low-bit tensor: how many values differ from the row's dominant magnitude, and by how much (relative)."""
    w = np.abs(np.asarray(weight, dtype=np.float32))
    off, worst = 0, 0.0
    for row in w:
        nonzero = row[row != 0]
        if nonzero.size == 0:
            continue
        values, counts = np.unique(nonzero, return_counts=True)
        mode = values[np.argmax(counts)]
        bad = nonzero[nonzero != mode]
        off += int(bad.size)
        if bad.size:
            worst = max(worst, float(np.max(np.abs(bad - mode)) / mode))
    return off, worst


def looks_lowbit(weight: np.ndarray, share: float = 0.5) -> bool:
    """True when, in every row, the upper-quartile magnitude alone covers `share` of the non-zero values.

    Exactly low-bit rows (even ternary ones, which are under half zeros) pass; ordinary float
    weights, where almost every magnitude is distinct, fail at the first row. O(n log n).
    """
    w = np.abs(np.asarray(weight, dtype=np.float32))
    if w.ndim != 2 or w.size == 0:
        return False
    typical = np.sort(w, axis=1)[:, (3 * w.shape[1]) // 4][:, None]
    nonzero = np.maximum((w != 0).sum(axis=1), 1)
    return bool(np.all((w == typical).sum(axis=1) >= share * nonzero))


class QuantLinear(nn.Module):
    """A Linear whose weight is exactly codes * alpha_row, with its input quantized to 8 bits.

    Wraps the original nn.Linear (whose weight must already be `fake_quantize_weight(...)`), so
    exporting the unwrapped model gives the float weights the graph rewrites recover codes from.
    """

    def __init__(self, linear: nn.Linear, mode: str, static_scale: float | None = None) -> None:
        super().__init__()
        recovered = recover_codes(linear.weight.detach().numpy())
        if recovered is None:
            raise ValueError("QuantLinear needs a weight that is exactly codes * alpha per row")
        self.linear = linear
        self.mode = mode
        self.static_scale = static_scale
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", torch.from_numpy(recovered.codes.astype(np.float32)))
        self.register_buffer("alpha", torch.from_numpy(recovered.alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = activation_scale(x, self.mode, self.static_scale)
        q = quantize_activation(x, scale)
        acc = q @ self.codes.T  # exact: integers below 2**24
        bias = self.linear.bias
        if self.mode == "dynamic":
            y = (acc * self.alpha) * scale
        else:
            y = acc * (scale * self.alpha)
        return y + bias if bias is not None else y


class QuantizedLinears:
    """Puts QuantLinear in place of the named nn.Linear modules of `model`; `remove()` undoes it."""

    def __init__(self, model: nn.Module, linears: dict[str, tuple[str, float | None]]) -> None:
        self.model = model
        self.installed: list[tuple[nn.Module, str, nn.Linear]] = []
        self.quantized: dict[str, QuantLinear] = {}  # still usable on their own after remove()
        modules = dict(model.named_modules())
        for name, (mode, static_scale) in linears.items():
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            linear = getattr(parent, child)
            self.quantized[name] = QuantLinear(linear, mode, static_scale)
            setattr(parent, child, self.quantized[name])
            self.installed.append((parent, child, linear))

    def remove(self) -> None:
        for parent, child, linear in reversed(self.installed):
            setattr(parent, child, linear)
        self.installed.clear()
