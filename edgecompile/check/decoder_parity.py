"""Parity of a decoder target folder, on exactly the files that ship (used by `build` and `verify`).

Per graph and prompt: prefill logits of every head against the PyTorch reference (the target's
tolerances), and greedy tokens through `edgecompile run`'s onnxruntime loop and through
onnxruntime-genai loading the folder, which must be identical to the reference's; graphs with
multi-token-prediction heads also decode speculatively, which must give the same tokens. The router is checked as for encoders, and the
end-to-end row decodes each prompt with the cluster the ONNX router picked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgecompile.check.generation import compare_tokens, first_difference
from edgecompile.runtime.genai import genai_greedy, genai_model
from edgecompile.check.parity import TargetParity, compare, compare_router, is_near_tie, run_graph, tolerances
from edgecompile.runtime.decode import empty_cache, greedy
from edgecompile.runtime.sessions import create_session
from edgecompile.runtime.speculative import extra_head_outputs, speculative_greedy


@dataclass(frozen=True)
class DecoderFiles:
    """One decoder target's files as they ship: each graph's file (bundle/layout.py), the onnxruntime-genai folder,
    and the graphs whose activations are quantized (checked with the low-bit contract)."""

    paths: dict[str, Path]
    genai_folder: Path
    lowbit_graphs: frozenset[str] = frozenset()
    quantized_graphs: frozenset[str] = frozenset()  # block-quantized weights: their own tolerances, near-ties allowed

    def contract(self, graph: str) -> str:
        return "quantized" if graph in self.quantized_graphs else "lowbit" if graph in self.lowbit_graphs else "exact"


@dataclass(frozen=True)
class DecoderSamples:
    """What decoder parity runs on and compares with, at build time and in `verify` alike."""

    reference: dict[str, Any]  # graph -> output -> one array per prompt (build_decoder's reference_outputs)
    prompts: list[list[int]]
    router_samples: list
    eos: frozenset[int]
    new_tokens: int
    threads: int = 0


def check_decoder_target(target: Any, files: DecoderFiles, samples: DecoderSamples, progress=None,
                         speculation: dict[str, dict[str, float]] | None = None) -> TargetParity:
    """Parity of one decoder target folder, on exactly the files that ship.

    `speculation`, when given, receives per graph with extra heads its acceptance rate and tokens per pass.
    """
    paths, genai_folder = files.paths, files.genai_folder
    reference, prompts, router_samples = samples.reference, samples.prompts, samples.router_samples
    eos, new_tokens, threads = samples.eos, samples.new_tokens, samples.threads
    graphs = list(paths)
    rows = []
    tokens_ort: dict[str, list[list[int]]] = {}
    cluster_ties: dict[str, list[bool]] = {}
    for graph in graphs:
        if progress:
            progress(graph)
        if graph == "router":
            onnx_router = run_graph(paths["router"], target, router_samples, threads)
            rows += compare_router(target, reference["router"], onnx_router)
            continue
        session = create_session(paths[graph], target, threads)
        heads = ["logits"] + extra_head_outputs(session)
        if files.contract(graph) == "quantized":  # the lowering itself is exact: its float-activation twin shows it
            twin = prefill_logits(exact_activation_twin(paths[graph], target, threads), heads, prompts)
            rows += [compare(target, graph, f"prefill_{head} (weights exact: accuracy level 0)",
                             *last_positions(twin[head], reference[graph]["prefill_" + head])) for head in heads]
        prefill = prefill_logits(session, heads, prompts)
        for head in heads:
            output = "prefill_" + head
            rows.append(compare(target, graph, output, *last_positions(prefill[head], reference[graph][output]),
                                files.contract(graph)))
        refs = [list(map(int, t)) for t in reference[graph]["greedy_tokens"]]
        lowbit = files.contract(graph) != "exact"
        tie_tolerance = tolerances(target, files.contract(graph))[0]
        runs = [greedy(session, p, new_tokens, eos, keep_logits=lowbit) for p in prompts]
        tokens_ort[graph] = [r.tokens for r in runs]
        ties = None
        if lowbit:  # quantized activations: a divergence must be a near-tie of the contract (check/generation.py)
            ties = []
            for s, (ref, run) in enumerate(zip(refs, runs)):
                step = first_difference(ref, run.tokens)
                ties.append(step < min(len(ref), len(run.tokens)) and is_near_tie(
                    run.step_logits[step], reference[graph]["greedy_top_values"][s][step].astype(np.float64),
                    reference[graph]["greedy_top_ids"][s][step], run.tokens[step], tie_tolerance))
        rows.append(compare_tokens(target.name, graph, "onnxruntime", refs, tokens_ort[graph], ties))
        cluster_ties[graph] = ties or [False] * len(prompts)
        if len(heads) > 1:  # exact against this graph's own greedy tokens (which match the reference above)
            runs = [speculative_greedy(session, p, new_tokens, eos) for p in prompts]
            rows.append(compare_tokens(target.name, graph, "speculative, onnxruntime", tokens_ort[graph], [r.tokens for r in runs]))
            if speculation is not None:
                drafted = sum(r.drafted for r in runs)
                passes = sum(r.forward_passes - 1 for r in runs)
                speculation[graph] = {
                    "acceptance_rate": round(sum(r.accepted for r in runs) / drafted, 4) if drafted else 0.0,
                    "tokens_per_pass": round(sum(len(r.tokens) - 1 for r in runs) / passes, 4) if passes else 0.0,
                }
        model = genai_model(genai_folder, graph)
        genai = [genai_greedy(model, p, new_tokens) for p in prompts]
        if lowbit:  # the same graph in two runtimes: identical to edgecompile run's tokens, strictly
            rows.append(compare_tokens(target.name, graph, "onnxruntime-genai vs onnxruntime", tokens_ort[graph], genai))
        else:
            rows.append(compare_tokens(target.name, graph, "onnxruntime-genai", refs, genai))
    if "router" in graphs:
        picked_ref = [int(x.reshape(-1)[0]) for x in reference["router"]["cluster_id"]]
        picked = [int(x.reshape(-1)[0]) for x in onnx_router["cluster_id"]]
        refs = [list(map(int, reference[f"cluster_{k}"]["greedy_tokens"][s])) for s, k in enumerate(picked_ref)]
        gots = [tokens_ort[f"cluster_{k}"][s] for s, k in enumerate(picked)]
        same_cluster = [k == j for k, j in zip(picked_ref, picked)]
        ties = [same and cluster_ties[f"cluster_{k}"][s] for s, (k, same) in enumerate(zip(picked, same_cluster))]
        rows.append(compare_tokens(target.name, "end-to-end", "routed, onnxruntime", refs, gots, ties))
    return TargetParity(target.name, rows)


def prefill_logits(session: Any, heads: list[str], prompts: list[list[int]]) -> dict[str, list[np.ndarray]]:
    """Every head's logits over each whole prompt, in one forward pass from an empty KV cache."""
    prefill: dict[str, list[np.ndarray]] = {head: [] for head in heads}
    for prompt in prompts:
        ids = np.array([prompt], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), **empty_cache(session)}
        for head, value in zip(heads, session.run(heads, feed)):
            prefill[head].append(value[0])
    return prefill


