"""The router: sentence encoder -> (projection) -> distance to K centroids -> argmin.

Encoders: a sentence-transformers model (`TransformerSentenceEncoder`, optionally only its first n
layers) or a model2vec static-embedding table (`StaticSentenceEncoder`, model2vec's `encode` rules).

Distances: `l2` is the Euclidean distance; `cosine` is 1 - cosine similarity. Ties go to the
lowest cluster id (torch.argmin and ONNX ArgMin with select_last_index=0 agree on that).

Centroids that coincide under the metric (the same direction for cosine, e.g. c and 2c; the same
point for l2), to within TIE_TOLERANCE relative, tie for EVERY input, and which one wins would be
decided by float rounding that torch and onnxruntime do differently. So they are one cluster for
routing: the lowest id wins, the argmin runs over the other centroids only, and the later ones are
never chosen (their distances are still reported).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


ROUTER_INPUT_NAMES = ("input_ids", "attention_mask")
ROUTER_OUTPUT_NAMES = ("cluster_id", "distances")
TIE_TOLERANCE = 1e-6  # about 8 float32 ulps: closer than the two runtimes' rounding can tell apart


def coinciding_centroids(centroids: np.ndarray, metric: str) -> np.ndarray:
    """For each centroid, the lowest id of a centroid it coincides with under `metric` (itself if none)."""
    c = np.asarray(centroids, dtype=np.float64)
    norms = np.linalg.norm(c, axis=1)
    if metric == "cosine":
        c = np.divide(c, norms[:, None], out=np.zeros_like(c), where=norms[:, None] > 0)
        norms = np.ones_like(norms)  # unit vectors (a zero centroid stays zero)
    owner = np.arange(len(c))
    for k in range(1, len(c)):  # direct differences, no Gram-matrix cancellation; memory O(K * D)
        gap = np.linalg.norm(c[:k] - c[k], axis=1)
        close = np.flatnonzero(gap <= TIE_TOLERANCE * np.maximum(norms[:k], norms[k]))
        if close.size:
            owner[k] = owner[close[0]]
    return owner


class TransformerSentenceEncoder(nn.Module):
    """A sentence-transformers student's sentence embedding, using only its first `layers` encoder layers
    (the same truncation as `model[0].auto_model.encoder.layer = layer[:n]` in sentence-transformers)."""

    def __init__(self, student: nn.Module, layers: int | None = None) -> None:
        super().__init__()
        if student.spec.family != "sentence-transformers":
            raise ValueError("the router encoder must be a sentence-transformers model")
        if layers is not None and layers < student.spec.num_layers:
            bert = student.bert
            bert.encoder.layer = nn.ModuleList(list(bert.encoder.layer)[:layers])
            bert.config.num_hidden_layers = layers
        self.student = student
        self.spec = student.spec

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.student(input_ids, attention_mask, torch.zeros_like(input_ids))[1]


MODEL2VEC_NORM_EPS = 1e-32  # StaticModel: x / (||x|| + 1e-32)


class StaticSentenceEncoder(nn.Module):
    """model2vec's StaticModel.encode as a graph: Gather -> (token weights) -> masked mean -> (normalise).

    The table keeps its stored dtype (float16 / int8 tables stay small in the file) and is cast to float32
    after the Gather; the mean and the norm are float32 (model2vec rounds a float16 mean to float16, so
    float16 tables agree with it to ~1e-3, float32 tables to float rounding). Ids are the tokenizer's
    without special tokens and with the unknown token dropped (see inputs/router.py); the unknown id is
    also masked here, so an app that forgets to drop it still gets model2vec's answer for short texts.
    """

    def __init__(self, table: np.ndarray, normalize: bool, unk_id: int | None = None,
                 token_weights: np.ndarray | None = None, token_mapping: np.ndarray | None = None) -> None:
        super().__init__()
        self.register_buffer("table", torch.from_numpy(np.ascontiguousarray(table)))
        self.register_buffer("token_weights", None if token_weights is None else torch.from_numpy(np.ascontiguousarray(token_weights, np.float32)))
        self.register_buffer("token_mapping", None if token_mapping is None else torch.from_numpy(np.ascontiguousarray(token_mapping, np.int64)))
        self.normalize = normalize
        self.unk_id = unk_id
        self.embedding_dim = int(table.shape[1])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = self.token_mapping[input_ids] if self.token_mapping is not None else input_ids
        vectors = self.table[rows].to(torch.float32)
        if self.token_weights is not None:
            vectors = vectors * self.token_weights[input_ids].unsqueeze(-1)
        mask = attention_mask
        if self.unk_id is not None:
            mask = mask * (input_ids != self.unk_id).to(mask.dtype)
        mask = mask.unsqueeze(-1).to(torch.float32)
        counts = mask.sum(dim=1)
        mean = (vectors * mask).sum(dim=1) / counts.clamp(min=1.0)  # no token: the zero vector, as model2vec
        if not self.normalize:
            return mean
        return mean / ((mean * mean).sum(dim=1, keepdim=True).sqrt() + MODEL2VEC_NORM_EPS)


def load_static_encoder(folder) -> StaticSentenceEncoder:
    """The table, per-token weights and vocabulary mapping exactly as model2vec stores them."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(folder)
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as handle:
        names = set(handle.keys())
        table = handle.get_tensor("embeddings")
        weights = handle.get_tensor("weights") if "weights" in names else None
        mapping = handle.get_tensor("mapping") if "mapping" in names else None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    unk = getattr(tokenizer.model, "unk_token", None)
    unk_id = tokenizer.get_vocab().get(unk) if unk is not None else None
    return StaticSentenceEncoder(table, bool(config.get("normalize", False)), unk_id, weights, mapping)


