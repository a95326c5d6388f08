"""Edits of a residual branch (`residual + branch`) shared by the pruning passes."""

from __future__ import annotations

import onnx_ir as ir

from edgecompile.passes.bert_sites import LinearSite


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
