"""The router: sentence encoder -> (projection) -> distance to K centroids -> argmin.

Distances: `l2` is the Euclidean distance; `cosine` is 1 - cosine similarity. Ties go to the
lowest cluster id (torch.argmin and ONNX ArgMin with select_last_index=0 agree on that).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgecompile.reference.student import StudentModule

ROUTER_INPUT_NAMES = ("input_ids", "attention_mask")
ROUTER_OUTPUT_NAMES = ("cluster_id", "distances")


class RouterModule(nn.Module):
    def __init__(
        self,
        encoder: StudentModule,
        centroids: np.ndarray,
        metric: str,
        projection_weight: np.ndarray | None = None,
        projection_bias: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if encoder.spec.family != "sentence-transformers":
            raise ValueError("the router encoder must be a sentence-transformers model")
        self.encoder = encoder
        self.metric = metric
        self.register_buffer("centroids", torch.from_numpy(np.ascontiguousarray(centroids)))
        self.projection: nn.Linear | None = None
        if projection_weight is not None:
            out_dim, in_dim = projection_weight.shape
            self.projection = nn.Linear(in_dim, out_dim)
            with torch.no_grad():
                self.projection.weight.copy_(torch.from_numpy(projection_weight))
                self.projection.bias.copy_(torch.from_numpy(projection_bias))
        self.output_names = ROUTER_OUTPUT_NAMES

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids)
        embedding = self.encoder(input_ids, attention_mask, token_type_ids)[1]
        return self.projection(embedding) if self.projection is not None else embedding

    def distances(self, embedding: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            e = nn.functional.normalize(embedding, p=2.0, dim=1)
            c = nn.functional.normalize(self.centroids, p=2.0, dim=1)
            return 1.0 - e @ c.T
        # |e - c|^2 = |e|^2 - 2 e.c + |c|^2: the cross term is one MatMul against a constant, which
        # NPUs quantize per channel and compute precisely (the broadcast Sub/Pow form lost ~0.3 of a
        # distance of ~1.5 on QNN HTP in 16-bit arithmetic; this form, see tests/test_qnn.py).
        squared = (embedding * embedding).sum(dim=1, keepdim=True) - 2.0 * embedding @ self.centroids.T
        squared = squared + (self.centroids * self.centroids).sum(dim=1)
        return squared.clamp(min=0.0).sqrt()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distances = self.distances(self.embed(input_ids, attention_mask))
        return distances.argmin(dim=1), distances
