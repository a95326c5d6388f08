"""Binary / ternary weights and 8-bit activations (XTC, BinaryBERT / TernaryBERT), in PyTorch.

One definition of every low-bit rule, used by trainers (straight-through estimators), by the
parity oracle (`QuantLinear`) and, through `recover_codes`, by the graph rewrites:

- binary:  codes = sign(W) (sign(0) = 0), alpha = mean|W| per group
- ternary: delta = 0.7 * mean|W| per group, codes = sign(W) where |W| > delta else 0,
           alpha = mean |W| over the weights above delta (0 when none is)
- groups:  "matrix" (one alpha), "row" (one per output row), or an integer g: W.reshape(g, -1),
           i.e. g contiguous chunks of the row-major [out, in] weight (DeepSpeed's layout). Groups
           that cut rows (g > out) give each row several alphas, one per run of input features.
- activations (8-bit symmetric): scale = max|x| / 128 per token ("dynamic") or a stored
  per-tensor scale ("static"); q = clamp(round(x / max(scale, FLT_TRUE_MIN)), -128, 127) with
  round half to even. The guard keeps an all-zero row at q = 0 instead of NaN; onnxruntime's
  QuantizeLinear divides the same way, so both agree bit for bit. "none": float activations,
  y = x @ (codes * alpha)^T + bias (W1A32).
- y = (acc * alpha) * scale + bias for dynamic (onnxruntime's MatMulIntegerToFloat order), and
  acc * (scale * alpha) + bias for static; acc = q @ codes^T is an exact integer sum. With several
  runs per row, y = sum over runs (left to right) of that expression without bias, then + bias.
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
MAX_RUNS_PER_ROW = 16  # alphas per weight row the lowering accepts (DeepSpeed groups that cut rows)
MIN_RUN_WIDTH = 4  # input features per alpha, at least: narrower "groups" would fit any float weight
LOWBIT_MIN_EVIDENCE = 4  # low-bit rows repeat one magnitude hundreds of times; float rows about once


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
    raise ValueError(f"unknown activation mode {mode!r}; known: dynamic, static (\"none\" is not quantized)")


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
    """Exact decomposition W = codes * alpha, one alpha per row and run of input features.

    Run r covers input features starts[r]:starts[r + 1]. One run is XTC's per-row layout; DeepSpeed
    groups that cut rows (g contiguous chunks of the row-major weight, g > out) give several.
    """

    codes: np.ndarray  # int8 [out, in] in {-1, 0, 1}
    alpha: np.ndarray  # float32 [out, runs]
    starts: tuple[int, ...]  # runs + 1 offsets into the input features, from 0 to in

    @property
    def runs(self) -> int:
        return len(self.starts) - 1

    def run_slices(self) -> list[slice]:
        return [slice(a, b) for a, b in zip(self.starts[:-1], self.starts[1:])]


def _run_starts(magnitude: np.ndarray, max_runs: int | None) -> list[int] | None:
    """Greedy split of the input features into runs in which every row has at most one non-zero magnitude."""
    current = np.zeros(magnitude.shape[0], np.float32)
    starts = [0]
    for k in range(magnitude.shape[1]):
        column = magnitude[:, k]
        if np.any((column != 0) & (current != 0) & (column != current)):
            starts.append(k)
            if max_runs is not None and len(starts) > max_runs:
                return None
            current = np.zeros_like(current)
        current = np.where(column != 0, column, current)
    return starts + [magnitude.shape[1]]


def recover_codes(weight: np.ndarray, max_runs: int = 1, uneven: bool = False) -> RecoveredCodes | None:
    """Recover codes and alphas from `sign * alpha` floats, or None if W is not exactly that.

    Exact by construction: each alpha is a stored magnitude (never recomputed as a mean), and the
    reconstruction codes * alpha must reproduce every float bit for bit. Runs: the fewest equal
    chunks of each row (at most `max_runs`, each at least MIN_RUN_WIDTH wide) with one alpha per
    row and chunk, which is DeepSpeed's
    layout; with `uneven` (a graph whose input features were pruned), else the greedy split into
    uneven runs. The same weight always gives the same runs, so the reference and the lowering sum
    the same way.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] == 0:
        return None
    out_features, in_features = w.shape
    magnitude = np.abs(w)
    codes = np.sign(w).astype(np.int8)
    for runs in range(1, min(max_runs, max(in_features // MIN_RUN_WIDTH, 1)) + 1):
        if in_features % runs:
            continue
        chunks = magnitude.reshape(out_features, runs, -1)
        alpha = chunks.max(axis=2)
        # Float equality of finite non-zero values is bit equality; -0.0 decodes as +0.0 (same products).
        if np.array_equal(codes.reshape(chunks.shape) * alpha[:, :, None], w.reshape(chunks.shape)):
            return RecoveredCodes(codes, alpha, tuple(range(0, in_features + 1, in_features // runs)))
    starts = _run_starts(magnitude, max_runs) if uneven else None
    if starts is None:
        return None
    alpha = np.stack([magnitude[:, a:b].max(axis=1) for a, b in zip(starts[:-1], starts[1:])], axis=1)
    if not np.array_equal(codes * np.repeat(alpha, np.diff(starts), axis=1), w):
        return None
    return RecoveredCodes(codes, alpha, tuple(int(s) for s in starts))


def _magnitude_segments(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Non-zero magnitudes in row-major order, cut into segments of equal consecutive values within a row.

    Returns (row of each value, value, segment of each value, length of each segment).
    """
    w = np.abs(np.asarray(weight, dtype=np.float32))
    rows, cols = np.nonzero(w)
    values = w[rows, cols]
    starts = np.ones(values.size, dtype=bool)
    starts[1:] = (rows[1:] != rows[:-1]) | (values[1:] != values[:-1])
    segment = np.cumsum(starts) - 1
    return rows, values, segment, np.bincount(segment) if values.size else np.zeros(0, np.int64)


def lowbit_evidence(weight: np.ndarray) -> float:
    """How many non-zero values, on average, repeat the magnitude just before them in their row, plus one.

    Binary / ternary weights keep one magnitude per row (or per run of a row): hundreds of values
    in a row share it. Float weights almost never repeat a magnitude, however many of them are zero
    (pruned): zeros are skipped, so sparsity cannot make a float tensor look low-bit.
    """
    rows, values, segment, lengths = _magnitude_segments(weight)
    return float(values.size / lengths.size) if lengths.size else 0.0


def describe_mismatch(weight: np.ndarray) -> tuple[int, float]:
    """For an almost-low-bit tensor: how many values break their run's magnitude, and by how much (relative).

    A value is off when it is not part of a segment of at least LOWBIT_MIN_EVIDENCE equal
    magnitudes; it is compared with the nearest such segment in its row.
    """
    rows, values, segment, lengths = _magnitude_segments(weight)
    if not values.size:
        return 0, 0.0
    index = np.arange(values.size)
    dominant = lengths[segment] >= LOWBIT_MIN_EVIDENCE
    before = np.maximum.accumulate(np.where(dominant, index, -1))
    after = np.minimum.accumulate(np.where(dominant, index, values.size)[::-1])[::-1]
    before_ok = (before >= 0) & (rows[np.clip(before, 0, None)] == rows)
    after_ok = (after < values.size) & (rows[np.clip(after, None, values.size - 1)] == rows)
    reference = np.where(before_ok, before, np.where(after_ok, after, -1))
    off = ~dominant
    compared = off & (reference >= 0)
    ref_values = values[reference[compared]]
    worst = float(np.max(np.abs(values[compared] - ref_values) / ref_values)) if compared.any() else 0.0
    return int(off.sum()), worst


class QuantLinear(nn.Module):
    """A Linear whose weight is exactly codes * alpha (per row, or per row and run), with its input
    quantized to 8 bits ("dynamic" / "static") or left in float ("none").

    Wraps the original nn.Linear (whose weight must already be `fake_quantize_weight(...)`), so
    exporting the unwrapped model gives the float weights the graph rewrites recover codes from.
    With several runs per row, each run's integer sum is rescaled by its alpha on its own and the
    runs are added left to right, as the lowered graph does.
    """

    def __init__(self, linear: nn.Linear, mode: str, static_scale: float | None = None) -> None:
        super().__init__()
        recovered = recover_codes(linear.weight.detach().numpy(), MAX_RUNS_PER_ROW, uneven=True)
        if recovered is None:
            raise ValueError(f"QuantLinear needs a weight that is exactly codes * alpha per row (or per run, at most {MAX_RUNS_PER_ROW} per row)")
        self.linear = linear
        self.mode = mode
        self.static_scale = static_scale
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.runs = recovered.run_slices()
        self.register_buffer("codes", torch.from_numpy(recovered.codes.astype(np.float32)))
        self.register_buffer("alpha", torch.from_numpy(recovered.alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":  # float activations: the weight is codes * alpha already
            return self.linear(x)
        scale = activation_scale(x, self.mode, self.static_scale)
        q = quantize_activation(x, scale)
        y = None
        for r, run in enumerate(self.runs):
            acc = q[..., run] @ self.codes[:, run].T  # exact: integers below 2**24
            alpha = self.alpha[:, r]
            part = (acc * alpha) * scale if self.mode == "dynamic" else acc * (scale * alpha)
            y = part if y is None else y + part
        bias = self.linear.bias
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
