"""The router's cost in the manifest's terms: MACs per token (beside the clusters'), parameters, what it is."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecompile.families import family_of
from edgecompile.inputs.masks import MaskSet
from edgecompile.inputs.router import RouterSpec


def router_macs_per_token(spec: RouterSpec, masks: MaskSet, sequence: int = 128) -> dict[str, int]:
    """Encoder MACs per token (a static table: none, only adds) + projection and distances once per sequence."""
    encoder = 0
    if spec.kind == "transformer":
        e = spec.encoder
        layers = [{"heads": list(range(e.num_heads)), "neurons": e.intermediate_size} for _ in range(spec.layers)]
        encoder = family_of(e).macs_per_token(e, {"layers": layers}, sequence)["total"]
    k, routed = masks.centroids.shape
    head = routed * k + (int(np.prod(masks.projection_weight.shape)) if masks.projection_weight is not None else 0)
    return {"sequence": sequence, "encoder": encoder, "per_sequence": head, "total": encoder + head // sequence}


def router_entry(spec: RouterSpec, masks: MaskSet, parameters: int, nodes: int) -> dict[str, Any]:
    return {"graph": "router", "kind": spec.kind, "encoder": spec.description, "layers": spec.layers,
            "embedding_dim": spec.embedding_dim, "parameters": parameters,
            "macs_per_token": router_macs_per_token(spec, masks), "nodes": nodes}
