"""The decoder pipeline (every `DecoderFamily`: Llama, Qwen2, Qwen3, Gemma 3): the same guarantees and stages as
encoders (validate, load, write the dense graph once, rewrite one graph per cluster, build the router, prove
parity, stage, commit). What differs is what parity means for a language model: per cluster and sample
prompt, the prefill logits within the target's tolerance of transformers' own model with the same masks, and
greedy generation of `NEW_TOKENS` tokens identical to PyTorch's greedy loop, both through `edgecompile run`'s
onnxruntime loop and through onnxruntime-genai loading the shipped folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompile.build.encoder import all_kept
from edgecompile.build.request import BuildRequest, ValidatedInputs
from edgecompile.build.router import LoadedRouter, load_router
from edgecompile.build.targets import TargetOutcome
from edgecompile.errors import InputError, input_error
from edgecompile.families import family_of
from edgecompile.lowering.targets import Target
from edgecompile.progress import Progress

NEW_TOKENS = 32  # greedy tokens per prompt the parity gate generates


@dataclass
class DecoderModels:
    family: Any  # families.decoder.DecoderFamily subclass
    dims: Any  # families.decoder.DecoderDims
    weights: dict[str, np.ndarray]
    reference: Any  # transformers' causal LM of the family
    router: LoadedRouter
    prompts: list[list[int]]
    eos: frozenset[int]
    extra_heads: list  # multi-token prediction: transformers decoder layers of the extra heads
    lowbit: Any = None  # inputs.lowbit.LowBitPlan
    quantized: Any = None  # reference.lowbit.QuantizedLinears installed on `reference` (activation quantizers)


def check_targets(targets: tuple[Target, ...]) -> None:
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


def load_decoder_models(inputs: ValidatedInputs) -> DecoderModels:
    import torch

    from edgecompile.families.mtp import load_extra_heads
    from edgecompile.inputs.student import WEIGHTS_FILE
    from edgecompile.inputs.tokens import load_tokenizer, prompt_ids

    spec = inputs.student
    family = family_of(spec)
    torch.manual_seed(0)
    dims = family.dims(spec.config)
    weights = family.load_weights(spec.transformer_dir / WEIGHTS_FILE, dims)
    if not spec.tokenizer_files():
        raise input_error(spec.transformer_dir, "tokenizer", "tokenizer files beside the decoder (tokenizer.json)", "none")
    tokenizer = load_tokenizer(spec.transformer_dir)
    if len(tokenizer) > dims.vocab:
        raise input_error(spec.transformer_dir, "tokenizer vocabulary", f"at most the model's vocab_size {dims.vocab}", len(tokenizer))
    samples = inputs.samples
    prompts = [prompt_ids(tokenizer, text, chat=samples.chat, source=f"{samples.source}: line {line}")
               for line, text in zip(samples.lines, samples.texts)]
    for line, prompt in zip(samples.lines, prompts):
        if len(prompt) + NEW_TOKENS > dims.max_positions:
            raise input_error(samples.source, f"line {line} (prompt tokens)",
                              f"at most {dims.max_positions - NEW_TOKENS} (max_position_embeddings {dims.max_positions} "
                              f"less the {NEW_TOKENS} tokens parity generates)", len(prompt))
    reference = family.load_reference(spec.transformer_dir)
    extra_heads = load_extra_heads(family, reference, weights, dims.extra_heads)
    lowbit, quantized = lowbit_reference(inputs, reference, weights)
    return DecoderModels(family, dims, weights, reference, load_router(inputs), prompts, eos_ids(spec.config), extra_heads,
                         lowbit, quantized)


def lowbit_reference(inputs: ValidatedInputs, reference: Any, weights: dict[str, np.ndarray]):
    """Binary / ternary Linears (declared in edgecompile.json or detected): the reference gets the rules of
    reference/lowbit.py (codes * alpha, activation quantizers), the graph's weights the same codes * alpha."""
    from edgecompile.reference.lowbit import QuantizedLinears
    from edgecompile.reference.lowbit_plan import materialize, resolve_plan

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


