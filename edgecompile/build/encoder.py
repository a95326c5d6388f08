"""The encoder pipeline (the BERT family, looked up like any family): load the student and router, export the dense student once, rewrite one graph
per cluster, compute the PyTorch reference, then per target lower / write / check (targets.py) and the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompile.build.request import BuildRequest, ValidatedInputs
from edgecompile.build.router import LoadedRouter, check_vocab, load_router, max_length
from edgecompile.build.targets import GraphSet, TargetOutcome, build_target
from edgecompile.families import family_of
from edgecompile.inputs.lowbit import LowBitPlan, summarize_plan
from edgecompile.inputs.masks import ClusterMasks
from edgecompile.inputs.student import StudentSpec
from edgecompile.inputs.tokens import Encoded, encode, load_tokenizer
from edgecompile.lowering.targets import Target
from edgecompile.progress import Progress


@dataclass
class LoadedModels:
    student: Any  # the family's reference module (BERT: families/bert_model.StudentModule)
    router: LoadedRouter
    tokenizer_spec: StudentSpec  # whose tokenizer files the student uses (its own, or the router encoder's)
    max_length: int
    samples: list[Encoded]
    lowbit: LowBitPlan = field(default_factory=LowBitPlan)


@dataclass
class CompiledGraphs:
    """Target-independent graphs, in bundle order, plus their accounting for the manifest."""

    graphs: dict[str, Any]  # name -> ir.Model: router, dense, cluster_<k>
    dense_entry: dict[str, Any]
    cluster_entries: list[dict[str, Any]]
    router_entry: dict[str, Any] = field(default_factory=dict)


def all_kept(template: ClusterMasks) -> ClusterMasks:
    """A cluster that keeps everything, shaped like `template` (the dense graph's masks)."""
    return ClusterMasks(-1, np.ones_like(template.blocks), np.ones_like(template.heads), np.ones_like(template.neurons))


def load_models(inputs: ValidatedInputs) -> LoadedModels:
    import torch

    from edgecompile.check.parity import check_fits
    from edgecompile.reference.lowbit_plan import materialize, resolve_plan

    torch.manual_seed(0)
    student = family_of(inputs.student).load_model(inputs.student)
    lowbit = resolve_plan(inputs.student, inputs.lowbit_sidecar, student.model)
    materialize(student.model, lowbit)
    router = load_router(inputs)
    tokenizer_spec = inputs.student if inputs.student.tokenizer_files() else inputs.router.encoder
    tokenizer = load_tokenizer(tokenizer_spec.transformer_dir)
    check_vocab(inputs.student, tokenizer, tokenizer_spec.transformer_dir)
    length = max_length(inputs.student, tokenizer)
    samples = encode(tokenizer, inputs.samples.texts, length)
    for target in inputs.targets:  # fail before any export, with the samples file's line numbers
        check_fits(samples, target, inputs.samples.source, inputs.samples.lines, "student")
        check_fits(router.samples, target, inputs.samples.source, inputs.samples.lines, "router")
    return LoadedModels(student, router, tokenizer_spec, length, samples, lowbit)


def compile_graphs(inputs: ValidatedInputs, models: LoadedModels, progress: Progress) -> CompiledGraphs:
    from edgecompile.bundle.accounting import parameter_count
    from edgecompile.bundle.router_cost import router_entry
    from edgecompile.families.router import export_router
    from edgecompile.passes.pipeline import build_cluster_graph

    spec, masks, student = inputs.student, inputs.masks, models.student
    family = family_of(spec)
    with progress.step("exporting the dense student and the router (once)"):
        dense = family.export(student)
        router = export_router(models.router.module)
        progress.note(f"dense: {len(dense.graph)} nodes; router: {len(router.graph)} nodes")
    lowbit_modules = frozenset(family.graph_prefix + p.module for p in models.lowbit.linears)
    structure = family.structure(spec, student, lowbit_modules)
    graphs = {"router": router, "dense": dense}
    dense_kept = family.kept_structure(spec, all_kept(masks.clusters[0]))
    dense_macs = family.macs_per_token(spec, dense_kept)
    dense_entry = {"graph": "dense", "parameters": parameter_count(dense), "macs_per_token": dense_macs, "nodes": len(dense.graph),
                   "kept": dense_kept}
    entries = []
    with progress.step(f"rewriting {masks.num_clusters} clusters"):
        for cluster in masks.clusters:
            name = f"cluster_{cluster.index}"
            graphs[name] = graph = build_cluster_graph(dense, structure, cluster)
            kept = family.kept_structure(spec, cluster)
            macs = family.macs_per_token(spec, kept)
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


class EncoderPipeline:
    """Stages 2-4 for encoders; `publish` runs `build_target` per target and `manifest` at the end."""

    def __init__(self, request: BuildRequest, inputs: ValidatedInputs, progress: Progress) -> None:
        self.request, self.inputs, self.progress = request, inputs, progress

    def prepare(self) -> None:
        """Load, export once, rewrite per cluster, and run the PyTorch reference on the samples."""
        from edgecompile.lowering.steps import GraphLowBit
        from edgecompile.reference.evaluate import cluster_outputs, router_outputs
        from edgecompile.reference.lowbit import QuantizedLinears

        inputs, progress = self.inputs, self.progress
        with progress.step("loading models and tokenizers"):
            self.models = models = load_models(inputs)
        self.compiled = compile_graphs(inputs, models, progress)
        if not models.lowbit.empty:
            progress.note(summarize_plan(models.lowbit))
        with progress.step("PyTorch reference on samples"):
            quantized = QuantizedLinears(models.student.model, {p.module: (p.activation, p.static_scale) for p in models.lowbit.linears})
            try:
                reference = cluster_outputs(models.student, family_of(inputs.student).gates(models.student), inputs.masks.clusters,
                                            models.samples)
            finally:
                quantized.remove()
            reference["router"] = router_outputs(models.router.module, models.router.samples)
        self.reference = reference
        self.quantized = quantized.quantized
        self.student_tokenizer_files = models.tokenizer_spec.tokenizer_files()
        self.job = GraphSet(self.compiled.graphs, reference, models.samples, models.router.samples,
                            GraphLowBit.from_plan(models.lowbit, family_of(inputs.student).graph_prefix), self.request.threads)

    @property
    def stored_reference(self) -> dict[str, Any]:
        return self.reference

    def integer_check(self, target: Target, lowered: dict[str, Any], groups: dict[str, list]) -> list:
        """Teacher-forced exactness of every integer-lowered low-bit Linear group (see check/integer_parity.py)."""
        from edgecompile.check.integer_parity import IntegerReference, check_integer_linears

        if not groups or not self.quantized:
            return []
        spec = self.inputs.student
        family = family_of(spec)
        integer = IntegerReference(self.quantized, spec.head_size, self.models.samples, self.request.threads,
                                   family.heads_present(spec), family.graph_prefix)
        masks = {f"cluster_{c.index}": c for c in self.inputs.masks.clusters}
        with self.progress.step(f"integer exactness of low-bit Linears on '{target.name}' (teacher-forced)"):
            return [check_integer_linears(target, name, lowered[name], group, masks.get(name), integer)
                    for name, group in groups.items()]

    def build_target(self, target: Target, root: Path) -> TargetOutcome:
        return build_target(target, root, self.job, self.progress, self.integer_check)

    def manifest(self, written: Any) -> dict[str, Any]:
        from edgecompile.bundle.manifest import build_manifest

        return build_manifest(self.inputs, self.models, self.compiled, written)
