"""Sentence-transformers pooling and normalisation, written once for reference and export.

Mirrors sentence_transformers.models.Pooling (right-padded inputs) and Normalize; the test
suite checks these against the sentence-transformers library itself.
"""

from __future__ import annotations

import torch

from edgecompile.inputs.student import POOLING_MODES


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool [B, S, H] token embeddings into [B, H]."""
    if mode == "cls":
        return token_embeddings[:, 0]
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    if mode == "max":
        return token_embeddings.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    summed = (token_embeddings * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    if mode == "mean":
        return summed / counts
    if mode == "mean_sqrt_len_tokens":
        return summed / counts.sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}; known: {', '.join(POOLING_MODES)}")


NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default, as sentence-transformers uses it


def l2_normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """sentence_transformers.models.Normalize, i.e. F.normalize(p=2, dim=1, eps=1e-12), spelled out.

    x / sqrt(max(sum(x^2), eps^2)) is the same function, but it exports to plain Mul / ReduceSum /
    Sqrt / Div instead of a pattern onnxruntime's QNN preprocessing fuses into LpNormalization,
    which QNN HTP computed wrongly on some inputs (cosine 0.69 against an exact run of the same
    QDQ graph; tests/test_qnn.py covers it).
    """
    squared = (embeddings * embeddings).sum(dim=1, keepdim=True)
    return embeddings / squared.clamp(min=NORMALIZE_EPS * NORMALIZE_EPS).sqrt()
