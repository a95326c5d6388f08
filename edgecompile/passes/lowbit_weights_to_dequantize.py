"""Low-bit weights as exact QDQ weights: DequantizeLinear(int8 codes * c, alpha / c per output channel).

For targets that run QDQ graphs (QNN HTP): the codes must reach the NPU exactly, never be
re-quantized from floats. A DequantizeLinear already in front of a weight is kept untouched by
onnxruntime's quantizer, so the int8 codes and per-channel scales pass through as they are. The
codes are stored multiplied by c = 127 (still exactly ternary): HTP's 16-bit-activation MatMul was
measured about 6x less precise with codes of only +-1 than with codes filling the int8 range.
Word embeddings (one alpha per row) become DequantizeLinear(int8 codes * c, alpha / c, axis 0).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from edgecompile.passes.bert_sites import StructureError, linear_site
from edgecompile.passes.provenance import module_of, set_module
from edgecompile.passes.tensors import new_initializer
from edgecompile.reference.lowbit import recover_codes

CODE_SCALE = 127


def _dequantized(graph: ir.Graph, codes: np.ndarray, alpha: np.ndarray, axis: int, module: str, anchor: ir.Node) -> ir.Value:
    scale = (alpha.astype(np.float32) / np.float32(CODE_SCALE)).astype(np.float32)
    stored = (codes.astype(np.int32) * CODE_SCALE).astype(np.int8)
    q = new_initializer(graph, stored, f"{module}.codes_x{CODE_SCALE}")
    s = new_initializer(graph, scale, f"{module}.code_scale")
    z = new_initializer(graph, np.zeros_like(stored, shape=scale.shape), f"{module}.zero_point")
    node = ir.node("DequantizeLinear", [q, s, z], {"axis": axis}, name=f"/{module.replace('.', '/')}/lowbit/DequantizeLinear")
    set_module(node, module)
    graph.insert_before(anchor, node)
    return node.outputs[0]


class LowBitWeightsToDequantize(ir.passes.InPlacePass):
    def __init__(self, linears: list[str], embedding: str | None) -> None:
        super().__init__()
        self.linears, self.embedding = linears, embedding
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
            weight = _dequantized(graph, recovered.codes.T, recovered.alpha, 1, module, site.matmul)
            site.matmul.replace_input_with(1, weight)
            self.converted.append(module)
        if self.embedding:
            gathers = [n for n in by_module.get(self.embedding, []) if n.op_type == "Gather" and n.inputs[0].is_initializer()]
            if len(gathers) == 1:
                recovered = recover_codes(gathers[0].inputs[0].const_value.numpy())
                if recovered is None:
                    raise StructureError(f"{self.embedding}: declared low-bit, but the table is not exactly codes * alpha per row")
                gathers[0].replace_input_with(0, _dequantized(graph, recovered.codes, recovered.alpha, 0, self.embedding, gathers[0]))
                self.converted.append(self.embedding)
        return ir.passes.PassResult(model, modified=bool(self.converted))
