"""A low-bit plan matched against the loaded Hugging Face model: declared entries resolved to its Linear modules
(inputs/lowbit.py reads the declaration), or low-bit tensors detected and recovered exactly (the rules of
reference/lowbit.py), then latent weights replaced by codes * alpha."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Any

import numpy as np

from edgecompile.errors import input_error
from edgecompile.inputs.lowbit import (
    DETECTED_ACTIVATIONS, DETECTED_TERNARY_ZERO_SHARE, BINARY_MAX_ZERO_SHARE, SIDECAR, STAYS_FP32, EmbeddingPlan, LinearPlan,
    LowBitPlan,
)
from edgecompile.reference.lowbit import (
    LOWBIT_MIN_EVIDENCE, MAX_RUNS_PER_ROW, MIN_RUN_WIDTH, describe_mismatch, fake_quantize_weight, lowbit_evidence, recover_codes,
)


def runs_per_row(shape: tuple[int, int], groups: str | int) -> int:
    """How many alphas a row gets: g contiguous chunks of the row-major weight cut a row into
    in / gcd(chunk, in) runs (1 when chunks hold whole rows)."""
    if not isinstance(groups, int):
        return 1
    out_features, in_features = shape
    return in_features // math.gcd((out_features * in_features) // groups, in_features)


def _check_groups(path: Path, where: str, module: str, shape: tuple[int, int], groups: str | int) -> None:
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

    modules = dict(model.named_modules())
    with torch.no_grad():
        for linear in plan.linears:
            if linear.stored == "latent":
                weight = modules[linear.module].weight
                weight.copy_(fake_quantize_weight(weight, linear.bits, linear.groups))
        if plan.embedding is not None and plan.embedding.stored == "latent":
            weight = modules[plan.embedding.module].weight
            weight.copy_(fake_quantize_weight(weight, plan.embedding.bits, "row"))
