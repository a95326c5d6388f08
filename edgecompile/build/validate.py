"""Stage 1: everything a user can get wrong, checked before any heavy work, and said in the progress lines."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgecompile.build.request import BuildRequest, ValidatedInputs
from edgecompile.errors import input_error
from edgecompile.families import family_of, load_student
from edgecompile.families.router import load_router
from edgecompile.inputs.lowbit import read_sidecar
from edgecompile.inputs.masks import load_masks
from edgecompile.inputs.router import check_masks_router
from edgecompile.inputs.samples import load_samples
from edgecompile.lowering.targets import load_target
from edgecompile.progress import Progress


def validate_inputs(request: BuildRequest) -> ValidatedInputs:
    from edgecompile.bundle.staging import check_out_dir, check_out_parent

    targets = tuple(load_target(name) for name in dict.fromkeys(request.targets))
    if request.weights is not None:  # the build option: one weight format for every target
        targets = tuple(replace(t, linear_weights=replace(t.linear_weights, format=request.weights)) for t in targets)
    names = [t.name for t in targets]
    for name in names:
        if names.count(name) > 1:
            raise input_error("--target", f"target name '{name}'", "each target once (its name is its bundle folder)",
                              ", ".join(str(t.source) for t in targets if t.name == name))
    check_out_dir(Path(request.out), request.force, request.keep_failed)
    check_out_parent(Path(request.out))
    student = load_student(Path(request.student), role="student")
    router = load_router(Path(request.router_encoder), request.router_layers)
    student.check_tokenizer_files_readable()
    if router.kind == "static" and not student.tokenizer_files():
        raise input_error(student.transformer_dir, "student tokenizer", "tokenizer files (a static-embedding router's "
                          "tokenizer cannot stand in for the student's)", "none")
    masks = load_masks(Path(request.masks), student, router.embedding_dim)
    checked = check_masks_router(masks.path, masks.router_identity, router)
    quantizing = [t.name for t in targets if t.linear_weights.quantizes]
    for target in targets:
        if target.linear_weights.quantizes and "quantize_weights" not in target.steps:
            raise input_error(target.source, "key 'lowering.steps'", f"'quantize_weights' (its weights are "
                              f"{target.linear_weights.tag})", ", ".join(target.steps) or "none")
    if quantizing and not student.is_decoder:
        raise input_error("--weights" if request.weights else f"--target {quantizing[0]}", "weights",
                          "fp32 for encoder students (block-quantized weights are for decoders)",
                          f"{targets[0].linear_weights.format if request.weights else 'quantized in its [weights] table'}")
    if request.chat_samples and not student.is_decoder:
        raise input_error("--chat-samples", "student", "a decoder language model (chat templates are theirs)",
                          f"{student.architecture}")
    samples = load_samples(request.samples, request.chat_samples)
    return ValidatedInputs(student, router, masks, samples, targets, read_sidecar(student.path), checked)


def describe(inputs: ValidatedInputs, progress: Progress) -> None:
    """The progress lines saying what the build was given."""
    spec, masks = inputs.student, inputs.masks
    progress.note(
        f"student {spec.architecture} ({spec.family}): {spec.num_layers} layers, {spec.num_heads} heads, "
        f"hidden {spec.hidden_size}; {masks.num_clusters} clusters, metric {masks.metric}, masks {masks.kind}; "
        f"{len(inputs.samples.texts)} samples ({inputs.samples.source}); targets {', '.join(t.name for t in inputs.targets)}"
    )
    progress.note(f"router {inputs.router.name}: {inputs.router.description}, width {inputs.router.embedding_dim}; "
                  + ("the masks file names this router" if inputs.router_checked else
                     "the masks file names no router (metadata router.encoder.*): centroids not checked against it"))
    for note in family_of(spec).notes(spec, masks):
        progress.note(note)
    if spec.ignored_fields:
        progress.note(f"config.json fields transformers' config class neither defines nor reads, ignored as bookkeeping "
                      f"(manifest: student.config_fields_ignored): {', '.join(spec.ignored_fields)}")
