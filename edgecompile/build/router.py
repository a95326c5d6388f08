"""The router as every build loads it: its PyTorch module (encoder + centroids), tokenizer, length and samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompile.build.request import ValidatedInputs
from edgecompile.errors import input_error
from edgecompile.inputs.router import STATIC_MAX_TOKENS, encode_router, load_router_tokenizer
from edgecompile.inputs.student import StudentSpec
from edgecompile.inputs.tokens import Encoded


@dataclass
class LoadedRouter:
    module: Any  # reference.router.RouterModule
    max_length: int
    samples: list[Encoded]


def max_length(spec: StudentSpec, tokenizer) -> int:
    """The length a model's inputs are cut to: its own, its positions', its tokenizer's, whichever is least."""
    limit = int(spec.config.get("max_position_embeddings", 512))
    model_max = getattr(tokenizer, "model_max_length", limit) or limit
    return int(min(spec.max_seq_length, limit, model_max))


def check_vocab(spec: StudentSpec, tokenizer, source: Path) -> None:
    vocab = int(spec.config.get("vocab_size", 0))
    if len(tokenizer) > vocab:
        raise input_error(source, "tokenizer vocabulary", f"at most the model's vocab_size {vocab}", len(tokenizer))


def load_router(inputs: ValidatedInputs) -> LoadedRouter:
    from edgecompile.families import family_of
    from edgecompile.reference.router import RouterModule, TransformerSentenceEncoder, load_static_encoder

    masks, spec = inputs.masks, inputs.router
    if spec.kind == "static":
        encoder = load_static_encoder(spec.path)
    else:
        encoder = TransformerSentenceEncoder(family_of(spec.encoder).load_model(spec.encoder), spec.layers)
    router = RouterModule(encoder, masks.centroids, masks.metric, masks.projection_weight, masks.projection_bias).eval()
    tokenizer = load_router_tokenizer(spec, spec.tokenization)
    if spec.kind == "transformer":
        check_vocab(spec.encoder, tokenizer, spec.tokenizer_dir)
        length = max_length(spec.encoder, tokenizer)
    else:
        length = STATIC_MAX_TOKENS
    return LoadedRouter(router, length, encode_router(tokenizer, spec.tokenization, inputs.samples.texts, length))
