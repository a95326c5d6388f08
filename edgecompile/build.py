"""`edgecompile build`: inputs -> one dense export -> per-cluster rewrites -> per-target lowering
-> bundle -> parity gate.

The bundle is assembled in a staging folder and renamed into `--out` only after every target's
parity passed; any failure (bad input, parity miss, Ctrl-C, SIGTERM) leaves `--out` untouched.
Stages, each a function below: validate_inputs, load_models, compile_graphs, reference outputs,
then per target: lower_for_target (lowering/steps.py), write, parity; finally the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompile.errors import ParityError, input_error
from edgecompile.inputs.lowbit import LowBitPlan, read_sidecar, summarize_plan
from edgecompile.reference.lowbit_plan import materialize, resolve_plan
from edgecompile.inputs.masks import ClusterMasks, MaskSet, load_masks
from edgecompile.inputs.samples import Samples, load_samples
from edgecompile.inputs.router import (
    STATIC_MAX_TOKENS, RouterSpec, check_masks_router, encode_router, load_router as load_router_spec, load_router_tokenizer,
)
from edgecompile.inputs.student import StudentSpec, load_student
from edgecompile.progress import Progress
from edgecompile.lowering.targets import Target, load_target
from edgecompile.inputs.tokens import Encoded, encode, load_tokenizer

@dataclass
class BuildRequest:
    student: Path
    masks: Path
    router_encoder: Path
    out: Path
    targets: list[str] = field(default_factory=lambda: ["cpu"])
    samples: Path | None = None
    force: bool = False
    threads: int = 0
    keep_failed: bool = False  # on a parity / placement miss, keep the staging folder as <out>.failed
    router_layers: int | None = None  # use only the router encoder's first n layers
    chat_samples: bool = False  # decoders: each sample is a user turn of the student's chat template


@dataclass
class BuildResult:
    out: Path
    passed: bool
    table: str
    manifest: dict[str, Any]
    timings: dict[str, float]


@dataclass(frozen=True)
class ValidatedInputs:
    student: StudentSpec
    router: RouterSpec
    masks: MaskSet
    samples: Samples
    targets: tuple[Target, ...]
    lowbit_sidecar: tuple[Path, dict[str, Any]] | None = None
    router_checked: bool = False  # the masks file named its router and it matched


@dataclass
class LoadedModels:
    student: Any  # reference.student.StudentModule
    router: Any  # reference.router.RouterModule
    student_tokenizer_spec: Any  # whose tokenizer files the student uses (a StudentSpec)
    student_max_length: int
    router_max_length: int
    student_samples: list[Encoded]
    router_samples: list[Encoded]
    lowbit: LowBitPlan = field(default_factory=LowBitPlan)


@dataclass
class CompiledGraphs:
    """Target-independent graphs, in bundle order, plus their accounting for the manifest."""

    graphs: dict[str, Any]  # name -> ir.Model: router, dense, cluster_<k>
    dense_entry: dict[str, Any]
    cluster_entries: list[dict[str, Any]]
    router_entry: dict[str, Any] = field(default_factory=dict)


def validate_inputs(request: BuildRequest) -> ValidatedInputs:
    """Everything a user can get wrong, checked before any heavy work."""
    from edgecompile.bundle.staging import check_out_dir, check_out_parent

    targets = tuple(load_target(name) for name in dict.fromkeys(request.targets))
    names = [t.name for t in targets]
    for name in names:
        if names.count(name) > 1:
            raise input_error("--target", f"target name '{name}'", "each target once (its name is its bundle folder)",
                              ", ".join(str(t.source) for t in targets if t.name == name))
    check_out_dir(Path(request.out), request.force, request.keep_failed)
    check_out_parent(Path(request.out))
    student = load_student(Path(request.student), role="student")
    router = load_router_spec(Path(request.router_encoder), request.router_layers)
    student.check_tokenizer_files_readable()
    if router.kind == "static" and not student.tokenizer_files():
        raise input_error(student.transformer_dir, "student tokenizer", "tokenizer files (a static-embedding router's "
                          "tokenizer cannot stand in for the student's)", "none")
    masks = load_masks(Path(request.masks), student, router.embedding_dim)
    checked = check_masks_router(masks.path, masks.router_identity, router)
    if request.chat_samples and not student.is_decoder:
        raise input_error("--chat-samples", "student", "a decoder language model (chat templates are theirs)",
                          f"{student.architecture}")
    samples = load_samples(request.samples, request.chat_samples)
    return ValidatedInputs(student, router, masks, samples, targets, read_sidecar(student.path), checked)


def _max_length(spec: StudentSpec, tokenizer) -> int:
    limit = int(spec.config.get("max_position_embeddings", 512))
    model_max = getattr(tokenizer, "model_max_length", limit) or limit
    return int(min(spec.max_seq_length, limit, model_max))


def _check_vocab(spec: StudentSpec, tokenizer, source: Path) -> None:
    vocab = int(spec.config.get("vocab_size", 0))
    if len(tokenizer) > vocab:
        raise input_error(source, "tokenizer vocabulary", f"at most the model's vocab_size {vocab}", len(tokenizer))


def load_router(inputs: ValidatedInputs) -> tuple[Any, Any, int, list[Encoded]]:
    """The router module (encoder + centroids), its tokenizer, max length and the encoded samples."""
    from edgecompile.reference.router import RouterModule, TransformerSentenceEncoder, load_static_encoder
    from edgecompile.reference.student import load_student_module

    masks = inputs.masks
    spec = inputs.router
    if spec.kind == "static":
        encoder = load_static_encoder(spec.path)
    else:
        encoder = TransformerSentenceEncoder(load_student_module(spec.encoder), spec.layers)
    router = RouterModule(encoder, masks.centroids, masks.metric, masks.projection_weight, masks.projection_bias).eval()
    tokenizer = load_router_tokenizer(spec, spec.tokenization)
    if spec.kind == "transformer":
        _check_vocab(spec.encoder, tokenizer, spec.tokenizer_dir)
        max_length = _max_length(spec.encoder, tokenizer)
    else:
        max_length = STATIC_MAX_TOKENS
    return router, tokenizer, max_length, encode_router(tokenizer, spec.tokenization, inputs.samples.texts, max_length)


def load_models(inputs: ValidatedInputs) -> LoadedModels:
    import torch

    from edgecompile.reference.student import load_student_module

    torch.manual_seed(0)
    student = load_student_module(inputs.student)
    lowbit = resolve_plan(inputs.student, inputs.lowbit_sidecar, student.model)
    materialize(student.model, lowbit)
    router, _, router_max, router_samples = load_router(inputs)
    tokenizer_spec = inputs.student if inputs.student.tokenizer_files() else inputs.router.encoder
    student_tokenizer = load_tokenizer(tokenizer_spec.transformer_dir)
    _check_vocab(inputs.student, student_tokenizer, tokenizer_spec.transformer_dir)
    student_max = _max_length(inputs.student, student_tokenizer)
    student_samples = encode(student_tokenizer, inputs.samples.texts, student_max)
    from edgecompile.check.parity import check_fits

    for target in inputs.targets:  # fail before any export, with the samples file's line numbers
        check_fits(student_samples, target, inputs.samples.source, inputs.samples.lines, "student")
        check_fits(router_samples, target, inputs.samples.source, inputs.samples.lines, "router")
    return LoadedModels(student, router, tokenizer_spec, student_max, router_max, student_samples, router_samples, lowbit)


def compile_graphs(inputs: ValidatedInputs, models: LoadedModels, progress: Progress) -> CompiledGraphs:
    from edgecompile.bundle.accounting import kept_structure, macs_per_token, parameter_count
    from edgecompile.bundle.router_cost import router_entry
    from edgecompile.families.bert import BertStructure, export_student
    from edgecompile.families.router import export_router
    from edgecompile.passes.pipeline import build_cluster_graph

    spec, masks, student = inputs.student, inputs.masks, models.student
    with progress.step("exporting the dense student and the router (once)"):
        dense = export_student(student)
        router = export_router(models.router)
        progress.note(f"dense: {len(dense.graph)} nodes; router: {len(router.graph)} nodes")

    from edgecompile.reference.student import GRAPH_PREFIX

    lowbit_modules = frozenset(GRAPH_PREFIX + p.module for p in models.lowbit.linears)
    structure = BertStructure(student.encoder_path, spec.num_layers, spec.num_heads, spec.head_size, lowbit_modules,
                              bert_heads_present(spec))
    graphs = {"router": router, "dense": dense}
    dense_kept = kept_structure(spec, _all_kept(masks.clusters[0]))
    dense_macs = macs_per_token(spec, dense_kept)
    dense_entry = {"graph": "dense", "parameters": parameter_count(dense), "macs_per_token": dense_macs, "nodes": len(dense.graph),
                   "kept": dense_kept}
    entries = []
    with progress.step(f"rewriting {masks.num_clusters} clusters"):
        for cluster in masks.clusters:
            name = f"cluster_{cluster.index}"
            graphs[name] = graph = build_cluster_graph(dense, structure, cluster)
            kept = kept_structure(spec, cluster)
            macs = macs_per_token(spec, kept)
            ratio = macs["total"] / dense_macs["total"] if dense_macs["total"] else None
            entries.append({
                "id": cluster.index,
                "graph": name,
                "masks_given": list(cluster.given),
                "kept": kept,
                "parameters": parameter_count(graph),
                "macs_per_token": macs,
                "macs_ratio_vs_dense": None if ratio is None else round(ratio, 4),
                "nodes": len(graph.graph),
            })
            progress.note(
                f"cluster {cluster.index}: {kept['attention_blocks_kept']}/{spec.num_layers} attention, "
                f"{kept['ffn_blocks_kept']}/{spec.num_layers} FFN, {kept['heads_kept']} heads, "
                f"{kept['neurons_kept']} neurons; {macs['total'] / 1e6:.2f} MMACs/token ({ratio or 0:.0%} of dense)"
            )
    return CompiledGraphs(graphs, dense_entry, entries,
                          router_entry(inputs.router, masks, parameter_count(router), len(router.graph)))


def bert_heads_present(spec: StudentSpec) -> tuple[np.ndarray, ...]:
    from edgecompile.families.bert import heads_present

    return heads_present(spec.num_layers, spec.num_heads, spec.config.get("pruned_heads"))


def note_pruned_heads(spec: StudentSpec, masks: MaskSet, progress: Progress) -> None:
    """Say which heads the checkpoint already lacks, and which clusters' gates for them have nothing to act on."""
    from edgecompile.families.bert import parse_pruned_heads

    pruned = parse_pruned_heads(spec.config.get("pruned_heads"))
    if not pruned:
        return
    listed = "; ".join(f"layer {layer}: {', '.join(map(str, heads))}" for layer, heads in sorted(pruned.items()))
    gated = [c.index for c in masks.clusters if any(np.any(c.heads[layer, list(heads)] != 0) for layer, heads in pruned.items())]
    progress.note(f"the checkpoint was saved after prune_heads ({listed}): those heads are absent from every graph"
                  + (f"; non-zero gates for them (clusters {', '.join(map(str, gated))}) have nothing to act on" if gated else ""))


