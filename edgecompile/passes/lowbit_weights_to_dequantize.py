"""Low-bit weights as exact QDQ weights: DequantizeLinear(int8 codes * c, alpha / c per output channel).

For targets that run QDQ graphs (QNN HTP): the codes must reach the NPU exactly, never be
re-quantized from floats. A DequantizeLinear already in front of a weight is kept untouched by
onnxruntime's quantizer, so the int8 codes and per-channel scales pass through as they are. The
codes are stored multiplied by c = 127 (still exactly ternary): HTP's 16-bit-activation MatMul was
measured about 6x less precise with codes of only +-1 than with codes filling the int8 range.
Word embeddings are left to the QDQ recipe (quantized like any other table, not exact codes): QNN
HTP failed to finalize every graph we tried with the codes kept exact in front of the Gather --
a per-row DequantizeLinear (EP: "unsupported node"), and a per-tensor one followed by a Mul with
the gathered alphas (QNN_COMMON_ERROR_MEM_ALLOC, no per-node reason).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from edgecompile.passes.sites import StructureError, linear_site
from edgecompile.passes.provenance import module_of, set_module
from edgecompile.passes.tensors import new_initializer
from edgecompile.reference.lowbit import recover_codes

CODE_SCALE = 127


def _dequantized(graph: ir.Graph, codes: np.ndarray, scale: np.ndarray, axis: int, module: str, anchor: ir.Node) -> ir.Value:
    """DequantizeLinear(int8 codes * c, per-channel scale along `axis`) with zero point 0, before `anchor`."""
    stored = (codes.astype(np.int32) * CODE_SCALE).astype(np.int8)
    q = new_initializer(graph, stored, f"{module}.codes_x{CODE_SCALE}")
    s = new_initializer(graph, scale.astype(np.float32), f"{module}.code_scale")
    z = new_initializer(graph, np.zeros(scale.shape, np.int8), f"{module}.zero_point")
    node = ir.node("DequantizeLinear", [q, s, z], {"axis": axis}, name=f"/{module.replace('.', '/')}/lowbit/DequantizeLinear")
    set_module(node, module)
    graph.insert_before(anchor, node)
    return node.outputs[0]


class LowBitWeightsToDequantize(ir.passes.InPlacePass):
    def __init__(self, linears: list[str]) -> None:
        super().__init__()
        self.linears = linears
        self.converted: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_module: dict[str, list[ir.Node]] = defaultdict(list)
        for node in graph:
            by_module[module_of(node)].append(node)
        for module in self.linears:
            site = linear_site(module, by_module.get(module, []))
            if site is None:
                continue
            recovered = recover_codes(site.weight_array().T)
            if recovered is None:
                raise StructureError(f"{module}: declared low-bit, but its weight is not exactly codes * alpha per row")
            scale = (recovered.alpha / np.float32(CODE_SCALE)).astype(np.float32)
            weight = _dequantized(graph, recovered.codes.T, scale, 1, module, site.matmul)
            site.matmul.replace_input_with(1, weight)
            self.converted.append(module)
        return ir.passes.PassResult(model, modified=bool(self.converted))
