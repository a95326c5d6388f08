"""IG-Pruning block gates: remove (gate 0) or scale (0 < gate < 1) whole attention / FFN branches.

The gate multiplies the branch added to the residual stream. Gate 0 rewires the residual Add
away so the branch is dead code; a soft gate is folded into the branch's output projection
(weight and bias), so no Mul is added. Post-LayerNorms stay, as the semantics require.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.numerics import gate_is_identity, gate_is_removed
from edgecompile.passes.bert_sites import BertStructure, LinearSite, find_bert_layers
from edgecompile.passes.branch_edits import drop_branch
from edgecompile.passes.tensors import replace_constant_input


def scale_linear_output(graph: ir.Graph, site: LinearSite, scale: float) -> None:
    weight = (site.weight_array() * np.float32(scale)).astype(np.float32)
    bias = (site.bias_array() * np.float32(scale)).astype(np.float32)
    replace_constant_input(graph, site.matmul, 1, weight, f"{site.module}.weight_t")
    replace_constant_input(graph, site.bias_add, site.bias_index, bias, f"{site.module}.bias")


class PruneBlocks(ir.passes.InPlacePass):
    def __init__(self, structure: BertStructure, blocks: np.ndarray) -> None:
        super().__init__()
        self.structure = structure
        self.blocks = blocks  # [L, 2]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for layer in find_bert_layers(model, self.structure):
            branches = ((layer.attention_output, layer.attention_residual), (layer.ffn_output, layer.ffn_residual))
            for column, (site, residual) in enumerate(branches):
                gate = float(self.blocks[layer.index, column])
                if gate_is_identity(gate) or site is None or residual is None:
                    continue
                if gate_is_removed(gate):
                    drop_branch(residual, site)
                else:
                    scale_linear_output(model.graph, site, gate)
                modified = True
        return ir.passes.PassResult(model, modified=modified)