def _all_kept(template: ClusterMasks) -> ClusterMasks:
    return ClusterMasks(-1, np.ones_like(template.blocks), np.ones_like(template.heads), np.ones_like(template.neurons))


def build(request: BuildRequest, progress: Progress | None = None) -> BuildResult:
    from edgecompile.lowering.steps import GraphLowBit
    from edgecompile.bundle.manifest import build_manifest
    from edgecompile.lowering.target_build import build_target
    from edgecompile.families.bert import bert_gates
    from edgecompile.reference.evaluate import cluster_outputs, router_outputs
    from edgecompile.check.integer_parity import check_integer_linears
    from edgecompile.reference.lowbit import QuantizedLinears

    progress = progress or Progress(quiet=True)
    with progress.step("validating inputs"):
        inputs = validate_inputs(request)
        spec, masks = inputs.student, inputs.masks
        progress.note(
            f"student {spec.architecture} ({spec.family}): {spec.num_layers} layers, {spec.num_heads} heads, "
            f"hidden {spec.hidden_size}; {masks.num_clusters} clusters, metric {masks.metric}, masks {masks.kind}; "
            f"{len(inputs.samples.texts)} samples ({inputs.samples.source}); targets {', '.join(t.name for t in inputs.targets)}"
        )
        progress.note(f"router {inputs.router.name}: {inputs.router.description}, width {inputs.router.embedding_dim}; "
                      + ("the masks file names this router" if inputs.router_checked else
                         "the masks file names no router (metadata router.encoder.*): centroids not checked against it"))
        if not spec.is_decoder:
            note_pruned_heads(spec, masks, progress)
        if spec.ignored_fields:
            progress.note(f"config.json fields transformers' config class neither defines nor reads, ignored as bookkeeping "
                          f"(manifest: student.config_fields_ignored): {', '.join(spec.ignored_fields)}")
    if spec.is_decoder:
        from edgecompile.build_decoder import build_decoder

        return build_decoder(request, inputs, progress)
    with progress.step("loading models and tokenizers"):
        models = load_models(inputs)
    compiled = compile_graphs(inputs, models, progress)
    if not models.lowbit.empty:
        progress.note(summarize_plan(models.lowbit))
    with progress.step("PyTorch reference on samples"):
        quantized = QuantizedLinears(models.student.model, {p.module: (p.activation, p.static_scale) for p in models.lowbit.linears})
        try:
            reference = cluster_outputs(models.student, bert_gates(models.student.bert), masks.clusters, models.student_samples)
        finally:
            quantized.remove()
        reference["router"] = router_outputs(models.router, models.router_samples)

    graph_lowbit = GraphLowBit.from_plan(models.lowbit)
    quant_reference = quantized.quantized
    masks_by_graph = {f"cluster_{c.index}": c for c in masks.clusters}

    def integer_check(target, lowered, groups) -> list:
        """Teacher-forced exactness of every integer-lowered low-bit Linear group (see integer_parity.py)."""
        if not groups or not quant_reference:
            return []
        with progress.step(f"integer exactness of low-bit Linears on '{target.name}' (teacher-forced)"):
            return [check_integer_linears(target, name, lowered[name], g, quant_reference, masks_by_graph.get(name),
                                          spec.head_size, models.student_samples, request.threads, bert_heads_present(spec))
                    for name, g in groups.items()]

    def build_one(target: Target, root: Path):
        return build_target(target, root, compiled.graphs, models, reference, graph_lowbit, integer_check, request.threads, progress)

    def manifest_of(target_entries, graph_bytes, files, tokenizers, reference_files):
        return build_manifest(inputs, models, compiled, target_entries, graph_bytes, files, tokenizers, reference_files)

    return publish(request, inputs, progress, build_one, reference, models.student_tokenizer_spec.tokenizer_files(), manifest_of)


