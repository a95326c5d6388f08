"""Per-cluster rewrite pipeline: a clone of the dense export, then the pruning passes."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from edgecompile.inputs.masks import ClusterMasks
from edgecompile.passes.prune_blocks import PruneBlocks
from edgecompile.passes.prune_units import PruneUnits
from edgecompile.passes.sites import GraphStructure


def cluster_passes(structure: GraphStructure, masks: ClusterMasks) -> ir.passes.PassManager:
    return ir.passes.PassManager(
        [
            PruneBlocks(structure, masks.blocks),
            RemoveUnusedNodesPass(),  # so head / neuron pruning never touches a removed branch
            PruneUnits(structure, "heads", masks.heads),
            PruneUnits(structure, "neurons", masks.neurons),
            RemoveUnusedNodesPass(),
            RemoveUnusedOpsetsPass(),
        ]
    )


def build_cluster_graph(dense: ir.Model, structure: GraphStructure, masks: ClusterMasks) -> ir.Model:
    """The dense export is never modified: each cluster works on a clone sharing its tensors."""
    model = dense.clone(deep_copy=True)
    model.graph.name = f"cluster_{masks.index}"
    cluster_passes(structure, masks)(model)
    return model