class RouterModule(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        centroids: np.ndarray,
        metric: str,
        projection_weight: np.ndarray | None = None,
        projection_bias: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, TransformerSentenceEncoder) and hasattr(encoder, "bert"):  # a student module as is
            encoder = TransformerSentenceEncoder(encoder)
        self.encoder = encoder  # (input_ids, attention_mask) -> sentence embedding [batch, D]
        self.metric = metric
        self.register_buffer("centroids", torch.from_numpy(np.ascontiguousarray(centroids)))
        # l2 distances are taken around the centroids' mean: embeddings of one router sit close together
        # (a small static model's are within a few hundredths), and |e|^2 - 2 e.c + |c|^2 about the
        # origin cancels ~1 against ~1, a float32 rounding that sqrt then magnifies near 0
        center = np.asarray(centroids, np.float64).mean(axis=0)
        centered = np.asarray(centroids, np.float64) - center
        self.register_buffer("center", torch.from_numpy(center.astype(np.float32)))
        self.register_buffer("centered_centroids", torch.from_numpy(np.ascontiguousarray(centered, np.float32)))
        self.register_buffer("centered_norms", torch.from_numpy((centered * centered).sum(axis=1).astype(np.float32)))
        self.projection: nn.Linear | None = None
        if projection_weight is not None:
            out_dim, in_dim = projection_weight.shape
            self.projection = nn.Linear(in_dim, out_dim)
            with torch.no_grad():
                self.projection.weight.copy_(torch.from_numpy(projection_weight))
                self.projection.bias.copy_(torch.from_numpy(projection_bias))
        self.output_names = ROUTER_OUTPUT_NAMES
        owner = coinciding_centroids(centroids, metric)
        self.never_chosen = [int(k) for k in np.flatnonzero(owner != np.arange(len(owner)))]
        self.register_buffer("candidates", torch.from_numpy(np.flatnonzero(owner == np.arange(len(owner)))))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embedding = self.encoder(input_ids, attention_mask)
        return self.projection(embedding) if self.projection is not None else embedding

    def distances(self, embedding: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            e = nn.functional.normalize(embedding, p=2.0, dim=1)
            c = nn.functional.normalize(self.centroids, p=2.0, dim=1)
            return 1.0 - e @ c.T
        # |e - c|^2 = |e|^2 - 2 e.c + |c|^2 (e, c relative to the centroids' mean): the cross term is one
        # MatMul against a constant, which NPUs quantize per channel and compute precisely (the broadcast
        # Sub/Pow form lost ~0.3 of a distance of ~1.5 on QNN HTP in 16-bit arithmetic; see tests/test_qnn.py).
        e = embedding - self.center
        squared = (e * e).sum(dim=1, keepdim=True) - 2.0 * e @ self.centered_centroids.T + self.centered_norms
        return squared.clamp(min=0.0).sqrt()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distances = self.distances(self.embed(input_ids, attention_mask))
        if self.never_chosen:  # coinciding centroids: the argmin over the lowest id of each only
            return self.candidates[distances.index_select(1, self.candidates).argmin(dim=1)], distances
        return distances.argmin(dim=1), distances
