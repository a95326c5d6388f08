"""Which weights of a student are binary / ternary, and how their inputs are quantized.

Two ways in:
1. Declared, in `edgecompile.json` beside the checkpoint (format `edgecompile-lowbit/1`):
       {"format": "edgecompile-lowbit/1",
        "linear": [{"modules": ["encoder.layer.*.attention.self.*"], "bits": 1, "groups": "row",
                    "activations": "dynamic"},
                   {"modules": ["encoder.layer.*.output.dense"], "bits": 2, "groups": "matrix",
                    "activations": "static", "static_scales": {"encoder.layer.0.output.dense": 0.02, ...}}],
        "word_embeddings": {"bits": 1}}
   `stored` (per entry, default "latent"): "latent" means the checkpoint holds latent floats and
   edgecompile quantizes them; "quantized" means it already holds codes * alpha and must match.
   `activations`: "dynamic" / "static" (8-bit symmetric) or "none" (float activations, W1A32).
2. Detected, without a sidecar: Linear weights of the encoder (and the word embeddings) that are
   exactly sign * alpha per row (or per DeepSpeed group within a row), as DeepSpeed's
   redundancy_clean leaves them, are recovered exactly. A tensor counts as low-bit only when its
   non-zero values repeat one magnitude along rows (`lowbit_evidence`); float weights, however
   sparse, never do. The checkpoint does not record how activations were trained: detection
   assumes 8-bit dynamic (per-token), XTC's default, and says so; a sidecar chooses otherwise.
   A tensor that is almost but not exactly low-bit is an error, never silently rounded.
Module names are those of the Hugging Face model (`encoder.layer.0.attention.self.query`;
`bert.` first for BertForSequenceClassification); patterns use shell wildcards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from edgecompile.errors import InputError, input_error, one_line

SIDECAR = "edgecompile.json"
SIDECAR_FORMAT = "edgecompile-lowbit/1"
ENTRY_KEYS = ("modules", "bits", "groups", "activations", "static_scales", "stored")
TOP_KEYS = ("format", "linear", "word_embeddings")
EMBEDDING_KEYS = ("bits", "stored")
STAYS_FP32 = ("pooler", "classifier", "lm_head")
BINARY_MAX_ZERO_SHARE = 0.01  # a "binary" tensor may hold exact zeros (sign(0) = 0), but only a few
DETECTED_TERNARY_ZERO_SHARE = 0.05
ACTIVATIONS = {"dynamic": "8-bit symmetric dynamic", "static": "8-bit symmetric static", "none": "none (float32)"}
DETECTED_ACTIVATIONS = "dynamic"  # XTC's default; a checkpoint does not record it


@dataclass(frozen=True)
class LinearPlan:
    module: str  # Hugging Face module name
    bits: int
    groups: str | int
    activation: str  # "dynamic" | "static" | "none"
    static_scale: float | None
    stored: str  # "latent" | "quantized" | "detected"


@dataclass(frozen=True)
class EmbeddingPlan:
    module: str
    bits: int
    stored: str


@dataclass(frozen=True)
class LowBitPlan:
    linears: tuple[LinearPlan, ...] = ()
    embedding: EmbeddingPlan | None = None
    source: str = "none"  # "none" | "detected" | the sidecar path

    @property
    def empty(self) -> bool:
        return not self.linears and self.embedding is None


def read_sidecar(student_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """Parse and check the sidecar's form (names are checked against the model later)."""
    path = Path(student_dir) / SIDECAR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise input_error(path, "content", "a JSON object", type(data).__name__)
    if data.get("format") != SIDECAR_FORMAT:
        raise input_error(path, "'format'", repr(SIDECAR_FORMAT), repr(data.get("format")))
    _known(path, "", data, TOP_KEYS)
    entries = data.get("linear", [])
    if not isinstance(entries, list):
        raise input_error(path, "'linear'", "a list of entries", type(entries).__name__)
    for i, entry in enumerate(entries):
        where = f"linear[{i}]"
        if not isinstance(entry, dict):
            raise input_error(path, where, "an object", type(entry).__name__)
        _known(path, where, entry, ENTRY_KEYS)
        modules = entry.get("modules")
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
            raise input_error(path, f"{where}.modules", "a non-empty list of module names or patterns", modules)
        _bits(path, where, entry.get("bits"))
        groups = entry.get("groups", "row")
        if not (groups in ("row", "matrix") or (isinstance(groups, int) and not isinstance(groups, bool) and groups > 0)):
            raise input_error(path, f"{where}.groups", "'row', 'matrix' or a positive number of groups", repr(groups))
        if entry.get("activations") not in ACTIVATIONS:
            raise input_error(path, f"{where}.activations", "'dynamic' or 'static' (8-bit symmetric) or 'none' (float)", repr(entry.get("activations")))
        if entry.get("stored", "latent") not in ("latent", "quantized"):
            raise input_error(path, f"{where}.stored", "'latent' or 'quantized'", repr(entry.get("stored")))
        scales = entry.get("static_scales", {})
        if not isinstance(scales, dict):
            raise input_error(path, f"{where}.static_scales", "an object of module: scale", type(scales).__name__)
        if entry["activations"] != "static" and scales:
            raise input_error(path, f"{where}.static_scales", f"none with {entry['activations']} activations", f"{len(scales)} scales")
    embeddings = data.get("word_embeddings", {})
    if "word_embeddings" in data:
        if not isinstance(embeddings, dict):
            raise input_error(path, "'word_embeddings'", "an object", type(embeddings).__name__)
        _known(path, "word_embeddings", embeddings, EMBEDDING_KEYS)
        _bits(path, "word_embeddings", embeddings.get("bits"))
        if embeddings.get("stored", "latent") not in ("latent", "quantized"):
            raise input_error(path, "word_embeddings.stored", "'latent' or 'quantized'", repr(embeddings.get("stored")))
    return path, data


