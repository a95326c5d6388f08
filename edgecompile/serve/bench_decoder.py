"""`edgecompile bench` for decoder bundles: prefill ms and decode ms per token of every graph, beside dense.

Each graph decodes the same prompt greedily with onnxruntime (runtime/decode.py, the loop `run`
uses), round-robin (one generation of each graph per round) so a noisy machine's drifts hit every
graph alike; medians over rounds. Graphs with multi-token-prediction heads also decode
speculatively (runtime/speculative.py): their row gives decode ms per generated token and the speed-up
against their own plain greedy decoding in the same rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecompile.bundle.store import Bundle
from edgecompile.errors import input_error
from edgecompile.lowering.targets import target_from_dict
from edgecompile.runtime.decode import greedy
from edgecompile.runtime.sessions import bundle_session
from edgecompile.runtime.speculative import extra_head_outputs, speculative_greedy


@dataclass
class DecoderBenchRow:
    graph: str
    prefill_ms: float
    decode_ms_per_token: float
    decode_speedup_vs_dense: float | None
    macs_ratio: float | None
    speculative_ms_per_token: float | None = None
    speculative_speedup: float | None = None  # vs this graph's plain greedy decoding
    acceptance_rate: float | None = None
    tokens_per_pass: float | None = None


def bench_decoder_bundle(bundle: Bundle, target_name: str | None = None, *, prompt_tokens: int = 64, new_tokens: int = 64,
                         threads: int = 1, runs: int = 5, warmup: int = 1, seed: int = 0) -> list[DecoderBenchRow]:
    entry = bundle.target(target_name)
    target = target_from_dict(entry["target"])
    student = bundle.manifest["student"]
    if prompt_tokens + new_tokens > student["max_seq_length"]:
        raise input_error("--prompt-tokens / --new-tokens", "prompt plus new tokens",
                          f"at most the model's {student['max_seq_length']} positions", prompt_tokens + new_tokens)
    rng = np.random.default_rng(seed)
    prompt = [int(t) for t in rng.integers(3, student["vocab_size"], size=prompt_tokens)]
    names = [g for g in entry["graphs"] if g != "router"]
    sessions = {name: bundle_session(bundle, entry, name, target, threads) for name in names}
    speculative = {name for name, s in sessions.items() if extra_head_outputs(s)}
    prefill: dict[str, list[float]] = {n: [] for n in names}
    decode: dict[str, list[float]] = {n: [] for n in names}
    spec_decode: dict[str, list[float]] = {n: [] for n in speculative}
    spec_stats: dict[str, tuple[float, float]] = {}
    for round_ in range(warmup + runs):
        for name in names:
            plain = greedy(sessions[name], prompt, new_tokens)  # no end-of-sequence stop: a fixed token budget
            if round_ >= warmup:
                prefill[name].append(plain.prefill_ms)
                decode[name].append(float(np.sum(plain.decode_ms)) / max(len(plain.decode_ms), 1))
            if name in speculative:
                fast = speculative_greedy(sessions[name], prompt, new_tokens)
                if round_ >= warmup:
                    spec_decode[name].append(float(np.sum(fast.step_ms)) / max(len(fast.tokens) - 1, 1))
                    spec_stats[name] = (fast.acceptance_rate, fast.tokens_per_pass)
    macs = {c["graph"]: c["macs_ratio_vs_dense"] for c in bundle.manifest["clusters"]}
    macs["dense"] = 1.0
    dense = float(np.median(decode["dense"])) if "dense" in decode else None
    rows = []
    for name in names:
        per_token = float(np.median(decode[name]))
        row = DecoderBenchRow(name, float(np.median(prefill[name])), per_token, dense / per_token if dense else None, macs.get(name))
        if name in speculative:
            fast = float(np.median(spec_decode[name]))
            row.speculative_ms_per_token, row.speculative_speedup = fast, per_token / fast
            row.acceptance_rate, row.tokens_per_pass = spec_stats[name]
        rows.append(row)
    return rows


def decoder_bench_table(rows: list[DecoderBenchRow], prompt_tokens: int, new_tokens: int, threads: int, target: str) -> str:
    lines = [
        f"target {target}: onnxruntime, {threads} thread(s); prompt {prompt_tokens} tokens, {new_tokens} new tokens, "
        "greedy; medians over round-robin rounds; speed-up = dense decode ms/token / graph's",
        "| graph | prefill ms | decode ms/token | decode speed-up vs dense | MACs ratio | speculative ms/token | "
        "speculative speed-up | acceptance | tokens/pass |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if any(r.acceptance_rate is not None for r in rows):  # speed does not depend on the tokens; acceptance does
        lines.insert(1, f"the prompt is {prompt_tokens} random token ids: speed is what it is on real text, acceptance is not "
                        "(measure it on your prompts: edgecompile run BUNDLE --prompt ... --speculative)")

    def fmt(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| {r.graph} | {r.prefill_ms:.2f} | {r.decode_ms_per_token:.3f} | {fmt(r.decode_speedup_vs_dense, '.3f')} | "
                     f"{fmt(r.macs_ratio, '.3f')} | {fmt(r.speculative_ms_per_token, '.3f')} | {fmt(r.speculative_speedup, '.2f')} | "
                     f"{fmt(r.acceptance_rate, '.2f')} | {fmt(r.tokens_per_pass, '.2f')} |")
    return "\n".join(lines)
