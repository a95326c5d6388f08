"""Where each node of a graph runs: the placement report every target gets.

Two ways to know: ask onnxruntime (a session on the target's execution provider records which
node went to which EP, and the EP logs why it refused a node), or, for EPs that cannot run on
this machine, estimate it statically with onnxruntime's mobile usability checker rules
(`placement_static.py`). The report says which of the two it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

EXECUTED = "onnxruntime session on the target EP (executed here)"
ESTIMATED = "static estimate from onnxruntime's usability checker rules (NOT executed on the EP)"


@dataclass
class UnsupportedNodes:
    op_type: str
    reason: str
    nodes: list[str] = field(default_factory=list)


@dataclass
class PlacementReport:
    graph: str
    ep: str  # the target's execution provider
    method: str  # EXECUTED or ESTIMATED
    total_nodes: int
    nodes_by_ep: dict[str, int]  # EP name -> node count (for estimates: target EP vs "CPUExecutionProvider")
    partitions: int  # partitions on the target EP
    unsupported: list[UnsupportedNodes] = field(default_factory=list)
    dynamic_inputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def on_target(self) -> int:
        return self.nodes_by_ep.get(self.ep, 0)

    @property
    def fully_placed(self) -> bool:
        return self.on_target == self.total_nodes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fully_placed"] = self.fully_placed
        return data