def publish(request: BuildRequest, inputs: ValidatedInputs, progress: Progress,
            build_one: Callable[[Target, Path], Any], reference: dict[str, Any], student_tokenizer_files: tuple[Path, ...],
            manifest_of: Callable[..., dict[str, Any]]) -> BuildResult:
    """Stage the bundle, build every target into it (`build_one` -> TargetOutcome), gate on parity, write the
    tokenizers, reference outputs, reports and manifest, commit. Shared by encoder and decoder builds."""
    from edgecompile.bundle.staging import Staging
    from edgecompile.bundle.store import (
        REFERENCE_OUTPUTS, REFERENCE_SAMPLES, STUDENT_TOKENIZER, file_table, save_reference, write_json, write_tokenizers,
    )
    from edgecompile.check.parity import parity_json, parity_markdown, parity_table

    with Staging(Path(request.out), request.force) as staging:
        root = staging.root
        for folder in staging.removed_stale:
            progress.note(f"removed {folder} (left by an earlier build that was killed)")
        results, target_entries, graph_bytes = [], {}, {}
        try:
            for target in inputs.targets:
                outcome = build_one(target, root)
                results.append(outcome.parity)
                target_entries[target.name] = outcome.entry
                graph_bytes[target.name] = outcome.graph_bytes
            table = parity_table(results)
            if not all(r.passed for r in results):
                (root / "parity.md").write_text(parity_markdown(table, inputs.targets, target_entries), encoding="utf-8")
                raise ParityError("parity failed; no bundle was written\n" + table)
        except ParityError as failure:
            if request.keep_failed:
                kept = staging.keep_as_failed()
                raise type(failure)(f"{str(failure).splitlines()[0]} (artifacts kept in {kept} for inspection)\n"
                                    + "\n".join(str(failure).splitlines()[1:])) from None
            raise

        with progress.step("writing tokenizers, reference outputs, reports and manifest"):
            router_tokenizer = write_tokenizers(root, student_tokenizer_files, inputs.router.tokenizer_files())
            save_reference(root, inputs.samples.texts, reference)
            write_json(root / "parity.json", parity_json(results, {t.name: t for t in inputs.targets}))
            (root / "parity.md").write_text(parity_markdown(table, inputs.targets, target_entries), encoding="utf-8")
            manifest = manifest_of(target_entries, graph_bytes, file_table(root),
                                   {"student": STUDENT_TOKENIZER, "router": router_tokenizer},
                                   {"outputs": REFERENCE_OUTPUTS, "samples": REFERENCE_SAMPLES})
            write_json(root / "manifest.json", manifest)
        staging.commit()
    return BuildResult(Path(request.out), True, table, manifest, dict(progress.timings))
