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

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


def runs_per_row(shape: tuple[int, int], groups: str | int) -> int:
    """How many alphas a row gets: g contiguous chunks of the row-major weight cut a row into
    in / gcd(chunk, in) runs (1 when chunks hold whole rows)."""
    if not isinstance(groups, int):
        return 1
    out_features, in_features = shape
    return in_features // math.gcd((out_features * in_features) // groups, in_features)


def _check_groups(path: Path, where: str, module: str, shape: tuple[int, int], groups: str | int) -> None:
    from edgecompile.reference.lowbit import MAX_RUNS_PER_ROW, MIN_RUN_WIDTH

    if not isinstance(groups, int):
        return
    out_features, in_features = shape
    if (out_features * in_features) % groups:
        raise input_error(path, f"{where}.groups for {module}", f"a number of groups dividing the weight's {out_features}x{in_features} values", groups)
    runs, limit = runs_per_row(shape, groups), min(MAX_RUNS_PER_ROW, max(in_features // MIN_RUN_WIDTH, 1))
    if runs > limit:
        raise input_error(path, f"{where}.groups for {module}",
                          f"at most {limit} alphas per row of {in_features} inputs (at most {MAX_RUNS_PER_ROW}, each over at least {MIN_RUN_WIDTH} inputs)",
                          f"{groups} (groups of {out_features * in_features // groups} values: {runs} per row)")


def _in_layer_stack(name: str) -> bool:
    """A Linear of the transformer layers (BERT `encoder.layer.i`, Llama `model.layers.i`), not a head."""
    return ".layer." in name or ".layers." in name


def _linear_modules(model) -> dict[str, Any]:
    from torch import nn

    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _embedding_name(model) -> str:
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding)


def _weights_file(spec) -> Path:
    return spec.transformer_dir / "model.safetensors"


def _verify_stored(source: Path, module: str, weight: np.ndarray, bits: int, groups: str | int) -> None:
    """A declared already-quantized tensor must be exactly what the declaration says."""
    from edgecompile.reference.lowbit import describe_mismatch

    blocks = 1 if groups == "matrix" else (weight.shape[0] if groups == "row" else int(groups))
    magnitude = np.abs(np.asarray(weight, dtype=np.float32)).reshape(blocks, -1)
    alpha = magnitude.max(axis=1, keepdims=True)
    if not np.all((magnitude == 0) | (magnitude == alpha)):
        off, worst = describe_mismatch(weight)
        raise input_error(source, f"tensor {module}.weight", f"{bits}-bit codes * alpha per row as declared ({groups!r} groups)",
                          f"{off} values off their run's magnitude (by up to {worst:.2g} relative)" if off else "alphas that differ within a group")
    zeros = float(np.mean(magnitude == 0))
    if bits == 1 and zeros > BINARY_MAX_ZERO_SHARE:
        raise input_error(source, f"tensor {module}.weight", "binary codes (sign, almost no zeros) as declared",
                          f"{zeros:.0%} zeros (ternary?)")


def resolve_plan(spec, sidecar: tuple[Path, dict[str, Any]] | None, model) -> LowBitPlan:
    """Match the declaration (or detect) against the loaded Hugging Face model."""
    linears = _linear_modules(model)
    embedding_name = _embedding_name(model)
    if sidecar is None:
        return _detect(spec, model, linears, embedding_name)
    path, data = sidecar
    plans: list[LinearPlan] = []
    claimed: dict[str, int] = {}
    for i, entry in enumerate(data.get("linear", [])):
        where = f"linear[{i}]"
        matched = sorted({name for pattern in entry["modules"] for name in linears if fnmatch.fnmatchcase(name, pattern)})
        if not matched:
            example = next((n for n in linears if _in_layer_stack(n)), next(iter(linears), "?"))
            raise input_error(path, f"{where}.modules {entry['modules']}", f"names of Linear modules in the student (e.g. {example})", "no match")
        for name in matched:
            if any(part in name.split(".") for part in STAYS_FP32):
                raise input_error(path, f"{where}.modules", "Linear layers of the transformer layers (pooler, classifier and lm_head stay fp32)", name)
            if name in claimed:
                raise input_error(path, f"{where}.modules", "each module in one entry", f"{name} also in linear[{claimed[name]}]")
            claimed[name] = i
        scales = entry.get("static_scales", {})
        for name in scales:
            if name not in matched:
                raise input_error(path, f"{where}.static_scales", f"scales only for this entry's modules ({', '.join(matched[:2])}, ...)", repr(name))
        for name in matched:
            weight = linears[name].weight.detach().numpy()
            _check_groups(path, where, name, weight.shape, entry.get("groups", "row"))
            scale = None
            if entry["activations"] == "static":
                scale = scales.get(name)
                if scale is None:
                    raise input_error(path, f"{where}.static_scales", f"a scale for {name}", "none")
                if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
                    raise input_error(path, f"{where}.static_scales[{name}]", "a positive finite number", repr(scale))
                scale = float(scale)
            stored = entry.get("stored", "latent")
            if stored == "quantized":
                _verify_stored(_weights_file(spec), name, weight, entry["bits"], entry.get("groups", "row"))
            plans.append(LinearPlan(name, entry["bits"], entry.get("groups", "row"), entry["activations"], scale, stored))
    embedding = None
    if "word_embeddings" in data:
        declared = data["word_embeddings"]
        stored = declared.get("stored", "latent")
        if stored == "quantized":
            _verify_stored(_weights_file(spec), embedding_name, model.get_input_embeddings().weight.detach().numpy(), declared["bits"], "row")
        embedding = EmbeddingPlan(embedding_name, declared["bits"], stored)
    return LowBitPlan(tuple(plans), embedding, str(path))


def _detect(spec, model, linears: dict[str, Any], embedding_name: str) -> LowBitPlan:
    from edgecompile.reference.lowbit import LOWBIT_MIN_EVIDENCE, MAX_RUNS_PER_ROW, describe_mismatch, lowbit_evidence, recover_codes

    plans = []
    candidates = {name: m.weight for name, m in linears.items() if _in_layer_stack(name)}
    candidates[embedding_name] = model.get_input_embeddings().weight
    embedding = None
    for name, parameter in candidates.items():
        weight = parameter.detach().numpy()
        if lowbit_evidence(weight) < LOWBIT_MIN_EVIDENCE:
            continue  # a float tensor (its magnitudes do not repeat), however many zeros it holds
        tensor = f"tensor {name}.weight"
        limit = 1 if name == embedding_name else MAX_RUNS_PER_ROW
        recovered = recover_codes(weight, limit)
        if recovered is None:
            off, worst = describe_mismatch(weight)
            raise input_error(
                _weights_file(spec), tensor, "exactly sign * alpha per row or per group (it looks binary/ternary)",
                f"{off} values off their run's magnitude by up to {worst:.2g} relative; declare it in {SIDECAR} "
                "with \"stored\": \"latent\" to re-quantize, or fix the checkpoint",
            )
        bits = 2 if float(np.mean(recovered.codes == 0)) > DETECTED_TERNARY_ZERO_SHARE else 1
        if name == embedding_name:
            embedding = EmbeddingPlan(name, bits, "detected")
        else:
            plans.append(LinearPlan(name, bits, _detected_groups(recovered), DETECTED_ACTIVATIONS, None, "detected"))
    if not plans and embedding is None:
        return LowBitPlan()
    return LowBitPlan(tuple(plans), embedding, "detected")


def _detected_groups(recovered) -> str | int:
    """'row', or DeepSpeed's group count for equal chunks that cut rows."""
    return "row" if recovered.runs == 1 else recovered.codes.shape[0] * recovered.runs


def materialize(model, plan: LowBitPlan) -> None:
    """Write codes * alpha into the weights the plan quantizes from latent floats (in place)."""
    import torch

    from edgecompile.reference.lowbit import fake_quantize_weight

    modules = dict(model.named_modules())
    with torch.no_grad():
        for linear in plan.linears:
            if linear.stored == "latent":
                weight = modules[linear.module].weight
                weight.copy_(fake_quantize_weight(weight, linear.bits, linear.groups))
        if plan.embedding is not None and plan.embedding.stored == "latent":
            weight = modules[plan.embedding.module].weight
            weight.copy_(fake_quantize_weight(weight, plan.embedding.bits, "row"))


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
