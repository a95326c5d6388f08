"""A small helper for writing ONNX graphs with onnx-ir, node by node, with module provenance.

Node names follow the TorchScript exporter's `/module/path/Op` form and every node carries its
module in metadata (passes/provenance.py), so a graph written here is found by the same site
finders as an exported one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from edgecompile.passes.provenance import set_module


class GraphWriter:
    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._names: dict[str, int] = {}

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        array = np.ascontiguousarray(array)
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.initializers.append(value)
        return value

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], module: str, *, name: str | None = None,
           domain: str = "", outputs: int = 1, **attributes: Any) -> ir.Value | tuple[ir.Value, ...]:
        """Append one node of `module`; returns its output (or outputs, when `outputs` > 1)."""
        base = f"/{module.replace('.', '/')}/{name or op_type}" if module else f"/{name or op_type}"
        count = self._names.get(base, 0)
        self._names[base] = count + 1
        node_name = base if count == 0 else f"{base}_{count}"
        node = ir.node(op_type, list(inputs), attributes=attributes, domain=domain, name=node_name, num_outputs=outputs)
        for i, value in enumerate(node.outputs):
            value.name = f"{node_name}/output_{i}"
        set_module(node, module)
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def model(self, name: str, inputs: list[ir.Value], outputs: list[ir.Value], opsets: dict[str, int]) -> ir.Model:
        graph = ir.Graph(inputs, outputs, nodes=self.nodes, initializers=self.initializers, opset_imports=opsets, name=name)
        return ir.Model(graph, ir_version=10, producer_name="edgecompile")


def tensor_value(name: str, dtype: ir.DataType, dims: Sequence[int | str]) -> ir.Value:
    """A graph input / output with named symbolic dimensions."""
    return ir.Value(name=name, shape=ir.Shape(list(dims)), type=ir.TensorType(dtype))