def exact_activation_twin(path: Path, target: Any, threads: int) -> Any:
    """The graph at `path` with every MatMulNBits at accuracy level 0 (float activations), in memory: what its weights
    compute exactly, before the shipped kernels quantize activations per block."""
    import onnx
    import onnxruntime as ort

    from edgecompile.errors import GraphLoadError, one_line
    from edgecompile.runtime.sessions import configure, session_options

    model = onnx.load(str(path))  # external data beside it, read into memory: nothing is written
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 0
    options = session_options(threads)
    exact = replace(target, linear_weights=replace(target.linear_weights, lut_gemm=False))  # the lookup table quantizes too
    providers = configure(options, exact, strict=False)
    try:
        return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
    except Exception as exc:
        raise GraphLoadError(f"{path}: onnxruntime could not load its accuracy-level-0 twin ({one_line(exc)})") from None


def last_positions(logits: list[np.ndarray], reference: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(reference, graph) logits of each prompt at the positions both hold: every one at build time, the last in a bundle
    (reference/outputs.safetensors keeps the last position's: the whole prompt's would outweigh the graphs), and the
    last for extra heads, whose graphs compute their logits at one position."""
    pairs = [(ref[-min(len(ref), len(got)):], got[-min(len(ref), len(got)):]) for got, ref in zip(logits, reference)]
    return [r for r, _ in pairs], [g for _, g in pairs]
