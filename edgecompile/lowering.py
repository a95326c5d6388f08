"""Per-target lowering: target-independent graphs in, the graphs a target's files hold out.

Which passes run is decided by the target's data (precision, shapes, format), never by its name.
The inputs are never modified: every target works on clones sharing the export's tensors.
"""

from __future__ import annotations

import onnx_ir as ir

from edgecompile.targets import Target


def lower_for_target(graphs: dict[str, ir.Model], target: Target) -> dict[str, ir.Model]:
    """fp32 with dynamic shapes needs no rewrite: the graphs are written as compiled."""
    return {name: model.clone() for name, model in graphs.items()}
