"""Per-target lowering: target-independent graphs in, the graphs a target's files hold out.

Which passes run is decided by the target's data (precision, shapes, format), never by its name.
The inputs are never modified: every target works on clones sharing the export's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from edgecompile.inputs.lowbit import LowBitPlan
from edgecompile.passes.lower_lowbit_embedding import LowerLowBitEmbedding
from edgecompile.passes.lower_lowbit_linears import ActivationQuant, LowerLowBitLinears
from edgecompile.targets import Target

STUDENT_PREFIX = "model."  # StudentModule keeps the Hugging Face model as `.model`


@dataclass(frozen=True)
class GraphLowBit:
    """The low-bit plan in graph terms (module provenance paths)."""

    linears: dict[str, ActivationQuant] = field(default_factory=dict)
    embedding: str | None = None

    @property
    def empty(self) -> bool:
        return not self.linears and self.embedding is None

    @classmethod
    def from_plan(cls, plan: LowBitPlan) -> "GraphLowBit":
        return cls(
            {STUDENT_PREFIX + p.module: ActivationQuant(p.activation, p.static_scale) for p in plan.linears},
            None if plan.embedding is None else STUDENT_PREFIX + plan.embedding.module,
        )


def _lower_lowbit_integer(model: ir.Model, lowbit: GraphLowBit) -> dict[str, Any]:
    linears = LowerLowBitLinears(lowbit.linears)
    passes: list[ir.passes.PassBase] = [linears]
    embedding = LowerLowBitEmbedding(lowbit.embedding) if lowbit.embedding else None
    if embedding:
        passes.append(embedding)
    ir.passes.PassManager(passes + [RemoveUnusedNodesPass(), RemoveUnusedOpsetsPass(), NameFixPass()])(model)
    for group in linears.lowered:
        group["values"] = {key: value.name for key, value in group["values"].items()}
    packed = sum(g["packed_bytes"] for g in linears.lowered)
    fp32 = sum(g["fp32_bytes"] for g in linears.lowered)
    return {
        "linear_groups": linears.lowered,
        "linear_weight_bytes": {"packed": packed, "fp32": fp32, "ratio": round(fp32 / packed, 2) if packed else None},
        "word_embeddings": embedding.lowered if embedding else None,
    }


def lower_for_target(
    graphs: dict[str, ir.Model], target: Target, lowbit: GraphLowBit | None = None
) -> tuple[dict[str, ir.Model], dict[str, dict[str, Any]]]:
    """Returns the graphs to write and, per student graph, what the low-bit lowering did."""
    lowered, reports = {}, {}
    for name, graph in graphs.items():
        model = graph.clone()
        if name != "router" and lowbit is not None and not lowbit.empty:
            if target.lowbit_linear == "MatMulIntegerToFloat":
                reports[name] = _lower_lowbit_integer(model, lowbit)
        lowered[name] = model
    return lowered, reports
