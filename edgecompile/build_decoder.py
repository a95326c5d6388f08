"""`edgecompile build` for decoder language models (LlamaForCausalLM; see families/llama.py).

Same guarantees and stages as the encoder build (build.py): validate, load, write the dense graph
once, rewrite one graph per cluster, build the router, prove parity, stage, commit. What differs is
what parity means for a language model: per cluster and sample prompt, the prefill logits within the
target's tolerance of transformers' own model with the same masks, and greedy generation of
`NEW_TOKENS` tokens identical to PyTorch's greedy loop, both through `edgecompile run`'s onnxruntime
loop and through onnxruntime-genai loading the shipped folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompile.errors import InputError, input_error
from edgecompile.inputs.masks import ClusterMasks
from edgecompile.progress import Progress

NEW_TOKENS = 32  # greedy tokens per prompt the parity gate generates


@dataclass
class DecoderModels:
    dims: Any  # families.llama.LlamaDims
    weights: dict[str, np.ndarray]
    reference: Any  # transformers LlamaForCausalLM
    router: Any  # reference.router.RouterModule
    router_max_length: int
    router_samples: list
    prompts: list[list[int]]
    eos: frozenset[int]
    extra_heads: list  # multi-token prediction: transformers LlamaDecoderLayers of the extra heads
    lowbit: Any = None  # inputs.lowbit.LowBitPlan
    quantized: Any = None  # reference.lowbit.QuantizedLinears installed on `reference` (activation quantizers)


def check_targets(targets) -> None:
    for target in targets:
        if target.provider != "CPUExecutionProvider" or target.format != "onnx" or not target.dynamic_shapes:
            raise InputError(
                f"--target {target.name}: decoder language models compile for the CPU EP with dynamic shapes only "
                f"(onnxruntime-genai folders); found {target.provider}, {target.format}, "
                f"{'dynamic' if target.dynamic_shapes else 'fixed'} shapes"
            )


def eos_ids(config: dict[str, Any]) -> frozenset[int]:
    eos = config.get("eos_token_id")
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


def load_decoder_models(inputs: Any) -> DecoderModels:
    import torch

    from edgecompile.build import load_router
    from edgecompile.families.llama import LlamaDims, load_reference, load_weights
    from edgecompile.families.mtp import load_extra_heads
    from edgecompile.inputs.student import WEIGHTS_FILE
    from edgecompile.inputs.tokens import load_tokenizer, prompt_ids

    spec = inputs.student
    torch.manual_seed(0)
    dims = LlamaDims.from_config(spec.config)
    weights = load_weights(spec.transformer_dir / WEIGHTS_FILE, dims)
    if not spec.tokenizer_files():
        raise input_error(spec.transformer_dir, "tokenizer", "tokenizer files beside the decoder (tokenizer.json)", "none")
    tokenizer = load_tokenizer(spec.transformer_dir)
    if len(tokenizer) > dims.vocab:
        raise input_error(spec.transformer_dir, "tokenizer vocabulary", f"at most the model's vocab_size {dims.vocab}", len(tokenizer))
    samples = inputs.samples
    prompts = [prompt_ids(tokenizer, text, chat=samples.chat, source=f"{samples.source}: line {line}")
               for line, text in zip(samples.lines, samples.texts)]
    for line, prompt in zip(inputs.samples.lines, prompts):
        if len(prompt) + NEW_TOKENS > dims.max_positions:
            raise input_error(inputs.samples.source, f"line {line} (prompt tokens)",
                              f"at most {dims.max_positions - NEW_TOKENS} (max_position_embeddings {dims.max_positions} "
                              f"less the {NEW_TOKENS} tokens parity generates)", len(prompt))
    reference = load_reference(spec.transformer_dir)
    extra_heads = load_extra_heads(reference, weights, dims.extra_heads)
    lowbit, quantized = lowbit_reference(inputs, reference, weights)
    router, _, router_max, router_samples = load_router(inputs)
    return DecoderModels(dims, weights, reference, router, router_max, router_samples, prompts, eos_ids(spec.config), extra_heads,
                         lowbit, quantized)


def lowbit_reference(inputs: Any, reference: Any, weights: dict[str, np.ndarray]):
    """Binary / ternary Linears (declared in edgecompile.json or detected): the reference gets the rules of
    reference/lowbit.py (codes * alpha, activation quantizers), the graph's weights the same codes * alpha."""
    from edgecompile.reference.lowbit_plan import materialize, resolve_plan
    from edgecompile.reference.lowbit import QuantizedLinears

    plan = resolve_plan(inputs.student, inputs.lowbit_sidecar, reference)
    if plan.embedding is not None:
        raise input_error(inputs.lowbit_sidecar[0] if inputs.lowbit_sidecar else inputs.student.transformer_dir / "model.safetensors",
                          "word_embeddings", "fp32 embeddings for decoder students (low-bit embeddings are BERT-only)",
                          f"{plan.embedding.bits}-bit {plan.embedding.module}")
    if plan.empty:
        return plan, None
    materialize(reference, plan)
    modules = dict(reference.named_modules())
    for linear in plan.linears:
        weights[f"{linear.module}.weight"] = modules[linear.module].weight.detach().numpy().copy()
    return plan, QuantizedLinears(reference, {p.module: (p.activation, p.static_scale) for p in plan.linears})


