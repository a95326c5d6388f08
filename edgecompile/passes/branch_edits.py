"""Edits of a residual branch (`residual + branch`) shared by the pruning passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.passes.provenance import module_of, set_module
from edgecompile.passes.sites import BranchSites, LinearSite, StructureError
from edgecompile.passes.tensors import new_initializer, replace_constant_input


def _branch_index(branch: BranchSites) -> int:
    return 0 if branch.residual_add.inputs[0] is branch.output else 1


def drop_branch(graph: ir.Graph, branch: BranchSites) -> None:
    """`residual + branch` -> `residual`: consumers of the Add read the residual directly.

    The branch's nodes lose their last use and are removed by dead-code elimination; graph inputs
    and outputs that belong to the branch (a decoder layer's KV cache) go with it.
    """
    residual = branch.residual_add.inputs[1 - _branch_index(branch)]
    ir.convenience.replace_all_uses_with(branch.residual_add.outputs[0], residual)
    for value in branch.state_outputs:
        graph.outputs.remove(value)
    for value in branch.state_inputs:
        for use in list(value.uses()):
            use.node.replace_input_with(use.idx, None)
        graph.inputs.remove(value)


def branch_to_bias(graph: ir.Graph, branch: BranchSites) -> None:
    """`residual + linear(x)` -> `residual + bias`, for a projection whose every input unit is removed.

    Without a bias the branch is zero: it is dropped.
    """
    if branch.down.bias is None:
        drop_branch(graph, branch)
        return
    if branch.output_norm is not None:  # norm(bias) would be a new constant branch; no family has one
        raise StructureError(f"{branch.down.module}: a biased projection under an output norm cannot reduce to its bias")
    branch.residual_add.replace_input_with(_branch_index(branch), branch.down.bias)


def scale_branch(graph: ir.Graph, branch: BranchSites, scale: float) -> None:
    """Multiply what the branch adds to the residual stream: its output norm's weight, else its output projection."""
    if branch.output_norm is None:
        scale_linear_output(graph, branch.down, scale)
        return
    norm = branch.output_norm
    weight = (norm.inputs[1].const_value.numpy() * np.float32(scale)).astype(np.float32)
    replace_constant_input(graph, norm, 1, weight, f"{module_of(norm)}.weight")


def scale_linear_output(graph: ir.Graph, site: LinearSite, scale: float) -> None:
    weight = (site.weight_array() * np.float32(scale)).astype(np.float32)
    replace_constant_input(graph, site.matmul, 1, weight, f"{site.module}.weight_t")
    if site.bias_add is not None:
        bias = (site.bias_array() * np.float32(scale)).astype(np.float32)
        replace_constant_input(graph, site.bias_add, site.bias_index, bias, f"{site.module}.bias")


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


def _slice_outputs(graph: ir.Graph, site: LinearSite, columns: np.ndarray) -> None:
    replace_constant_input(graph, site.matmul, 1, site.weight_array()[:, columns], f"{site.module}.weight_t")
    if site.bias_add is not None:
        replace_constant_input(graph, site.bias_add, site.bias_index, site.bias_array()[columns], f"{site.module}.bias")


def unit_features(units: np.ndarray, size: int) -> np.ndarray:
    """Feature indices of `units` in a [*, units * size] projection."""
    return (units[:, None] * size + np.arange(size)[None, :]).reshape(-1)


def keep_units(graph: ir.Graph, branch: BranchSites, gates: np.ndarray, keep_weights: bool) -> tuple[int, int]:
    """Apply one gate per unit of `branch` (indexed like the mask); returns (units, groups) kept.

    A group goes from the graph when every unit in it is removed: its units leave the `ups`'
    outputs and `down`'s inputs, the group leaves the `group_ups`' outputs. A unit that stays (a
    removed unit in a kept group included) has its gate applied on `down`'s input: folded into
    its rows, so a removed unit in a kept group contributes exactly nothing. With no group left
    the branch reduces to `down`'s bias.
    """
    unit_gates = gates[branch.ids()].astype(np.float32)
    groups = branch.groups()
    kept_groups = np.unique(groups[unit_gates != 0.0])
    kept = np.flatnonzero(np.isin(groups, kept_groups))
    if kept.size == 0:
        branch_to_bias(graph, branch)
        return 0, 0
    for site in branch.group_ups:  # a key / value head has as many features as a query head
        _slice_outputs(graph, site, unit_features(kept_groups, branch.unit_size))
    columns = unit_features(kept, branch.unit_size)
    for site in branch.ups:
        _slice_outputs(graph, site, columns)
    scales = np.repeat(unit_gates[kept], branch.unit_size).astype(np.float32)
    scale_linear_input(graph, branch.down, branch.down.weight_array()[columns, :], scales, keep_weights)
    if branch.on_resize is not None:
        branch.on_resize(kept, kept_groups)
    return int(kept.size), int(kept_groups.size)
