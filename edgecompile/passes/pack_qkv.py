"""Pack a decoder layer's q/k/v projections into one MatMul feeding GroupQueryAttention (packed QKV input).

One weight read of [hidden, (heads + 2 kv_heads) * head_dim] instead of three, as onnxruntime-genai's own
builder emits it; GroupQueryAttention splits the packed input itself. Runs after pruning (the
shapes are the cluster's own), on fp32 projections only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.passes.provenance import module_of, set_module
from edgecompile.passes.tensors import new_initializer


def _projection(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "MatMul" or not node.inputs[1].is_initializer() or len(value.uses()) != 1:
        return None
    return node


class PackQkv(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.packed: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for node in list(graph):
            if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
                continue
            projections = [_projection(v) for v in node.inputs[:3]]
            if any(p is None for p in projections) or len({id(p.inputs[0]) for p in projections}) != 1:
                continue
            weights = [p.inputs[1].const_value.numpy() for p in projections]
            if any(w.dtype != np.float32 for w in weights):
                continue
            module = module_of(projections[0]).rsplit(".", 1)[0] + ".qkv_proj"
            packed = new_initializer(graph, np.concatenate(weights, axis=1), f"{module}.weight_t")
            matmul = ir.node("MatMul", [projections[0].inputs[0], packed], name=f"/{module.replace('.', '/')}/MatMul")
            set_module(matmul, module)
            graph.insert_before(projections[0], matmul)
            node.replace_input_with(0, matmul.outputs[0])
            node.replace_input_with(1, None)
            node.replace_input_with(2, None)
            self.packed.append(module)
        return ir.passes.PassResult(model, modified=bool(self.packed))
