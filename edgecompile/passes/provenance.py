"""Record which torch module produced each node, as node metadata the other passes query."""

from __future__ import annotations

import onnx_ir as ir

MODULE_KEY = "edgecompile.module"


def module_of_node_name(name: str) -> str:
    """'/model/encoder/layer.0/attention/self/query/MatMul' -> 'model.encoder.layer.0.attention.self.query'."""
    parts = [p for p in name.split("/") if p]
    return ".".join(parts[:-1])


def module_of(node: ir.Node) -> str:
    return node.metadata_props.get(MODULE_KEY, "")


def set_module(node: ir.Node, module: str) -> None:
    node.metadata_props[MODULE_KEY] = module


class TagModuleProvenance(ir.passes.InPlacePass):
    """Tags nodes of a TorchScript export with the dotted module path taken from the node name."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in model.graph:
            if node.name and node.name.startswith("/"):
                set_module(node, module_of_node_name(node.name))
        return ir.passes.PassResult(model, modified=True)
