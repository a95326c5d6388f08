"""Pin the dynamic batch and sequence axes to fixed sizes (NPUs such as QNN HTP need static shapes)."""

from __future__ import annotations

import onnx_ir as ir

BATCH_AXES = ("batch_size", "batch")
SEQUENCE_AXES = ("sequence_length", "sequence", "seq")


class FixBatchAndSequence(ir.passes.InPlacePass):
    def __init__(self, batch: int, sequence: int) -> None:
        super().__init__()
        self.sizes = {**dict.fromkeys(BATCH_AXES, batch), **dict.fromkeys(SEQUENCE_AXES, sequence)}

    def _fixed(self, shape: ir.Shape | None) -> ir.Shape | None:
        if shape is None:
            return None
        return ir.Shape([self.sizes.get(str(d), d) if not isinstance(d, int) else d for d in shape])

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for value in list(model.graph.inputs) + list(model.graph.outputs):
            value.shape = self._fixed(value.shape)
        for node in model.graph:  # intermediate shapes are re-inferred by the tools that need them
            for value in node.outputs:
                if value not in model.graph.outputs:
                    value.shape = None
        return ir.passes.PassResult(model, modified=True)
