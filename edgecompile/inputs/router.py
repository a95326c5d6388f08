"""The router encoder: a sentence-transformers folder (optionally truncated to its first n layers) or a
static-embedding model saved by model2vec, validated, with its identity and its tokenization.

A masks file may say which router its centroids were fitted for (metadata `router.encoder.*`, written by
`router_metadata`); `check_masks_router` compares that with the router given to the build, because
centroids only mean something in the embedding space they were computed in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompile.errors import InputError, input_error, one_line
from edgecompile.inputs.student import StudentSpec

STATIC_DTYPES = ("float32", "float16", "int8")
STATIC_MAX_TOKENS = 512  # StaticModel.encode's default max_length


@dataclass(frozen=True)
class Tokenization:
    """How text becomes router input ids; recorded in the manifest so apps and `run` do the same."""

    special_tokens: bool = True  # [CLS] ... [SEP] (transformers) or none (model2vec)
    truncate_characters: int | None = None  # model2vec cuts the text to max_tokens * median token length first
    drop_token_id: int | None = None  # model2vec drops the unknown token ...
    drop_before_truncation: bool = True  # ... before cutting to max tokens (model2vec < 0.10) or after (>= 0.10)

    def to_dict(self) -> dict[str, Any]:
        return {"special_tokens": self.special_tokens, "truncate_characters": self.truncate_characters,
                "drop_token_id": self.drop_token_id, "drop_before_truncation": self.drop_before_truncation}


def model2vec_drops_before_truncation() -> bool:
    """model2vec 0.10 moved truncation into the tokenizer, so the unknown token is dropped after the cut; the
    build follows the installed release, whose `encode` is the reference the router is checked against."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return Version(version("model2vec")) < Version("0.10")
    except PackageNotFoundError:
        return False  # the current release's rule


@dataclass(frozen=True)
class RouterSpec:
    path: Path
    kind: str  # "transformer" | "static"
    embedding_dim: int
    weights_file: Path
    tokenizer_dir: Path
    vocab_size: int
    layers: int | None = None  # transformer: encoder layers used (<= the checkpoint's)
    encoder: StudentSpec | None = None  # transformer only
    static: dict[str, Any] = field(default_factory=dict)  # static only: dtype, normalize, unk_id, ...
    tokenization: Tokenization = Tokenization()

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def sha256(self) -> str:
        from edgecompile.inputs.files import sha256_file

        return sha256_file(self.weights_file)

    @property
    def description(self) -> str:
        if self.kind == "static":
            return f"static embeddings (model2vec), {self.static['dtype']} table {self.vocab_size} x {self.embedding_dim}"
        total = self.encoder.num_layers
        return f"transformer, {self.layers} of {total} layers" if self.layers != total else f"transformer, {total} layers"

    def tokenizer_files(self) -> tuple[Path, ...]:
        if self.kind == "static":
            return (self.tokenizer_dir / "tokenizer.json",)
        return self.encoder.tokenizer_files()


def is_model2vec(path: Path) -> bool:
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "model2vec"
    except (OSError, ValueError, AttributeError):
        return False


def load_static_router(path: Path) -> RouterSpec:
    """A model2vec folder (its table's shape and dtype, its tokenizer) as a router."""
    from safetensors import safe_open

    weights, tokenizer_file = path / "model.safetensors", path / "tokenizer.json"
    for needed in (weights, tokenizer_file):
        if not needed.is_file():
            raise InputError(f"{needed}: file not found (a model2vec folder holds model.safetensors and tokenizer.json)")
    try:
        with safe_open(str(weights), framework="numpy") as handle:
            names = set(handle.keys())
            if "embeddings" not in names:
                raise input_error(weights, "tensor embeddings", "the model2vec embedding table", "none")
            table = handle.get_slice("embeddings")
            shape, dtype = table.get_shape(), str(table.get_dtype()).lower()
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{weights}: not a readable safetensors file ({one_line(exc)})") from None
    dtype = {"f32": "float32", "f16": "float16", "i8": "int8"}.get(dtype, dtype)
    if dtype not in STATIC_DTYPES or len(shape) != 2:
        raise input_error(weights, "tensor embeddings", f"[V, D] of {', '.join(STATIC_DTYPES)}", f"{dtype} {list(shape)}")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:
        raise InputError(f"{tokenizer_file}: cannot load the tokenizer ({one_line(exc)})") from None
    vocab = tokenizer.get_vocab()
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    unk = getattr(tokenizer.model, "unk_token", None)
    unk_id = vocab.get(unk) if unk is not None else None
    # StaticModel: median length of the vocabulary's token strings, used to pre-cut long texts
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    median = int(np.median([len(t) for t in tokens]))
    if "mapping" not in names and shape[0] != len(vocab):
        raise input_error(weights, "tensor embeddings rows", f"{len(vocab)} (the tokenizer's vocabulary)", shape[0])
    static = {"dtype": dtype, "normalize": bool(config.get("normalize", False)), "unk_id": unk_id,
              "median_token_length": median, "token_weights": "weights" in names, "token_mapping": "mapping" in names}
    tokenization = Tokenization(False, STATIC_MAX_TOKENS * median, unk_id, model2vec_drops_before_truncation())
    return RouterSpec(path, "static", int(shape[1]), weights, path, len(vocab), None, None, static, tokenization)


