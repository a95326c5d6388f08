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
from edgecompile.passes.branch_edits import branch_to_bias, scale_linear_input
from edgecompile.passes.tensors import replace_constant_input


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
            if kept.size == 0:
                branch_to_bias(layer.ffn_residual, layer.ffn_output)
                continue
            up, down = layer.intermediate, layer.ffn_output
            replace_constant_input(graph, up.matmul, 1, up.weight_array()[:, kept], f"{up.module}.weight_t")
            replace_constant_input(graph, up.bias_add, up.bias_index, up.bias_array()[kept], f"{up.module}.bias")
            scale_linear_input(graph, down, down.weight_array()[kept, :], gates[kept], down.module in self.structure.lowbit_modules)
        return ir.passes.PassResult(model, modified=modified)
