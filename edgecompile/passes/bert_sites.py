"""Locate BERT sub-layers in an exported graph by module provenance.

A `LinearSite` is one nn.Linear as exported: MatMul(x, W^T) then Add(bias). A layer's residual
adds are the Add nodes directly in `...attention.output` and `...output` (the branch enters from
the dense projection, the other input is the residual stream). Sites are found afresh on every
call, so a pass always sees the graph as the previous pass left it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgecompile.passes.provenance import module_of


@dataclass(frozen=True)
class BertStructure:
    """What the passes need to know about the exported encoder."""

    encoder_path: str  # e.g. "model.encoder"
    num_layers: int
    num_heads: int
    head_size: int
    lowbit_modules: frozenset[str] = frozenset()  # Linears whose weights must stay codes * alpha


@dataclass
class LinearSite:
    module: str
    matmul: ir.Node
    bias_add: ir.Node
    bias_index: int  # which input of bias_add is the bias

    @property
    def weight(self) -> ir.Value:  # [in, out]
        return self.matmul.inputs[1]

    @property
    def bias(self) -> ir.Value:
        return self.bias_add.inputs[self.bias_index]

    @property
    def output(self) -> ir.Value:
        return self.bias_add.outputs[0]

    def weight_array(self) -> np.ndarray:
        return self.weight.const_value.numpy()

    def bias_array(self) -> np.ndarray:
        return self.bias.const_value.numpy()


@dataclass
class BertLayerSites:
    index: int
    query: LinearSite | None
    key: LinearSite | None
    value: LinearSite | None
    attention_output: LinearSite | None
    attention_residual: ir.Node | None
    intermediate: LinearSite | None
    ffn_output: LinearSite | None
    ffn_residual: ir.Node | None

    @property
    def has_attention(self) -> bool:
        return self.attention_output is not None and self.attention_residual is not None

    @property
    def has_ffn(self) -> bool:
        return self.ffn_output is not None and self.ffn_residual is not None


class StructureError(RuntimeError):
    """The export does not look like the BERT we expect: a bug in edgecompile, not user input."""


def _is_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer()


def linear_site(module: str, nodes: list[ir.Node]) -> LinearSite | None:
    """The Linear exported from `module` (MatMul with a constant weight, then Add bias), if present."""
    matmuls = [n for n in nodes if n.op_type == "MatMul" and _is_initializer(n.inputs[1])]
    if not matmuls:
        return None
    if len(matmuls) != 1:
        raise StructureError(f"{module}: expected one MatMul with a constant weight, found {len(matmuls)}")
    matmul = matmuls[0]
    users = [use.node for use in matmul.outputs[0].uses()]
    if len(users) != 1 or users[0].op_type != "Add":
        raise StructureError(f"{module}: expected MatMul -> Add(bias), found {[u.op_type for u in users]}")
    add = users[0]
    bias_index = 0 if add.inputs[1] is matmul.outputs[0] else 1
    if not _is_initializer(add.inputs[bias_index]):
        raise StructureError(f"{module}: the bias of the projection is not a constant")
    return LinearSite(module, matmul, add, bias_index)


def _residual_add(module: str, nodes: list[ir.Node], branch: LinearSite | None) -> ir.Node | None:
    adds = [n for n in nodes if n.op_type == "Add"]
    if branch is not None:
        adds = [n for n in adds if branch.output in n.inputs]
    if len(adds) > 1:
        raise StructureError(f"{module}: expected one residual Add, found {len(adds)}")
    return adds[0] if adds else None


def find_bert_layers(model: ir.Model, structure: BertStructure) -> list[BertLayerSites]:
    by_module: dict[str, list[ir.Node]] = defaultdict(list)
    for node in model.graph:
        by_module[module_of(node)].append(node)
    layers = []
    for i in range(structure.num_layers):
        prefix = f"{structure.encoder_path}.layer.{i}"
        site = {name: linear_site(f"{prefix}.{path}", by_module.get(f"{prefix}.{path}", [])) for name, path in (
            ("query", "attention.self.query"),
            ("key", "attention.self.key"),
            ("value", "attention.self.value"),
            ("attention_output", "attention.output.dense"),
            ("intermediate", "intermediate.dense"),
            ("ffn_output", "output.dense"),
        )}
        attention_residual = _residual_add(f"{prefix}.attention.output", by_module.get(f"{prefix}.attention.output", []), site["attention_output"])
        ffn_residual = _residual_add(f"{prefix}.output", by_module.get(f"{prefix}.output", []), site["ffn_output"])
        layers.append(BertLayerSites(i, attention_residual=attention_residual, ffn_residual=ffn_residual, **site))
    return layers