def all_kept(masks: ClusterMasks) -> ClusterMasks:
    return ClusterMasks(-1, np.ones_like(masks.blocks), np.ones_like(masks.heads), np.ones_like(masks.neurons))


def compile_decoder_graphs(inputs: Any, models: DecoderModels,
                           progress: Progress) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(graphs: router, dense, cluster_<k>; manifest entries of dense and the clusters; the router's entry)"""
    from edgecompile.bundle.accounting import parameter_count
    from edgecompile.bundle.decoder_folders import kv_cache_entries
    from edgecompile.bundle.router_cost import router_entry
    from edgecompile.families.router import export_router
    from edgecompile.families.llama import LlamaStructure, export_decoder, kept_structure, macs_per_token
    from edgecompile.passes.pipeline import build_cluster_graph

    dims, masks = models.dims, inputs.masks
    with progress.step("writing the decoder graph and exporting the router (once)"):
        dense = export_decoder(models.weights, dims)
        router = export_router(models.router)
        progress.note(f"dense: {len(dense.graph)} nodes; router: {len(router.graph)} nodes")
    lowbit_modules = frozenset(p.module for p in models.lowbit.linears) if models.lowbit else frozenset()
    structure = LlamaStructure(dims.layers, dims.head_dim, lowbit_modules)  # their gates stay Muls: weights stay codes * alpha
    graphs = {"router": router, "dense": dense}
    entries = []
    dense_macs = None
    with progress.step(f"rewriting {masks.num_clusters} clusters"):
        for cluster in (all_kept(masks.clusters[0]),) + masks.clusters:
            name = "dense" if cluster.index < 0 else f"cluster_{cluster.index}"
            graph = dense if cluster.index < 0 else build_cluster_graph(dense, structure, cluster)
            graphs[name] = graph
            kept = kept_structure(dims, cluster.blocks, cluster.heads, cluster.neurons)
            macs = macs_per_token(dims, kept)
            dense_macs = dense_macs or macs
            entry = {
                "graph": name, "kept": kept, "kv_cache": kv_cache_entries((v.name, list(v.shape)) for v in graph.graph.inputs), "parameters": parameter_count(graph),
                "macs_per_token": macs, "macs_ratio_vs_dense": round(macs["linear"] / dense_macs["linear"], 4),
                "nodes": len(graph.graph),
            }
            if cluster.index >= 0:
                entry = {"id": cluster.index, "masks_given": list(cluster.given), **entry}
                progress.note(
                    f"{name}: {kept['attention_blocks_kept']}/{dims.layers} attention, {kept['ffn_blocks_kept']}/{dims.layers} "
                    f"FFN, {kept['heads_kept']} heads, {kept['kv_heads_kept']} KV heads, {kept['neurons_kept']} neurons; "
                    f"{macs['linear'] / 1e6:.2f} weight MMACs per decoded token ({entry['macs_ratio_vs_dense']:.0%} of dense)"
                )
            entries.append(entry)
    return graphs, entries, router_entry(inputs.router, masks, parameter_count(router), len(router.graph))


def reference_outputs(inputs: Any, models: DecoderModels, progress: Progress) -> dict[str, dict[str, list[np.ndarray]]]:
    """Per graph and prompt: prefill logits and greedy tokens of transformers' model with the cluster's gates."""
    from edgecompile.check.generation import reference_greedy
    from edgecompile.families.mtp import head_logits
    from edgecompile.families.llama import gated_linears
    from edgecompile.reference.evaluate import router_outputs
    from edgecompile.reference.masks import ModelGates

    masks = inputs.masks
    result: dict[str, dict[str, list[np.ndarray]]] = {}
    gates = ModelGates(gated_linears(models.reference), models.dims.head_dim)
    try:
        for cluster in (all_kept(masks.clusters[0]),) + masks.clusters:
            name = "dense" if cluster.index < 0 else f"cluster_{cluster.index}"
            progress.note(f"{name}: {len(models.prompts)} prompts, {NEW_TOKENS} greedy tokens each")
            gates.set(cluster)
            heads = ["logits"] + [f"logits_{j + 1}" for j in range(len(models.extra_heads))]
            outputs: dict[str, list[np.ndarray]] = {f"prefill_{head}": [] for head in heads}
            outputs.update(greedy_tokens=[], greedy_top_values=[], greedy_top_ids=[])
            for prompt in models.prompts:
                logits, generated, top_values, top_ids = reference_greedy(models.reference, prompt, NEW_TOKENS, models.eos)
                outputs["greedy_top_values"].append(top_values)
                outputs["greedy_top_ids"].append(top_ids)
                every_head = head_logits(models.reference, models.extra_heads, prompt) if models.extra_heads else [logits]
                for head, value in zip(heads, every_head):
                    outputs[f"prefill_{head}"].append(value)
                outputs["greedy_tokens"].append(np.array(generated, np.int64))
            result[name] = outputs
    finally:
        gates.remove()
    result["router"] = router_outputs(models.router, models.router_samples)
    return result


def build_decoder_target(target: Any, root: Path, graphs: dict[str, Any], models: DecoderModels, reference: dict[str, Any],
                         config: dict[str, Any], tokenizer_files: list[Path], threads: int, progress: Progress):
    """One target's folder: lower, write (router + onnxruntime-genai folder), placement, parity."""
    from edgecompile.bundle.decoder_folders import write_decoder_folder
    from edgecompile.bundle.layout import genai_folder, genai_overlay, graph_file
    from edgecompile.bundle.store import graph_signature
    from edgecompile.check.decoder_parity import check_decoder_target
    from edgecompile.lowering.steps import GraphLowBit, lower_for_target
    from edgecompile.lowering.target_build import TargetOutcome, _public, check_runtime_floor, placement_of
    from edgecompile.lowering.targets import target_to_dict

    folder = root / target.name
    with progress.step(f"lowering graphs for target '{target.name}' ({', '.join(target.steps) or 'no steps'})"):
        lowered, lowering = lower_for_target(graphs, target, GraphLowBit.from_plan(models.lowbit, prefix="") if models.lowbit else None)
    lowbit_graphs = sorted(n for n, r in lowering.items() if r.get("lowbit", {}).get("linear_groups"))
    runtime = check_runtime_floor(target, lowered)
    with progress.step(f"writing the router and the onnxruntime-genai folder for target '{target.name}'"):
        needs = write_decoder_folder(folder, lowered, tokenizer_files, config)
    files = {name: graph_file(target.name, name, decoder=True) for name in lowered}
    paths = {name: root / file for name, file in files.items()}
    with progress.step(f"placement on '{target.name}' ({target.placement_checker})"):
        placements = [placement_of(paths[name], target, name) for name in lowered]
    with progress.step(f"parity on '{target.name}' (prefill logits; greedy tokens via onnxruntime and onnxruntime-genai)"):
        speculation: dict[str, dict[str, float]] = {}
        result = check_decoder_target(target, paths, root / genai_folder(target.name), reference, models.prompts, models.router_samples,
                                      models.eos, NEW_TOKENS, threads, progress=lambda graph: progress.note(f"running {graph}"),
                                      speculation=speculation, lowbit_graphs=frozenset(lowbit_graphs))
        for graph, stats in speculation.items():
            progress.note(f"{graph}: speculative decoding on the parity prompts: acceptance {stats['acceptance_rate']:.2f}, "
                          f"{stats['tokens_per_pass']:.2f} tokens per forward pass")
    entry = {
        "provider": target.provider,
        "parity_executed_on": f"{target.provider}, executed on this machine (onnxruntime and onnxruntime-genai)",
        "precision": target.precision, "dynamic_shapes": True, "format": "onnx", "shared_weights": True,
        "definition": target.source.name, "target": target_to_dict(target),
        **runtime,
        "genai_folder": genai_folder(target.name),
        "graphs": {name: {"file": files[name], **({} if name == "router" else {"genai_overlay": genai_overlay(name)}),
                          **graph_signature(model)} for name, model in lowered.items()},
        "placement": {p.graph: p.to_dict() for p in placements},
        "lowbit_graphs": lowbit_graphs,
        "lowering": {name: _public(report) for name, report in lowering.items()},
        **({"speculative_on_parity_prompts": speculation} if speculation else {}),
    }
    return TargetOutcome(entry, result, needs)


def build_decoder(request: Any, inputs: Any, progress: Progress):
    from edgecompile.build import publish
    from edgecompile.bundle.decoder_folders import genai_config
    from edgecompile.bundle.manifest import build_decoder_manifest, decoder_student

    spec = inputs.student
    check_targets(inputs.targets)
    with progress.step("loading the decoder, the router and tokenizers"):
        models = load_decoder_models(inputs)
    graphs, entries, router = compile_decoder_graphs(inputs, models, progress)
    with progress.step("PyTorch reference: prefill logits and greedy tokens"):
        reference = reference_outputs(inputs, models, progress)
    student = decoder_student(spec, models.dims, models.eos)  # the manifest's, and all genai_config.json is made from
    config = genai_config(student)

    def build_one(target, root: Path):
        return build_decoder_target(target, root, graphs, models, reference, config, list(spec.tokenizer_files()),
                                    request.threads, progress)

    def manifest_of(target_entries, graph_bytes, files, tokenizers, reference_files):
        return build_decoder_manifest(inputs, models, entries, router, target_entries, graph_bytes, files, tokenizers,
                                      reference_files, NEW_TOKENS, student)

    return publish(request, inputs, progress, build_one, reference, spec.tokenizer_files(), manifest_of)
