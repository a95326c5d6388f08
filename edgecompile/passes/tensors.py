"""Copy-on-write helpers for constant inputs.

Exported initializers can be shared (the exporter deduplicates equal tensors, and every cluster
graph is a clone sharing tensors with the dense export), so a rewrite never edits a tensor in
place: it registers a new initializer and points one node input at it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def unique_initializer_name(graph: ir.Graph, hint: str) -> str:
    if hint not in graph.initializers:
        return hint
    n = 1
    while f"{hint}.{n}" in graph.initializers:
        n += 1
    return f"{hint}.{n}"


def new_initializer(graph: ir.Graph, array: np.ndarray, name_hint: str) -> ir.Value:
    name = unique_initializer_name(graph, name_hint)
    tensor = ir.tensor(np.asarray(array, order="C"), name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def replace_constant_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name_hint: str) -> ir.Value:
    value = new_initializer(graph, array, name_hint)
    node.replace_input_with(index, value)
    return value
