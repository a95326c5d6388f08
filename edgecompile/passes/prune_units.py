"""Head and neuron gates: slice removed units out of a branch's projections.

One pass for both granularities: attention heads (units of head_size features; under grouped-query
attention a key/value head goes with its last query head) and FFN neurons (units of one feature,
across every up-projection of a gated MLP). Kept units' soft gates are folded into the output
projection's input rows (or, for a low-bit projection whose weights must stay codes * alpha,
applied by a Mul on its input). With every unit removed, the branch is the output projection's
bias (nothing, without one). The export has no head count baked in except in an attention op the
family resizes, so the shrunken weights are the whole rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.numerics import all_identity
from edgecompile.passes.branch_edits import keep_units
from edgecompile.passes.sites import GraphStructure

COLUMNS = {"heads": 0, "neurons": 1}  # which branch of a layer the granularity gates


class PruneUnits(ir.passes.InPlacePass):
    def __init__(self, structure: GraphStructure, granularity: str, gates: np.ndarray) -> None:
        super().__init__()
        self.structure = structure
        self.column = COLUMNS[granularity]
        self.gates = gates  # [L, units]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for layer in self.structure.find_layers(model):
            branch = layer.branch(self.column)
            gates = self.gates[layer.index]
            if branch is None or all_identity(gates[branch.ids()]):
                continue
            keep_units(model.graph, branch, gates, branch.down.module in self.structure.lowbit_modules)
            modified = True
        return ir.passes.PassResult(model, modified=modified)
