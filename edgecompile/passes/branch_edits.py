"""Edits of a residual branch (`residual + branch`) shared by the pruning passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.passes.bert_sites import LinearSite
from edgecompile.passes.provenance import module_of, set_module
from edgecompile.passes.tensors import new_initializer, replace_constant_input


def _branch_index(residual_add: ir.Node, site: LinearSite) -> int:
    return 0 if residual_add.inputs[0] is site.output else 1


def drop_branch(residual_add: ir.Node, site: LinearSite) -> None:
    """`residual + branch` -> `residual`: consumers of the Add read the residual directly.

    The branch's nodes lose their last use and are removed by dead-code elimination.
    """
    residual = residual_add.inputs[1 - _branch_index(residual_add, site)]
    ir.convenience.replace_all_uses_with(residual_add.outputs[0], residual)


def branch_to_bias(residual_add: ir.Node, site: LinearSite) -> None:
    """`residual + linear(x)` -> `residual + bias`, for a projection whose every input unit is removed."""
    residual_add.replace_input_with(_branch_index(residual_add, site), site.bias)


def scale_linear_input(graph: ir.Graph, site: LinearSite, weight: np.ndarray, scales: np.ndarray, keep_weights: bool) -> None:
    """Point the Linear at `weight` ([in, out], already sliced) with its input features scaled by `scales`.

    Folded into the weight rows, unless `keep_weights` (low-bit weights must stay exactly
    codes * alpha): then the scales multiply the input with a Mul, as the reference gate does.
    """
    soft = not bool(np.all(scales == 1.0))
    if soft and not keep_weights:
        weight = (weight * scales.astype(np.float32)[:, None]).astype(np.float32)
    replace_constant_input(graph, site.matmul, 1, weight, f"{site.module}.weight_t")
    if soft and keep_weights:
        gate = new_initializer(graph, scales.astype(np.float32), f"{site.module}.input_gate")
        mul = ir.node("Mul", [site.matmul.inputs[0], gate], name=f"/{site.module.replace('.', '/')}/input_gate/Mul")
        set_module(mul, module_of(site.matmul))
        graph.insert_before(site.matmul, mul)
        site.matmul.replace_input_with(0, mul.outputs[0])


def keep_inner_units(
    graph: ir.Graph, ups: list[LinearSite], down: LinearSite, residual_add: ir.Node,
    columns: np.ndarray, scales: np.ndarray, keep_weights: bool,
) -> None:
    """Keep only `columns` of a branch's inner width: outputs of the `ups`, inputs of `down`.

    The kept units' gates (`scales`, one per column) are applied on `down`'s input; with no column
    left the branch reduces to `down`'s bias.
    """
    if columns.size == 0:
        branch_to_bias(residual_add, down)
        return
    for site in ups:
        replace_constant_input(graph, site.matmul, 1, site.weight_array()[:, columns], f"{site.module}.weight_t")
        replace_constant_input(graph, site.bias_add, site.bias_index, site.bias_array()[columns], f"{site.module}.bias")
    scale_linear_input(graph, down, down.weight_array()[columns, :], scales, keep_weights)
