"""Keep a low-bit word-embedding table packed: gather packed rows by token id, decode per token.

The table is exactly codes * alpha_row (binary: one alpha per row, as XTC stores embeddings), so
Gather(packed) -> LUT decode -> * Gather(alpha) reproduces every float of the fp32 lookup.
"""

from __future__ import annotations

import onnx_ir as ir

from edgecompile.passes.sites import StructureError
from edgecompile.passes.packing import decode_rows
from edgecompile.passes.provenance import module_of, set_module
from edgecompile.reference.lowbit import recover_codes


class LowerLowBitEmbedding(ir.passes.InPlacePass):
    def __init__(self, module: str) -> None:
        super().__init__()
        self.module = module  # graph module path, e.g. "model.embeddings.word_embeddings"
        self.lowered: dict | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        gathers = [n for n in graph if n.op_type == "Gather" and module_of(n) == self.module and n.inputs[0].is_initializer()]
        if len(gathers) != 1:
            raise StructureError(f"{self.module}: expected one Gather of the embedding table, found {len(gathers)}")
        gather = gathers[0]
        table = gather.inputs[0].const_value.numpy()
        recovered = recover_codes(table)
        if recovered is None:
            raise StructureError(f"{self.module}: declared low-bit, but the table is not exactly codes * alpha per row")
        tape = ir.tape.Tape()
        decoded, scheme, packed_bytes = decode_rows(tape, recovered.codes, recovered.alpha[:, 0], gather.inputs[1], self.module)
        for i, node in enumerate(tape.nodes):
            set_module(node, self.module)
            node.name = f"/{self.module.replace('.', '/')}/lowbit/{node.op_type}_{i}"
        for value in tape.initializers:
            graph.register_initializer(value)
        graph.insert_before(gather, tape.nodes)
        ir.convenience.replace_all_uses_with(gather.outputs[0], decoded)
        self.lowered = {"module": self.module, "packing": scheme.name, "packed_bytes": packed_bytes, "fp32_bytes": int(table.nbytes)}
        return ir.passes.PassResult(model, modified=True)
