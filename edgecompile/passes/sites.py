"""Where a transformer layer's prunable parts are in an exported graph, for every model family.

A family module (edgecompile/families/) finds, per layer, its two residual branches by module
provenance and describes them with these classes; the pruning passes work on the description only,
so they serve post-LayerNorm encoders (BERT) and pre-norm decoders (Llama) alike.

A `LinearSite` is one nn.Linear as exported: MatMul(x, W^T), then Add(bias) when it has a bias.
A `BranchSites` is one residual branch, `residual + down(f(ups(x)))`, whose inner width is made of
units (attention heads of `unit_size` features, or FFN neurons of one). Sites are found afresh on
every call, so a pass always sees the graph as the previous pass left it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_ir as ir

from edgecompile.passes.provenance import module_of


# node metadata: the ORIGINAL query-head ids a node computes, kept up to date as heads are sliced away,
# so every family's passes and the manifest name heads as the masks do
HEAD_IDS_KEY = "edgecompile.head_ids"


class StructureError(RuntimeError):
    """The export does not look like the family says: a bug in edgecompile, not user input."""


@dataclass
class LinearSite:
    module: str
    matmul: ir.Node
    bias_add: ir.Node | None = None
    bias_index: int = 1  # which input of bias_add is the bias

    @property
    def weight(self) -> ir.Value:  # [in, out]
        return self.matmul.inputs[1]

    @property
    def bias(self) -> ir.Value | None:
        return None if self.bias_add is None else self.bias_add.inputs[self.bias_index]

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.matmul).outputs[0]

    def weight_array(self) -> np.ndarray:
        return self.weight.const_value.numpy()

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else self.bias.const_value.numpy()


@dataclass
class BranchSites:
    """One residual branch: `residual_add = residual + down(f(ups(x)))`.

    Units are the branch's inner width, `unit_size` features each. `unit_ids` names the units the
    graph holds by their index in the mask (a checkpoint may already lack some); `unit_groups[u]`
    is the group of unit u: a group is one key/value head under grouped-query attention, sliced from
    `group_ups`, and it is removed from the graph only when every unit in it is removed. Without
    groups every unit is its own group. `output_norm`, when the family has one, normalizes `down`'s
    output before the residual add. `state_inputs` / `state_outputs` are graph inputs and
    outputs that live and die with the branch (a decoder layer's KV cache). `on_resize(kept_units,
    kept_groups)` (positions among the graph's units and groups) lets the family's attention op follow.
    """

    residual_add: ir.Node
    ups: list[LinearSite]
    down: LinearSite
    unit_size: int = 1
    unit_ids: np.ndarray | None = None
    unit_groups: np.ndarray | None = None
    group_ups: list[LinearSite] = field(default_factory=list)
    state_inputs: list[ir.Value] = field(default_factory=list)
    state_outputs: list[ir.Value] = field(default_factory=list)
    on_resize: Callable[[np.ndarray, np.ndarray], None] | None = None
    # A norm on the branch's output (Gemma's post-attention / post-feedforward norms): the branch is
    # `norm(down(...))`, and its weight (input 1) is what scales the branch.
    output_norm: ir.Node | None = None

    @property
    def output(self) -> ir.Value:
        """What the branch adds to the residual stream."""
        return self.output_norm.outputs[0] if self.output_norm is not None else self.down.output

    @property
    def num_units(self) -> int:
        return self.down.weight_array().shape[0] // self.unit_size

    def ids(self) -> np.ndarray:
        return np.arange(self.num_units) if self.unit_ids is None else self.unit_ids

    def groups(self) -> np.ndarray:
        return np.arange(self.num_units) if self.unit_groups is None else self.unit_groups


@dataclass
class LayerSites:
    index: int
    attention: BranchSites | None
    ffn: BranchSites | None

    def branch(self, column: int) -> BranchSites | None:
        """Column of a `blocks` mask: 0 attention, 1 FFN."""
        return self.attention if column == 0 else self.ffn


class GraphStructure(Protocol):
    """What a family tells the passes about its export."""

    num_layers: int
    lowbit_modules: frozenset[str]  # Linears whose weights must stay codes * alpha

    def find_layers(self, model: ir.Model) -> list[LayerSites]: ...


def nodes_by_module(model: ir.Model) -> dict[str, list[ir.Node]]:
    by_module: dict[str, list[ir.Node]] = defaultdict(list)
    for node in model.graph:
        by_module[module_of(node)].append(node)
    return by_module


def _is_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer()


def linear_site(module: str, nodes: list[ir.Node], *, bias: bool | None = True) -> LinearSite | None:
    """The Linear exported from `module` (MatMul with a constant weight [, then Add bias]), if present.

    bias: True, the Linear has one (an error if not found); False, it has none; None, whichever the graph shows.
    """
    matmuls = [n for n in nodes if n.op_type == "MatMul" and _is_initializer(n.inputs[1])]
    if not matmuls:
        return None
    if len(matmuls) != 1:
        raise StructureError(f"{module}: expected one MatMul with a constant weight, found {len(matmuls)}")
    matmul = matmuls[0]
    users = [use.node for use in matmul.outputs[0].uses()]
    if bias is None:
        has_bias = len(users) == 1 and users[0].op_type == "Add" and any(
            v is not matmul.outputs[0] and _is_initializer(v) for v in users[0].inputs)
        bias = has_bias
    if not bias:
        return LinearSite(module, matmul)
    if len(users) != 1 or users[0].op_type != "Add":
        raise StructureError(f"{module}: expected MatMul -> Add(bias), found {[u.op_type for u in users]}")
    add = users[0]
    bias_index = 0 if add.inputs[1] is matmul.outputs[0] else 1
    if not _is_initializer(add.inputs[bias_index]):
        raise StructureError(f"{module}: the bias of the projection is not a constant")
    return LinearSite(module, matmul, add, bias_index)


def residual_add(module: str, nodes: list[ir.Node], branch: LinearSite | None, output: ir.Value | None = None) -> ir.Node | None:
    """The one Add in `nodes` that takes the branch's output (`output`, else the branch projection's; or the one
    Add, without a branch)."""
    adds = [n for n in nodes if n.op_type == "Add"]
    if output is None and branch is not None:
        output = branch.output
    if output is not None:
        adds = [n for n in adds if output in n.inputs]
    if len(adds) > 1:
        raise StructureError(f"{module}: expected one residual Add, found {len(adds)}")
    return adds[0] if adds else None
