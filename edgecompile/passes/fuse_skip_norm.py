"""Residual Add + RMSNorm -> SkipSimplifiedLayerNormalization (com.microsoft), as onnxruntime-genai emits it.

`y = RMSNorm(a + b)` where the sum also continues down the residual stream becomes one node whose
fourth output is `a + b`. Exact: the contrib kernel adds, then normalises, in float32 like the pair.
onnxruntime does not fuse this pair itself when the sum has other consumers.
"""

from __future__ import annotations

import onnx_ir as ir

from edgecompile.passes.provenance import module_of, set_module

MS_DOMAIN = "com.microsoft"


class FuseSkipNorm(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.fused = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for norm in list(graph):
            if norm.op_type != "SimplifiedLayerNormalization" or norm.domain not in ("", "ai.onnx"):
                continue
            add = norm.inputs[0].producer()
            if add is None or add.op_type != "Add" or any(v is None or v.is_initializer() or v.const_value is not None for v in add.inputs):
                continue
            if add.outputs[0] in graph.outputs or add.inputs[0].shape != add.inputs[1].shape:
                continue
            attributes = {k: v for k, v in norm.attributes.items() if k in ("epsilon",)}
            skip = ir.node("SkipSimplifiedLayerNormalization", [add.inputs[0], add.inputs[1], norm.inputs[1]],
                           attributes=attributes, domain=MS_DOMAIN, num_outputs=4,
                           name=f"{norm.name}/Skip")
            set_module(skip, module_of(norm))
            graph.insert_before(norm, skip)
            ir.convenience.replace_all_uses_with(norm.outputs[0], skip.outputs[0])
            ir.convenience.replace_all_uses_with(add.outputs[0], skip.outputs[3])
            self.fused += 1
        if self.fused:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(self.fused))