def compile_decoder_graphs(inputs: ValidatedInputs, models: DecoderModels,
                           progress: Progress) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(graphs: router, dense, cluster_<k>; manifest entries of dense and the clusters; the router's entry)"""
    from edgecompile.bundle.accounting import parameter_count
    from edgecompile.bundle.decoder_folders import kv_cache_entries
    from edgecompile.bundle.router_cost import router_entry
    from edgecompile.families.router import export_router
    from edgecompile.passes.pipeline import build_cluster_graph

    family, dims, masks = models.family, models.dims, inputs.masks
    with progress.step("writing the decoder graph and exporting the router (once)"):
        dense = family.export(models.weights, dims)
        router = export_router(models.router.module)
        progress.note(f"dense: {len(dense.graph)} nodes; router: {len(router.graph)} nodes")
    lowbit_modules = frozenset(p.module for p in models.lowbit.linears) if models.lowbit else frozenset()
    structure = family.structure(dims, lowbit_modules)  # low-bit Linears' gates stay Muls: weights stay codes * alpha
    graphs = {"router": router, "dense": dense}
    entries = []
    dense_macs = None
    with progress.step(f"rewriting {masks.num_clusters} clusters"):
        for cluster in (all_kept(masks.clusters[0]),) + masks.clusters:
            name = "dense" if cluster.index < 0 else f"cluster_{cluster.index}"
            graph = dense if cluster.index < 0 else build_cluster_graph(dense, structure, cluster)
            graphs[name] = graph
            kept = family.kept_structure(dims, cluster.blocks, cluster.heads, cluster.neurons)
            macs = family.macs_per_token(dims, kept)
            dense_macs = dense_macs or macs
            entry = {
                "graph": name, "kept": kept, "kv_cache": kv_cache_entries((v.name, list(v.shape)) for v in graph.graph.inputs),
                "parameters": parameter_count(graph), "macs_per_token": macs,
                "macs_ratio_vs_dense": round(macs["linear"] / dense_macs["linear"], 4), "nodes": len(graph.graph),
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


def graph_outputs(model: Any, extra_heads: list, prompts: list[list[int]], eos: frozenset[int]) -> dict[str, list[np.ndarray]]:
    """One graph's reference (transformers' model with the gates as set): per prompt, every head's prefill logits,
    and greedy tokens with the top logits of each step (to judge near-ties of quantized graphs)."""
    from edgecompile.check.generation import reference_greedy
    from edgecompile.families.mtp import head_logits

    heads = ["logits"] + [f"logits_{j + 1}" for j in range(len(extra_heads))]
    outputs: dict[str, list[np.ndarray]] = {f"prefill_{head}": [] for head in heads}
    outputs.update(greedy_tokens=[], greedy_top_values=[], greedy_top_ids=[])
    for prompt in prompts:
        logits, generated, top_values, top_ids = reference_greedy(model, prompt, NEW_TOKENS, eos)
        outputs["greedy_top_values"].append(top_values)
        outputs["greedy_top_ids"].append(top_ids)
        every_head = head_logits(model, extra_heads, prompt) if extra_heads else [logits]
        for head, value in zip(heads, every_head):
            outputs[f"prefill_{head}"].append(value)
        outputs["greedy_tokens"].append(np.array(generated, np.int64))
    return outputs


def clusters_by_graph(inputs: ValidatedInputs) -> dict[str, Any]:
    """graph name -> its masks, dense first (keeping everything)."""
    masks = inputs.masks
    return {"dense": all_kept(masks.clusters[0]), **{f"cluster_{c.index}": c for c in masks.clusters}}


def reference_outputs(inputs: ValidatedInputs, models: DecoderModels, progress: Progress) -> dict[str, dict[str, list[np.ndarray]]]:
    """Per graph and prompt: prefill logits and greedy tokens of transformers' model with the cluster's gates."""
    from edgecompile.reference.evaluate import router_outputs

    result: dict[str, dict[str, list[np.ndarray]]] = {}
    gates = models.family.gates(models.reference, models.dims)
    try:
        for name, cluster in clusters_by_graph(inputs).items():
            progress.note(f"{name}: {len(models.prompts)} prompts, {NEW_TOKENS} greedy tokens each")
            gates.set(cluster)
            result[name] = graph_outputs(models.reference, models.extra_heads, models.prompts, models.eos)
    finally:
        gates.remove()
    result["router"] = router_outputs(models.router.module, models.router.samples)
    return result


def set_linear_weights(model: Any, tensors: dict[str, np.ndarray]) -> None:
    """Write Hugging Face named weights into `model` in place (through the gate wrappers reference/masks.py installs)."""
    import torch

    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, array in tensors.items():
            path = name.removesuffix(".weight")
            module = modules.get(path) or modules[f"{path}.linear"]  # GatedLinear keeps the Linear as .linear
            module = getattr(module, "linear", module)
            module.weight.copy_(torch.from_numpy(array))


def quantized_reference(inputs: ValidatedInputs, models: DecoderModels, lowered: dict[str, Any],
                        progress: Progress) -> dict[str, dict[str, list[np.ndarray]]]:
    """The reference of graphs whose weights a target quantized: transformers' model with the weights each graph reads
    (dequantized, families/decoder.py `reference_weights`) under the cluster's gates, without activation quantizers
    (the kernels quantize activations themselves, per block: that is the contract's tolerance)."""
    from edgecompile.families.mtp import load_extra_heads
    from edgecompile.passes.quantize_weights import graph_weights
    from edgecompile.reference.lowbit_plan import materialize

    family, dims = models.family, models.dims
    model = family.load_reference(inputs.student.transformer_dir)
    if models.lowbit and not models.lowbit.empty:
        materialize(model, models.lowbit)  # binary / ternary weights as codes * alpha, as the graphs hold them
    gates = family.gates(model, dims)
    result = {}
    try:
        for name, cluster in clusters_by_graph(inputs).items():
            progress.note(f"{name}: the reference with the graph's dequantized weights")
            unfolded = frozenset(p.module for p in models.lowbit.linears) if models.lowbit else frozenset()
            tensors = family.reference_weights(dims, models.weights, graph_weights(lowered[name]),
                                               None if name == "dense" else cluster, unfolded)
            set_linear_weights(model, {k: v for k, v in tensors.items() if not k.startswith("extra_heads.")})
            gates.set(cluster)
            extra = load_extra_heads(family, model, {**models.weights, **tensors}, dims.extra_heads)
            result[name] = graph_outputs(model, extra, models.prompts, models.eos)
    finally:
        gates.remove()
    return result


def quantization_cost(dense: Any, fp32_model: Any, prompts: list[list[int]], fp32_tokens: list[np.ndarray]) -> dict[str, float]:
    """What quantizing costs, on the samples: perplexity of the fp32 model's own greedy continuations under it and under
    the quantized dense graph (onnxruntime), and the share of the graph's greedy tokens equal to the fp32 model's."""
    import torch

    from edgecompile.runtime.decode import empty_cache, greedy

    losses = {"fp32": [], "quantized": []}
    agree = total = 0
    for prompt, tokens in zip(prompts, fp32_tokens):
        sequence = list(prompt) + [int(t) for t in tokens]
        targets = np.array(sequence[len(prompt):])
        ids = np.array([sequence], np.int64)
        onnx = dense.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **empty_cache(dense)})[0][0]
        with torch.no_grad():
            reference = fp32_model(torch.from_numpy(ids)).logits[0].numpy()
        for key, logits in (("fp32", reference), ("quantized", onnx)):
            scores = logits[len(prompt) - 1:-1].astype(np.float64)
            scores -= scores.max(axis=-1, keepdims=True)
            log_probs = scores - np.log(np.exp(scores).sum(axis=-1, keepdims=True))
            losses[key] += list(-log_probs[np.arange(targets.size), targets])
        got = greedy(dense, prompt, len(tokens)).tokens
        agree += sum(int(a == b) for a, b in zip(got, tokens))
        total += len(tokens)
    return {"perplexity_fp32": round(float(np.exp(np.mean(losses["fp32"]))), 4),
            "perplexity_quantized": round(float(np.exp(np.mean(losses["quantized"]))), 4),
            "greedy_token_agreement": round(agree / total, 4) if total else 1.0,
            "on": f"{len(prompts)} sample prompts, the fp32 model's {NEW_TOKENS} greedy tokens each"}