def router_metadata(spec: RouterSpec) -> dict[str, str]:
    """Masks metadata naming this router, for whoever writes centroids fitted in its embedding space."""
    meta = {"router.encoder.kind": spec.kind, "router.encoder.width": str(spec.embedding_dim),
            "router.encoder.sha256": spec.sha256, "router.encoder.name": spec.name}
    if spec.layers is not None:
        meta["router.encoder.layers"] = str(spec.layers)
    return meta


def check_masks_router(masks_path: Path, declared: dict[str, str], spec: RouterSpec) -> bool:
    """False when the masks file names no router (files written before the metadata existed)."""
    if not declared:
        return False
    actual = router_metadata(spec)
    actual.setdefault("router.encoder.layers", "none")
    for key in ("router.encoder.kind", "router.encoder.width", "router.encoder.layers", "router.encoder.sha256"):
        if key in declared and declared[key] != actual[key]:
            fitted = declared.get("router.encoder.name", "another router")
            raise input_error(masks_path, f"metadata '{key}'", f"{actual[key]} (the router given: {spec.name}, {spec.description})",
                              f"{declared[key]} (centroids fitted for {fitted}; refit them in this router's embedding space)")
    return True


def load_router_tokenizer(spec_or_dir: RouterSpec | Path, tokenization: Tokenization):
    """A transformers tokenizer, or for model2vec routers the `tokenizers.Tokenizer` model2vec itself uses."""
    directory = spec_or_dir.tokenizer_dir if isinstance(spec_or_dir, RouterSpec) else Path(spec_or_dir)
    if tokenization.special_tokens:
        from edgecompile.inputs.tokens import load_tokenizer

        return load_tokenizer(directory)
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as exc:
        raise InputError(f"{directory / 'tokenizer.json'}: cannot load the tokenizer ({one_line(exc)})") from None


def encode_router(tokenizer, tokenization: Tokenization, texts, max_length: int):
    """Router input ids for each text, exactly as the router's own library tokenizes (see Tokenization)."""
    from edgecompile.inputs.tokens import Encoded, encode

    if tokenization.special_tokens:
        return encode(tokenizer, texts, max_length)
    cut = tokenization.truncate_characters
    texts = [text[:cut] if cut else text for text in texts]
    out = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = encoding.ids if tokenization.drop_before_truncation else encoding.ids[:max_length]
        ids = [i for i in ids if i != tokenization.drop_token_id][:max_length]
        array = np.asarray(ids, np.int64)
        out.append(Encoded(array, np.zeros_like(array)))
    return out


def tokenization_from_manifest(router: dict[str, Any]) -> Tokenization:
    """Bundles written before routers recorded their tokenization used transformers' tokenizers."""
    data = router.get("tokenization") or {}
    return Tokenization(data.get("special_tokens", True), data.get("truncate_characters"), data.get("drop_token_id"),
                        data.get("drop_before_truncation", True))



def encode_role(bundle, role: str, texts) -> list:
    """Tokenize for a bundle's 'student' or 'router' the way the build did (its manifest section says how)."""
    return encode_router(bundle.tokenizer(role), tokenization_from_manifest(bundle.manifest[role]), texts,
                         bundle.manifest[role]["max_seq_length"])
