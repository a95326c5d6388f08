"""`edgecompile build`: inputs -> one dense export -> per-cluster rewrites -> bundle -> parity gate.

The bundle is assembled in a staging folder and renamed into `--out` only after every target's
parity passed; any failure (bad input, parity miss, Ctrl-C, SIGTERM) leaves `--out` untouched.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompile.errors import InputError, ParityError, input_error
from edgecompile.inputs.masks import MaskSet, load_masks
from edgecompile.inputs.samples import Samples, load_samples
from edgecompile.inputs.student import StudentSpec, load_student
from edgecompile.progress import Progress
from edgecompile.targets import Target, load_target, target_to_dict
from edgecompile.tokens import Encoded, encode, load_tokenizer

REFERENCE_DIR = "reference"
REFERENCE_OUTPUTS = "reference/outputs.safetensors"
REFERENCE_SAMPLES = "reference/samples.txt"
STUDENT_TOKENIZER = "tokenizer"
ROUTER_TOKENIZER = "router_tokenizer"


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
    router: StudentSpec
    masks: MaskSet
    samples: Samples
    targets: tuple[Target, ...]


def validate_inputs(request: BuildRequest) -> ValidatedInputs:
    """Everything a user can get wrong, checked before any heavy work."""
    targets = tuple(load_target(name) for name in dict.fromkeys(request.targets))
    from edgecompile.bundle import check_out_dir

    check_out_dir(Path(request.out), request.force)
    student = load_student(Path(request.student), role="student")
    router = load_student(Path(request.router_encoder), role="router encoder")
    if router.family != "sentence-transformers":
        raise input_error(request.router_encoder, "router encoder", "a sentence-transformers folder (modules.json)", f"a plain {router.architecture} checkpoint")
    masks = load_masks(Path(request.masks), student, router.embedding_dim)
    samples = load_samples(request.samples)
    return ValidatedInputs(student, router, masks, samples, targets)


def _tokenizer_source(spec: StudentSpec, fallback: StudentSpec) -> StudentSpec:
    return spec if spec.tokenizer_files() else fallback


def _max_length(spec: StudentSpec, tokenizer) -> int:
    limit = int(spec.config.get("max_position_embeddings", 512))
    model_max = getattr(tokenizer, "model_max_length", limit) or limit
    return int(min(spec.max_seq_length, limit, model_max))


def _check_vocab(spec: StudentSpec, tokenizer, source: Path) -> None:
    vocab = int(spec.config.get("vocab_size", 0))
    if len(tokenizer) > vocab:
        raise input_error(source, "tokenizer vocabulary", f"at most the model's vocab_size {vocab}", len(tokenizer))


def _check_fixed_lengths(targets: tuple[Target, ...], encoded: list[Encoded], samples: Samples, which: str) -> None:
    for target in targets:
        if target.dynamic_shapes:
            continue
        for sample, line in zip(encoded, samples.lines):
            if sample.length > target.sequence:
                raise input_error(
                    samples.source, f"line {line} ({which} tokens)",
                    f"at most {target.sequence} tokens (target '{target.name}' shapes.sequence; not truncated silently)",
                    sample.length,
                )


def _same_files(a: tuple[Path, ...], b: tuple[Path, ...]) -> bool:
    return [p.name for p in a] == [p.name for p in b] and all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def _sha256(path: Path) -> str:
    from edgecompile.bundle import sha256_file

    return sha256_file(path)


def _save_reference(path: Path, reference: dict[str, dict[str, list[np.ndarray]]]) -> None:
    from safetensors.numpy import save_file

    tensors = {
        f"{graph}/{output}/{i:04d}": np.ascontiguousarray(array)
        for graph, outputs in reference.items()
        for output, arrays in outputs.items()
        for i, array in enumerate(arrays)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def build(request: BuildRequest, progress: Progress | None = None) -> BuildResult:
    progress = progress or Progress(quiet=True)
    import onnx
    import onnx_ir as ir
    import onnxruntime
    import torch
    import transformers

    from edgecompile import __version__
    from edgecompile.accounting import kept_structure, macs_per_token, parameter_count
    from edgecompile.bundle import SCHEMA_VERSION, Staging, file_table, graph_signature, write_graphs, write_json
    from edgecompile.export import OPSET, export_router, export_student
    from edgecompile.parity import check_target, parity_json, parity_table
    from edgecompile.passes.bert_sites import BertStructure
    from edgecompile.pipeline import build_cluster_graph
    from edgecompile.reference.evaluate import cluster_outputs, router_outputs
    from edgecompile.reference.router import RouterModule
    from edgecompile.reference.student import load_student_module

    with progress.step("validating inputs"):
        inputs = validate_inputs(request)
        spec, masks = inputs.student, inputs.masks
        progress.note(
            f"student {spec.architecture} ({spec.family}): {spec.num_layers} layers, {spec.num_heads} heads, "
            f"hidden {spec.hidden_size}; {masks.num_clusters} clusters, metric {masks.metric}, masks {masks.kind}; "
            f"{len(inputs.samples.texts)} samples ({inputs.samples.source}); targets {', '.join(t.name for t in inputs.targets)}"
        )

    with progress.step("loading models and tokenizers"):
        torch.manual_seed(0)
        student = load_student_module(spec)
        router_encoder = load_student_module(inputs.router)
        router = RouterModule(router_encoder, masks.centroids, masks.metric, masks.projection_weight, masks.projection_bias).eval()
        student_tok_spec = _tokenizer_source(spec, inputs.router)
        if not inputs.router.tokenizer_files():
            raise InputError(f"{inputs.router.transformer_dir}: router encoder tokenizer: expected tokenizer files, found none")
        student_tokenizer = load_tokenizer(student_tok_spec.transformer_dir)
        router_tokenizer = load_tokenizer(inputs.router.transformer_dir)
        _check_vocab(spec, student_tokenizer, student_tok_spec.transformer_dir)
        _check_vocab(inputs.router, router_tokenizer, inputs.router.transformer_dir)
        student_samples = encode(student_tokenizer, inputs.samples.texts, _max_length(spec, student_tokenizer))
        router_samples = encode(router_tokenizer, inputs.samples.texts, _max_length(inputs.router, router_tokenizer))
        _check_fixed_lengths(inputs.targets, student_samples, inputs.samples, "student")
        _check_fixed_lengths(inputs.targets, router_samples, inputs.samples, "router")

    with progress.step("exporting the dense student and the router (once)"):
        dense = export_student(student)
        router_graph = export_router(router)
        progress.note(f"dense: {len(dense.graph)} nodes; router: {len(router_graph.graph)} nodes")

    structure = BertStructure(student.encoder_path, spec.num_layers, spec.num_heads, spec.head_size)
    clusters: dict[str, ir.Model] = {}
    with progress.step(f"rewriting {masks.num_clusters} clusters"):
        for cluster in masks.clusters:
            clusters[f"cluster_{cluster.index}"] = build_cluster_graph(dense, structure, cluster)
        # Accounting reads the graphs before the writer swaps their tensors for external references.
        dense_macs = macs_per_token(spec, kept_structure(spec, _all_ones(masks.clusters[0])))
        cluster_entries = []
        for cluster in masks.clusters:
            kept = kept_structure(spec, cluster)
            macs = macs_per_token(spec, kept)
            graph = clusters[f"cluster_{cluster.index}"]
            cluster_entries.append({
                "id": cluster.index,
                "graph": f"cluster_{cluster.index}",
                "masks_given": list(cluster.given),
                "kept": kept,
                "parameters": parameter_count(graph),
                "macs_per_token": macs,
                "macs_ratio_vs_dense": round(macs["total"] / dense_macs["total"], 4) if dense_macs["total"] else None,
                "nodes": len(graph.graph),
            })
            progress.note(
                f"cluster {cluster.index}: {kept['attention_blocks_kept']}/{spec.num_layers} attention, "
                f"{kept['ffn_blocks_kept']}/{spec.num_layers} FFN, {kept['heads_kept']} heads, "
                f"{kept['neurons_kept']} neurons; {macs['total'] / 1e6:.2f} MMACs/token "
                f"({macs['total'] / dense_macs['total']:.0%} of dense)"
            )
        dense_entry = {"graph": "dense", "parameters": parameter_count(dense), "macs_per_token": dense_macs, "nodes": len(dense.graph)}

    with progress.step("PyTorch reference on samples"):
        reference = cluster_outputs(student, masks.clusters, student_samples)
        reference["router"] = router_outputs(router, router_samples)

    ordered = [("router", router_graph), ("dense", dense)] + list(clusters.items())
    with Staging(Path(request.out), request.force) as staging:
        root = staging.root
        results = []
        target_entries = {}
        graph_bytes: dict[str, dict[str, int]] = {}
        for target in inputs.targets:
            with progress.step(f"writing graphs for target '{target.name}'"):
                graphs = [(f"{name}.onnx", model.clone()) for name, model in ordered]
                needs = write_graphs(root / target.name, graphs, target.shared_weights)
                graph_bytes[target.name] = {name.removesuffix(".onnx"): size for name, size in needs.items()}
                target_entries[target.name] = {
                    "provider": target.provider,
                    "precision": target.precision,
                    "dynamic_shapes": target.dynamic_shapes,
                    **({} if target.dynamic_shapes else {"batch": target.batch, "sequence": target.sequence}),
                    "format": target.format,
                    "shared_weights": target.shared_weights,
                    "definition": target.source.name,
                    "target": target_to_dict(target),
                    "graphs": {
                        name: {"file": f"{target.name}/{name}.onnx", **graph_signature(model)} for name, model in ordered
                    },
                }
            with progress.step(f"parity on '{target.name}' ({target.provider})"):
                paths = {name: root / target.name / f"{name}.onnx" for name, _ in ordered}
                result = check_target(
                    target, paths, reference, student_samples, router_samples, request.threads,
                    progress=lambda graph: progress.note(f"running {graph}"),
                )
                results.append(result)

        table = parity_table(results)
        targets_by_name = {t.name: t for t in inputs.targets}
        if not all(r.passed for r in results):
            raise ParityError("parity failed; no bundle was written\n" + table)

        with progress.step("writing tokenizers, reference outputs, reports and manifest"):
            for source in student_tok_spec.tokenizer_files():
                (root / STUDENT_TOKENIZER).mkdir(exist_ok=True)
                shutil.copyfile(source, root / STUDENT_TOKENIZER / source.name)
            router_tokenizer_dir = STUDENT_TOKENIZER
            if not _same_files(student_tok_spec.tokenizer_files(), inputs.router.tokenizer_files()):
                router_tokenizer_dir = ROUTER_TOKENIZER
                (root / ROUTER_TOKENIZER).mkdir(exist_ok=True)
                for source in inputs.router.tokenizer_files():
                    shutil.copyfile(source, root / ROUTER_TOKENIZER / source.name)
            (root / REFERENCE_DIR).mkdir(exist_ok=True)
            (root / REFERENCE_SAMPLES).write_text("\n".join(inputs.samples.texts) + "\n", encoding="utf-8")
            _save_reference(root / REFERENCE_OUTPUTS, reference)
            write_json(root / "parity.json", parity_json(results, targets_by_name))
            (root / "parity.md").write_text(_parity_markdown(table, inputs.targets), encoding="utf-8")

            files = file_table(root)
            dense_entry["bytes"] = {t.name: graph_bytes[t.name]["dense"] for t in inputs.targets}
            for entry in cluster_entries:
                entry["files"] = {
                    t.name: {rel: files[rel]["sha256"] for rel in _graph_files(root, t.name, entry["graph"])}
                    for t in inputs.targets
                }
                entry["bytes"] = {t.name: graph_bytes[t.name][entry["graph"]] for t in inputs.targets}
            manifest = {
                "schema": SCHEMA_VERSION,
                "tool": {
                    "edgecompile": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                    "onnx_ir": ir.__version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
                },
                "opset": OPSET,
                "student": {
                    "name": spec.path.name,
                    "family": spec.family,
                    "architecture": spec.architecture,
                    "weights_sha256": _sha256(spec.transformer_dir / "model.safetensors"),
                    "layers": spec.num_layers, "heads": spec.num_heads, "head_size": spec.head_size,
                    "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
                    "outputs": list(student.output_names),
                    **({"pooling": spec.pooling_mode, "normalize": spec.normalize} if spec.family == "sentence-transformers" else {}),
                    "max_seq_length": _max_length(spec, student_tokenizer),
                    "vocab_size": int(spec.config["vocab_size"]),
                    "tokenizer": STUDENT_TOKENIZER,
                    "stays_fp32": "everything (fp32 rewrites)",
                },
                "router": {
                    "name": inputs.router.path.name,
                    "weights_sha256": _sha256(inputs.router.transformer_dir / "model.safetensors"),
                    "pooling": inputs.router.pooling_mode, "normalize": inputs.router.normalize,
                    "projection": None if masks.projection_weight is None else list(masks.projection_weight.shape),
                    "metric": masks.metric,
                    "clusters": masks.num_clusters,
                    "max_seq_length": _max_length(inputs.router, router_tokenizer),
                    "vocab_size": int(inputs.router.config["vocab_size"]),
                    "tokenizer": router_tokenizer_dir,
                    "tie_break": "lowest cluster id",
                },
                "masks": {"name": masks.path.name, "sha256": _sha256(masks.path), "kind": masks.kind},
                "samples": {"count": len(inputs.samples.texts), "source": Path(inputs.samples.source).name, "file": REFERENCE_SAMPLES},
                "dense": dense_entry,
                "clusters": cluster_entries,
                "targets": target_entries,
                "parity": {"passed": True, "report": "parity.md", "data": "parity.json", "reference_outputs": REFERENCE_OUTPUTS},
                "files": files,
            }
            write_json(root / "manifest.json", manifest)
        staging.commit()
    return BuildResult(Path(request.out), True, table, manifest, dict(progress.timings))


def _graph_files(root: Path, target: str, graph: str) -> list[str]:
    from edgecompile.bundle import WEIGHTS

    files = [f"{target}/{graph}.onnx"]
    if (root / target / WEIGHTS).is_file():
        files.append(f"{target}/{WEIGHTS}")
    return files


def _all_ones(template) -> Any:
    from edgecompile.inputs.masks import ClusterMasks

    return ClusterMasks(-1, np.ones_like(template.blocks), np.ones_like(template.heads), np.ones_like(template.neurons))


def _parity_markdown(table: str, targets: tuple[Target, ...]) -> str:
    lines = ["# Parity report", "", "Every graph vs the PyTorch reference (masks applied in eager mode), per target.", ""]
    for t in targets:
        p = t.parity
        lines.append(
            f"- **{t.name}** ({t.provider}, {t.precision}): max rel error ≤ {p.max_relative_error:g}, "
            f"min cosine ≥ {p.min_cosine:g}, argmax agreement ≥ {p.min_argmax_agreement:g}, "
            f"router agreement ≥ {p.min_router_agreement:g}"
        )
    lines += ["", table, "", "max rel error = max over samples of max|onnx - ref| / max|ref|; per-token outputs on real tokens only.", ""]
    return "\n".join(lines)
