"""Static QDQ for NPU targets, with onnxruntime's own quantization tools (calibrate -> QDQ).

The recipe (measured on QNN HTP, see docs/targets.md): static shapes first; onnxruntime's QNN
preprocessing (folds the now-static shape chains, fuses Erf into Gelu and ReduceL2/Div into
LpNormalization, which HTP needs); MinMax calibration over the build's samples; uint16
activations, uint8 default weights (HTP rejects int8 LayerNorm gamma), and symmetric per-channel
int8 MatMul/Gemm weights (per-tensor uint8 lost ~3e-2 cosine on MiniLM). Weights that are already
behind a DequantizeLinear (exact low-bit codes) are left as they are.

These tools work on files, so each step round-trips through a temporary folder.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

QUANT_TYPES = {"uint16": "QUInt16", "uint8": "QUInt8", "int8": "QInt8"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization warns on the root logger about steps this recipe already does."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _roundtrip(model: ir.Model, work, name: str) -> tuple[Path, Path]:
    src, dst = Path(work) / f"{name}.in.onnx", Path(work) / f"{name}.out.onnx"
    ir.save(model, src)
    return src, dst


def _load(path: Path) -> ir.Model:
    model = ir.from_proto(onnx.load(str(path)))  # tensors inline: the temporary folder can go
    return model


def qnn_preprocess(model: ir.Model) -> ir.Model:
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    with tempfile.TemporaryDirectory() as work:
        src, dst = _roundtrip(model, work, "preprocess")
        with _quiet():
            changed = qnn_preprocess_model(str(src), str(dst))
        return _load(dst) if changed else _load(src)


class _Feeds:
    """onnxruntime CalibrationDataReader over prepared feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], names: list[str]) -> None:
        self.feeds = [{k: f[k] for k in names} for f in feeds]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def _weight_overrides(proto: onnx.ModelProto, kind: str) -> dict[str, list[dict[str, Any]]]:
    """Symmetric per-channel int8 on the output axis for every MatMul/Gemm weight initializer."""
    from onnxruntime.quantization import QuantType

    if kind != "int8-per-channel":
        return {}
    initializers = {i.name: i for i in proto.graph.initializer}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for node in proto.graph.node:
        if len(node.input) < 2 or node.input[1] not in initializers or len(initializers[node.input[1]].dims) != 2:
            continue
        if node.op_type == "MatMul":
            axis = 1
        elif node.op_type == "Gemm":
            axis = 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
        else:
            continue
        overrides.setdefault(node.input[1], [{"quant_type": QuantType.QInt8, "symmetric": True, "axis": axis}])
    return overrides


def quantize_static_qdq(model: ir.Model, feeds: list[dict[str, np.ndarray]], activations: str, weights: str,
                        matmul_weights: str) -> ir.Model:
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    with tempfile.TemporaryDirectory() as work:
        src, dst = _roundtrip(model, work, "quantize")
        proto = onnx.load(str(src))
        names = [i.name for i in proto.graph.input]
        with _quiet():
            config = get_qnn_qdq_config(
                str(src), _Feeds(feeds, names),
                activation_type=getattr(QuantType, QUANT_TYPES[activations]),
                weight_type=getattr(QuantType, QUANT_TYPES[weights]),
                init_overrides=_weight_overrides(proto, matmul_weights) or None,
            )
        with _quiet():
            quantize(str(src), str(dst), config)
        return _load(dst)
