"""Head gates: slice removed heads out of Q/K/V and the attention output projection.

Kept heads' soft gates are folded into the output projection's input rows (or, for a low-bit
projection whose weights must stay codes * alpha, applied by a Mul on its input). With every head
removed the attention branch is just the output projection's bias. The export has no head count
baked in (see families/bert.py), so the shrunken weights are the whole rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.numerics import all_identity, kept_units
from edgecompile.passes.bert_sites import BertStructure, find_bert_layers
from edgecompile.passes.branch_edits import keep_inner_units


def head_columns(kept_heads: np.ndarray, head_size: int) -> np.ndarray:
    """Feature indices of the kept heads in a [*, heads * head_size] projection."""
    return (kept_heads[:, None] * head_size + np.arange(head_size)[None, :]).reshape(-1)


class PruneAttentionHeads(ir.passes.InPlacePass):
    def __init__(self, structure: BertStructure, heads: np.ndarray) -> None:
        super().__init__()
        self.structure = structure
        self.heads = heads  # [L, H]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, size = model.graph, self.structure.head_size
        modified = False
        for layer in find_bert_layers(model, self.structure):
            gates = self.heads[layer.index]
            if not layer.has_attention or all_identity(gates):
                continue
            modified = True
            kept = kept_units(gates)
            out = layer.attention_output
            keep_inner_units(graph, [layer.query, layer.key, layer.value], out, layer.attention_residual,
                             head_columns(kept, size), np.repeat(gates[kept], size).astype(np.float32),
                             out.module in self.structure.lowbit_modules)
        return ir.passes.PassResult(model, modified=modified)
