"""IG-Pruning block gates: remove (gate 0) or scale (0 < gate < 1) whole attention / FFN branches.

The gate multiplies the branch added to the residual stream. Gate 0 rewires the residual Add
away so the branch is dead code (with a decoder layer's KV cache inputs and outputs); a soft gate
is folded into the branch's output projection (weight and bias), or into the norm on its output
where the family has one (Gemma), so no Mul is added. Whatever is
outside the branch stays: BERT's post-LayerNorms, the residual stream itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.numerics import gate_is_identity, gate_is_removed
from edgecompile.passes.branch_edits import drop_branch, scale_branch
from edgecompile.passes.sites import GraphStructure


class PruneBlocks(ir.passes.InPlacePass):
    def __init__(self, structure: GraphStructure, blocks: np.ndarray) -> None:
        super().__init__()
        self.structure = structure
        self.blocks = blocks  # [L, 2]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for layer in self.structure.find_layers(model):
            for column in (0, 1):
                branch = layer.branch(column)
                gate = float(self.blocks[layer.index, column])
                if gate_is_identity(gate) or branch is None:
                    continue
                if gate_is_removed(gate):
                    drop_branch(model.graph, branch)
                else:
                    scale_branch(model.graph, branch, gate)
                modified = True
        return ir.passes.PassResult(model, modified=modified)