def _known(path: Path, where: str, obj: dict, keys: tuple[str, ...]) -> None:
    for key in obj:
        if key not in keys:
            dotted = f"{where}.{key}" if where else key
            raise input_error(path, f"key '{dotted}'", "one of " + ", ".join(keys), "an unknown key")


def _bits(path: Path, where: str, bits: Any) -> None:
    if bits not in (1, 2) or isinstance(bits, bool):
        raise input_error(path, f"{where}.bits", "1 (binary) or 2 (ternary)", repr(bits))


def activations_source(plan: LowBitPlan) -> str:
    """Where the activation quantizers come from: the checkpoint cannot tell, so say it."""
    if plan.source == "detected":
        return (f"assumed {ACTIVATIONS[DETECTED_ACTIVATIONS]} per token (XTC's default; a checkpoint does not record it: "
                f"declare \"activations\" in {SIDECAR} to choose)")
    return f"declared in {Path(plan.source).name}"


def summarize_plan(plan: LowBitPlan) -> str:
    """One progress line: what is low-bit and how its inputs are treated."""
    kinds = ", ".join(sorted({f"{p.bits}-bit {p.activation}" for p in plan.linears})) or "none"
    embedding = f"{plan.embedding.bits}-bit" if plan.embedding else "fp32"
    line = f"low-bit ({Path(plan.source).name if plan.source != 'detected' else 'detected'}): {len(plan.linears)} Linears ({kinds}), word embeddings {embedding}"
    return line + (f"; activations {activations_source(plan)}" if plan.linears else "")


def describe_plan(plan: LowBitPlan) -> dict[str, Any]:
    """For the manifest: what is low-bit, how, and what stays fp32."""
    if plan.empty:
        return {"lowbit": None, "fp32": "every tensor"}
    return {
        "lowbit": {
            "source": Path(plan.source).name if plan.source not in ("detected", "none") else plan.source,
            "activations_from": activations_source(plan),
            "linear": [
                {"module": p.module, "bits": p.bits, "groups": p.groups, "activations": ACTIVATIONS[p.activation],
                 **({"static_scale": p.static_scale} if p.static_scale is not None else {}), "stored": p.stored}
                for p in plan.linears
            ],
            "word_embeddings": None if plan.embedding is None else
            {"module": plan.embedding.module, "bits": plan.embedding.bits, "groups": "row", "stored": plan.embedding.stored},
        },
        "fp32": "position and token-type embeddings, LayerNorms, biases, pooler, classifier, attention softmax, "
                "and every Linear not listed above (as in XTC)",
    }
