"""A tied embedding stored once: the lm_head reads the embedding table itself, transposed inside the kernel.

After export an fp32 decoder with tie_word_embeddings holds the table twice: [V, H] for the embedding Gather and its
transpose [H, V] for the lm_head MatMul. The MatMul becomes FusedMatMul(x, table, transB=1) (com.microsoft; the node
onnxruntime's own Transpose + MatMul fusion makes), whose kernel packs the transposed table once at session load as
it packs a MatMul weight: the same values, a sixth less file for SmolLM2-135M (653.5 -> 540.3 MB), peak memory 704 MB
against 683 with the table twice. (Feeding the Gather a Transpose of the lm_head weight instead, as onnxruntime-genai's
builder does, saves the same file bytes but onnxruntime folds that Transpose into a third copy at load: 792 MB.) Quantized
targets tie the table through the lm_head's own blob (quantize_weights) and leave nothing for this pass to match.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.passes.provenance import module_of
from edgecompile.passes.tensors import replace_node

MS_DOMAIN = "com.microsoft"


class ShareTiedEmbedding(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.shared: str | None = None  # the module whose MatMul now reads the embedding table

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        tables = [node.inputs[0] for node in graph if node.op_type == "Gather" and node.domain in ("", "ai.onnx")
                  and node.attributes.get_int("axis", 0) == 0 and _float_matrix(node.inputs[0])]
        transposed: dict[int, ir.Value | None] = {}  # id(weight value) -> the table it is the transpose of
        for node in list(graph):  # every MatMul reading the weight (multi-token heads share the unembedding)
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or not _float_matrix(node.inputs[1]):
                continue
            weight = node.inputs[1]
            if id(weight) not in transposed:
                transposed[id(weight)] = next((t for t in tables if tuple(t.const_value.shape) == tuple(reversed(weight.const_value.shape))
                                               and np.array_equal(weight.const_value.numpy().T, t.const_value.numpy())), None)
            table = transposed[id(weight)]
            if table is None:
                continue
            fused = ir.node("FusedMatMul", [node.inputs[0], table], attributes={"transA": 0, "transB": 1, "alpha": 1.0},
                            domain=MS_DOMAIN, name=f"{node.name}/FusedMatMul")
            self.shared = module_of(node)
            replace_node(graph, node, fused, self.shared)
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=self.shared is not None)


def _float_matrix(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT \
        and len(value.const_value.shape) == 2
