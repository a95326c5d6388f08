"""Low-bit weights as exact QDQ weights: DequantizeLinear(int8 codes * c, alpha / c per output channel).

For targets that run QDQ graphs (QNN HTP): the codes must reach the NPU exactly, never be
re-quantized from floats. A DequantizeLinear already in front of a weight is kept untouched by
onnxruntime's quantizer, so the int8 codes and per-channel scales pass through as they are. The
codes are stored multiplied by c = 127 (still exactly ternary): HTP's 16-bit-activation MatMul was
measured about 6x less precise with codes of only +-1 than with codes filling the int8 range.
Word embeddings are left to the QDQ recipe (quantized like any other table, not exact codes): QNN
HTP failed to finalize every graph we tried with the codes kept exact in front of the Gather --
a per-row DequantizeLinear (EP: "unsupported node"), and a per-tensor one followed by a Mul with
the gathered alphas (QNN_COMMON_ERROR_MEM_ALLOC, no per-node reason). A weight with several
alphas per row (DeepSpeed groups that cut rows) becomes one such MatMul per run of input features.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from edgecompile.passes.sites import StructureError, linear_site
from edgecompile.passes.provenance import module_of, set_module
from edgecompile.passes.tensors import new_initializer
from edgecompile.reference.lowbit import MAX_RUNS_PER_ROW, recover_codes

CODE_SCALE = 127


def _dequantized(graph: ir.Graph, codes: np.ndarray, scale: np.ndarray, axis: int, module: str, anchor: ir.Node, tag: str = "") -> ir.Value:
    """DequantizeLinear(int8 codes * c, per-channel scale along `axis`) with zero point 0, before `anchor`."""
    stored = (codes.astype(np.int32) * CODE_SCALE).astype(np.int8)
    q = new_initializer(graph, stored, f"{module}.codes_x{CODE_SCALE}{tag}")
    s = new_initializer(graph, scale.astype(np.float32), f"{module}.code_scale{tag}")
    z = new_initializer(graph, np.zeros(scale.shape, np.int8), f"{module}.zero_point{tag}")
    node = ir.node("DequantizeLinear", [q, s, z], {"axis": axis}, name=f"/{module.replace('.', '/')}/lowbit/DequantizeLinear{tag}")
    set_module(node, module)
    graph.insert_before(anchor, node)
    return node.outputs[0]


def _split_by_runs(graph: ir.Graph, site, recovered) -> None:
    """Several alphas per row (DeepSpeed groups that cut rows): one MatMul per run of input features,
    each over exact codes with its own per-channel alphas, added left to right."""
    module, x = site.module, site.matmul.inputs[0]
    total = None
    for r, run in enumerate(recovered.run_slices()):
        tag = f".run{r}"
        bounds = [new_initializer(graph, np.array([v], np.int64), f"{module}.run_{name}{tag}")
                  for name, v in (("start", run.start), ("stop", run.stop), ("axis", -1))]
        piece = ir.node("Slice", [x, *bounds], name=f"/{module.replace('.', '/')}/lowbit/Slice{tag}")
        scale = (recovered.alpha[:, r] / np.float32(CODE_SCALE)).astype(np.float32)
        weight = _dequantized(graph, recovered.codes[:, run].T, scale, 1, module, site.matmul, tag)
        matmul = ir.node("MatMul", [piece.outputs[0], weight], name=f"/{module.replace('.', '/')}/lowbit/MatMul{tag}")
        nodes = [piece, matmul]
        if total is not None:
            nodes.append(ir.node("Add", [total, matmul.outputs[0]], name=f"/{module.replace('.', '/')}/lowbit/Add{tag}"))
        for node in nodes:
            set_module(node, module)
        graph.insert_before(site.matmul, nodes)
        total = nodes[-1].outputs[0]
    ir.convenience.replace_all_uses_with(site.matmul.outputs[0], total)


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
            site = linear_site(module, by_module.get(module, []), bias=None)
            if site is None:
                continue
            recovered = recover_codes(site.weight_array().T, MAX_RUNS_PER_ROW, uneven=True)
            if recovered is None:
                raise StructureError(f"{module}: declared low-bit, but its weight is not exactly codes * alpha per row (or per run)")
            if recovered.runs > 1:
                _split_by_runs(graph, site, recovered)
            else:
                scale = (recovered.alpha[:, 0] / np.float32(CODE_SCALE)).astype(np.float32)
                site.matmul.replace_input_with(1, _dequantized(graph, recovered.codes.T, scale, 1, module, site.matmul))
            self.converted.append(module)
        return ir.passes.PassResult(model, modified=bool(self.converted))