class DecoderPipeline:
    """Stages 2-4 for decoders; `publish` runs `build_target` per target and `manifest` at the end."""

    def __init__(self, request: BuildRequest, inputs: ValidatedInputs, progress: Progress) -> None:
        self.request, self.inputs, self.progress = request, inputs, progress

    def prepare(self) -> None:
        from edgecompile.bundle.manifest import decoder_student

        inputs, progress = self.inputs, self.progress
        check_targets(inputs.targets)
        with progress.step("loading the decoder, the router and tokenizers"):
            self.models = models = load_decoder_models(inputs)
        self.graphs, self.entries, self.router_entry = compile_decoder_graphs(inputs, models, progress)
        with progress.step("PyTorch reference: prefill logits and greedy tokens"):
            self.reference = reference_outputs(inputs, models, progress)
        # the manifest's student section, from which all of genai_config.json is made (and regenerated by verify)
        self.student = decoder_student(inputs.student, models.family, models.dims, models.eos)
        self.student_tokenizer_files = inputs.student.tokenizer_files()

    @property
    def stored_reference(self) -> dict[str, Any]:
        """The reference for `verify`: prefill logits at each prompt's last position only (a whole prompt's logits over a
        vocabulary of 50-260k weigh more than the graphs), greedy tokens and their top logits whole."""
        return {graph: {output: [a[-1:] for a in arrays] if output.startswith("prefill_") else arrays
                        for output, arrays in outputs.items()} for graph, outputs in self.reference.items()}

    def build_target(self, target: Target, root: Path) -> TargetOutcome:
        """One target's folder: lower, write (router + onnxruntime-genai folder), placement, parity."""
        from edgecompile.build.targets import check_runtime_floor, placement_of, public_report
        from edgecompile.bundle.decoder_folders import genai_config, write_decoder_folder
        from edgecompile.bundle.layout import genai_folder, genai_overlay, graph_file
        from edgecompile.bundle.store import graph_signature
        from edgecompile.check.decoder_parity import DecoderFiles, DecoderSamples, check_decoder_target
        from edgecompile.lowering.steps import GraphLowBit, lower_for_target
        from edgecompile.lowering.targets import target_to_dict

        models, progress = self.models, self.progress
        folder = root / target.name
        with progress.step(f"lowering graphs for target '{target.name}' ({', '.join(target.steps) or 'no steps'})"):
            lowbit = GraphLowBit.from_plan(models.lowbit, models.family.graph_prefix) if models.lowbit else None
            lowered, lowering = lower_for_target(self.graphs, target, lowbit)
        lowbit_graphs = sorted(n for n, r in lowering.items() if r.get("lowbit", {}).get("linear_groups"))
        quantized = sorted(n for n, r in lowering.items() if r.get("weights", {}).get("quantized") or r.get("weights", {}).get("exact_2bit"))
        reference, cost = self.reference, None
        if quantized:
            tag = target.linear_weights.tag
            if f"dense~{tag}" not in self.reference:  # once per weight format: targets sharing one share the reference
                with progress.step(f"PyTorch reference with the dequantized weights of '{target.name}' ({tag})"):
                    for name, outputs in quantized_reference(self.inputs, models, lowered, progress).items():
                        self.reference[f"{name}~{tag}"] = outputs
            reference = {**self.reference, **{name: self.reference[f"{name}~{tag}"] for name in lowered if name != "router"}}
        runtime = check_runtime_floor(target, lowered)
        with progress.step(f"writing the router and the onnxruntime-genai folder for target '{target.name}'"):
            config = genai_config(self.student, target.linear_weights.session_config())
            needs = write_decoder_folder(folder, lowered, list(self.student_tokenizer_files), config)
        files = {name: graph_file(target.name, name, decoder=True) for name in lowered}
        paths = {name: root / file for name, file in files.items()}
        with progress.step(f"placement on '{target.name}' ({target.placement_checker})"):
            placements = [placement_of(paths[name], target, name) for name in lowered]
        with progress.step(f"parity on '{target.name}' (prefill logits; greedy tokens via onnxruntime and onnxruntime-genai)"):
            speculation: dict[str, dict[str, float]] = {}
            result = check_decoder_target(
                target, DecoderFiles(paths, root / genai_folder(target.name), frozenset(lowbit_graphs), frozenset(quantized)),
                DecoderSamples(reference, models.prompts, models.router.samples, models.eos, NEW_TOKENS, self.request.threads),
                progress=lambda graph: progress.note(f"running {graph}"), speculation=speculation)
            for graph, stats in speculation.items():
                progress.note(f"{graph}: speculative decoding on the parity prompts: acceptance {stats['acceptance_rate']:.2f}, "
                              f"{stats['tokens_per_pass']:.2f} tokens per forward pass")
        if quantized and "dense" in quantized:
            from edgecompile.runtime.sessions import create_session

            cost = quantization_cost(create_session(paths["dense"], target, self.request.threads), models.reference,
                                     models.prompts, self.reference["dense"]["greedy_tokens"])
            progress.note(f"what quantizing costs ({tag}, dense graph vs the fp32 model, {cost['on']}): perplexity "
                          f"{cost['perplexity_fp32']:.3f} -> {cost['perplexity_quantized']:.3f}, greedy tokens agreeing "
                          f"{cost['greedy_token_agreement']:.1%}")
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
            **({"quantized_graphs": quantized, "reference": f"~{tag}", "quantization_cost": cost} if quantized else {}),
            "lowering": {name: public_report(report) for name, report in lowering.items()},
            **({"speculative_on_parity_prompts": speculation} if speculation else {}),
        }
        return TargetOutcome(entry, result, needs)

    def manifest(self, written: Any) -> dict[str, Any]:
        from edgecompile.bundle.manifest import build_decoder_manifest

        return build_decoder_manifest(self.inputs, self.models, self.entries, self.router_entry, written, NEW_TOKENS, self.student)
