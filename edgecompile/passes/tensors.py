"""Graph-edit helpers: copy-on-write constant inputs, and one node standing in for another.

Exported initializers can be shared (the exporter deduplicates equal tensors, and every cluster
graph is a clone sharing tensors with the dense export), so a rewrite never edits a tensor in
place: it registers a new initializer and points one node input at it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.passes.provenance import set_module


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


def replace_node(graph: ir.Graph, node: ir.Node, replacement: ir.Node, module: str) -> None:
    """`replacement` computes what `node`'s one output did: inserted before it with `module`'s provenance, every use
    moved to it (a graph output too, e.g. the logits, keeping its name), `node` removed."""
    set_module(replacement, module)
    graph.insert_before(node, replacement)
    output, new = node.outputs[0], replacement.outputs[0]
    new.shape, new.type = output.shape, output.type
    ir.convenience.replace_all_uses_with(output, new, replace_graph_outputs=True)
    name = output.name
    graph.remove(node, safe=True)
    new.name = name
