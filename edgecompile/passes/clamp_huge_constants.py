"""Replace huge float constants (BERT's attention-mask fill, finfo(float32).min) by +-limit.

softmax(score - 100) is already 0 in float32, so the model computes the same thing; but a -3.4e38
in a tensor that gets calibrated makes its quantization scale ~5e33 and every real attention score
quantizes to 0 (measured: MiniLM on QNN HTP went from cosine 0.9963 to 0.32 without this).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.passes.tensors import unique_initializer_name


class ClampHugeConstants(ir.passes.InPlacePass):
    def __init__(self, threshold: float = 1e4, replacement: float = 100.0, max_size: int = 16) -> None:
        super().__init__()
        self.threshold, self.replacement, self.max_size = threshold, replacement, max_size
        self.replaced: list[str] = []

    def _clamped(self, tensor: ir.TensorProtocol | None) -> np.ndarray | None:
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size > self.max_size:
            return None
        array = tensor.numpy()
        if not np.any(np.abs(array) > self.threshold):
            return None
        return np.where(np.abs(array) > self.threshold, np.sign(array) * self.replacement, array).astype(np.float32)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for value in list(graph.initializers.values()):
            array = self._clamped(value.const_value)
            if array is not None:
                value.const_value = ir.tensor(array, name=value.name)
                self.replaced.append(value.name)
        for node in graph:
            if node.op_type == "Constant" and "value" in node.attributes:
                array = self._clamped(node.attributes["value"].as_tensor())
                if array is not None:
                    name = unique_initializer_name(graph, f"{node.name or 'constant'}.clamped")
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=name))
                    self.replaced.append(node.name or node.outputs[0].name)
        return ir.passes.PassResult(model, modified=bool(self.replaced))
