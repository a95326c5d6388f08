"""`edgecompile bench` for decoder bundles: prefill ms and decode ms per token of every graph, beside dense; and
for graphs with multi-token-prediction heads, speculative decoding on real prompts.

Speed: each graph decodes the same random prompt greedily with onnxruntime (runtime/decode.py, the loop `run`
uses), round-robin (one generation of each graph per round) so a noisy machine's drifts hit every graph alike;
medians over rounds.

Speculative decoding (runtime/speculative.py) only pays when the drafts are right, which depends on the text:
it is measured on the build's sample prompts (or `samples`), rendered as chat turns when the bundle's tokenizer has
a chat template, each generation stopping at end of sequence as `run` does. Per prompt and round, three loops run
back to back: greedy decoding of the same model WITHOUT its heads (runtime/without_heads.py: what the heads must
beat), greedy decoding of the graph with heads, and speculative decoding (its tokens must be the greedy ones).
Decode time of a loop = the sum of its decode passes; per round, summed over prompts; speed-ups are the median over
rounds of the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgecompile.bundle.store import Bundle
from edgecompile.errors import ParityError, input_error
from edgecompile.lowering.targets import target_from_dict
from edgecompile.runtime.decode import greedy
from edgecompile.runtime.sessions import bundle_session
from edgecompile.runtime.speculative import extra_head_outputs, speculative_greedy
from edgecompile.serve.bench_settings import BenchSettings


@dataclass
class DecoderBenchRow:
    graph: str
    prefill_ms: float
    decode_ms_per_token: float
    decode_speedup_vs_dense: float | None
    macs_ratio: float | None


@dataclass
class SpeculativeRow:
    graph: str
    prompts: int
    new_tokens: int  # generated over all prompts (one round)
    acceptance_rate: float  # accepted drafts / drafts
    head_acceptance: list[float | None]  # per extra head: confirmed / checked
    tokens_per_pass: float
    ms_per_token_without_heads: float
    ms_per_token_greedy: float
    ms_per_token_speculative: float
    speedup_vs_without_heads: float
    speedup_vs_greedy: float


@dataclass
class DecoderBenchReport:
    graphs: list[DecoderBenchRow]  # "graphs" in the JSON, as in the encoder report
    speculative: list[SpeculativeRow] = field(default_factory=list)
    prompt_source: str = ""
    chat: bool = False


def bench_decoder_bundle(bundle: Bundle, target_name: str | None = None,
                         settings: BenchSettings = BenchSettings(runs=5, warmup=1)) -> DecoderBenchReport:
    entry = bundle.target(target_name)
    target = target_from_dict(entry["target"])
    student = bundle.manifest["student"]
    prompt_tokens, new_tokens, threads = settings.prompt_tokens, settings.new_tokens, settings.threads
    if prompt_tokens + new_tokens > student["max_seq_length"]:
        raise input_error("--prompt-tokens / --new-tokens", "prompt plus new tokens",
                          f"at most the model's {student['max_seq_length']} positions", prompt_tokens + new_tokens)
    rng = np.random.default_rng(settings.seed)
    prompt = [int(t) for t in rng.integers(3, student["vocab_size"], size=prompt_tokens)]
    names = [g for g in entry["graphs"] if g != "router"]
    sessions = {name: bundle_session(bundle, entry, name, target, threads) for name in names}
    prefill: dict[str, list[float]] = {n: [] for n in names}
    decode: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(settings.warmup + settings.runs):
        for name in names:
            plain = greedy(sessions[name], prompt, new_tokens)  # no end-of-sequence stop: a fixed token budget
            if round_ >= settings.warmup:
                prefill[name].append(plain.prefill_ms)
                decode[name].append(float(np.sum(plain.decode_ms)) / max(len(plain.decode_ms), 1))
    macs = {c["graph"]: c["macs_ratio_vs_dense"] for c in bundle.manifest["clusters"]}
    macs["dense"] = 1.0
    dense = float(np.median(decode["dense"])) if "dense" in decode else None
    rows = []
    for name in names:
        per_token = float(np.median(decode[name]))
        rows.append(DecoderBenchRow(name, float(np.median(prefill[name])), per_token, dense / per_token if dense else None,
                                    macs.get(name)))
    report = DecoderBenchReport(rows)
    with_heads = [name for name in names if extra_head_outputs(sessions[name])]
    if with_heads:
        prompts, report.prompt_source, report.chat = _sample_prompts(bundle, settings, new_tokens)
        eos = frozenset(student.get("eos_token_ids", []))
        for name in with_heads:
            trunk = bundle_session(bundle, entry, name, target, threads, without_heads=True)
            report.speculative.append(_speculative_row(name, sessions[name], trunk, prompts, new_tokens, eos, settings))
    return report


def _sample_prompts(bundle: Bundle, settings: BenchSettings, new_tokens: int) -> tuple[list[list[int]], str, bool]:
    from edgecompile.check.verify import read_samples
    from edgecompile.inputs.samples import load_samples
    from edgecompile.inputs.tokens import prompt_ids

    if settings.samples is not None:
        texts, source = list(load_samples(settings.samples).texts), str(settings.samples)
    else:
        texts = read_samples(bundle)
        source = f"the build's {len(texts)} sample prompts"
    tokenizer = bundle.tokenizer("student")
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = [prompt_ids(tokenizer, text, chat=chat, source=source) for text in texts]
    limit = bundle.manifest["student"]["max_seq_length"]
    for number, ids in enumerate(prompts, 1):
        if not ids or len(ids) + new_tokens > limit:
            raise input_error(source, f"prompt {number}'s tokens (+ --new-tokens {new_tokens})",
                              f"between 1 and the model's {limit} positions", len(ids) + new_tokens)
    return prompts, source, chat


def _speculative_row(name: str, session, trunk, prompts: list[list[int]], new_tokens: int, eos: frozenset[int],
                     settings: BenchSettings) -> SpeculativeRow:
    times: dict[str, list[float]] = {"without_heads": [], "greedy": [], "speculative": []}
    checked = accepted_by = None
    drafted = accepted = passes = generated = 0
    for round_ in range(settings.warmup + settings.runs):
        spent = {key: 0.0 for key in times}
        checked, accepted_by = None, None
        drafted = accepted = passes = generated = 0
        for ids in prompts:
            base = greedy(trunk, ids, new_tokens, eos)
            plain = greedy(session, ids, new_tokens, eos)
            fast = speculative_greedy(session, ids, new_tokens, eos)
            if not base.tokens == plain.tokens == fast.tokens:
                raise ParityError(f"{name}: on a sample prompt speculative decoding gave {fast.tokens[:8]}..., greedy "
                                  f"{plain.tokens[:8]}..., greedy without heads {base.tokens[:8]}...; they must be identical")
            spent["without_heads"] += float(np.sum(base.decode_ms))
            spent["greedy"] += float(np.sum(plain.decode_ms))
            spent["speculative"] += float(np.sum(fast.step_ms))
            drafted, accepted = drafted + fast.drafted, accepted + fast.accepted
            passes, generated = passes + fast.forward_passes - 1, generated + len(fast.tokens) - 1
            checked = fast.checked_by_head if checked is None else [a + b for a, b in zip(checked, fast.checked_by_head)]
            accepted_by = fast.accepted_by_head if accepted_by is None else [a + b for a, b in zip(accepted_by, fast.accepted_by_head)]
        if round_ >= settings.warmup:
            for key in times:
                times[key].append(spent[key] / max(generated, 1))  # ms per decoded token
    median = {key: float(np.median(values)) for key, values in times.items()}
    ratio = {key: float(np.median(np.asarray(times[key]) / np.asarray(times["speculative"]))) for key in ("without_heads", "greedy")}
    return SpeculativeRow(
        name, len(prompts), generated + len(prompts), accepted / drafted if drafted else 0.0,
        [a / c if c else None for a, c in zip(accepted_by or [], checked or [])], generated / passes if passes else 0.0,
        median["without_heads"], median["greedy"], median["speculative"], ratio["without_heads"], ratio["greedy"])


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def decoder_bench_table(report: DecoderBenchReport, settings: BenchSettings, target: str) -> str:
    lines = [
        f"target {target}: onnxruntime, {settings.threads} thread(s); prompt {settings.prompt_tokens} random token ids, "
        f"{settings.new_tokens} new tokens, greedy; medians over round-robin rounds; speed-up = dense decode ms/token / graph's",
        "| graph | prefill ms | decode ms/token | decode speed-up vs dense | MACs ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report.graphs:
        lines.append(f"| {r.graph} | {r.prefill_ms:.2f} | {r.decode_ms_per_token:.3f} | {_fmt(r.decode_speedup_vs_dense, '.3f')} | "
                     f"{_fmt(r.macs_ratio, '.3f')} |")
    if report.speculative:
        heads = max(len(r.head_acceptance) for r in report.speculative)
        lines += [
            "",
            f"speculative decoding on {report.prompt_source}{' as chat turns' if report.chat else ''}, up to "
            f"{settings.new_tokens} new tokens each (end of sequence stops); tokens identical to greedy (checked); "
            "ms per decoded token; speed-up = the loop's time / speculative time, median over rounds",
            "| graph | tokens | acceptance | " + " | ".join(f"head {j + 1} acceptance" for j in range(heads)) +
            " | tokens/pass | greedy without heads | greedy with heads | speculative | speed-up vs greedy without heads | "
            "vs greedy with heads |",
            "|---|---:|---:|" + "---:|" * heads + "---:|---:|---:|---:|---:|---:|",
        ]
        for s in report.speculative:
            per_head = [_fmt(a, ".2f") for a in s.head_acceptance] + ["—"] * (heads - len(s.head_acceptance))
            lines.append(f"| {s.graph} | {s.new_tokens} | {s.acceptance_rate:.2f} | " + " | ".join(per_head) +
                         f" | {s.tokens_per_pass:.2f} | {s.ms_per_token_without_heads:.3f} | {s.ms_per_token_greedy:.3f} | "
                         f"{s.ms_per_token_speculative:.3f} | {s.speedup_vs_without_heads:.2f} | {s.speedup_vs_greedy:.2f} |")
    return "\n".join(lines)
