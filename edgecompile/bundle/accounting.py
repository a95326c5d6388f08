"""What a graph holds: its parameter count, and the projection MACs actually present in it (tests check a
family's structural MACs count, families/*.macs_per_token, against the rewritten graph with it)."""

from __future__ import annotations


import numpy as np
import onnx_ir as ir



def linear_macs_from_graph(model: ir.Model) -> int:
    """Sum of K*N over MatMuls whose weight is a rank-2 initializer (per-token projections)."""
    total = 0
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].is_initializer():
            shape = node.inputs[1].const_value.shape
            if len(shape) == 2:
                total += int(shape[0]) * int(shape[1])
    return total


def parameter_count(model: ir.Model) -> int:
    """Float values stored in the graph's initializers (weights, biases, norms, embeddings)."""
    count = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            count += int(np.prod(tensor.shape.numpy(), dtype=np.int64))
    return count
