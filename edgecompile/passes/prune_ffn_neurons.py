"""Neuron gates: slice removed FFN intermediate neurons out of both FFN projections.

Kept neurons' soft gates are folded into the output projection's input rows (or, for a low-bit
projection, applied by a Mul on its input). With every neuron
removed the FFN branch is just the output projection's bias.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.numerics import all_identity, kept_units
from edgecompile.passes.bert_sites import BertStructure, find_bert_layers
from edgecompile.passes.branch_edits import keep_inner_units


class PruneFfnNeurons(ir.passes.InPlacePass):
    def __init__(self, structure: BertStructure, neurons: np.ndarray) -> None:
        super().__init__()
        self.structure = structure
        self.neurons = neurons  # [L, I]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for layer in find_bert_layers(model, self.structure):
            gates = self.neurons[layer.index]
            if not layer.has_ffn or all_identity(gates):
                continue
            modified = True
            kept = kept_units(gates)
            down = layer.ffn_output
            keep_inner_units(graph, [layer.intermediate], down, layer.ffn_residual, kept, gates[kept],
                             down.module in self.structure.lowbit_modules)
        return ir.passes.PassResult(model, modified=modified)
