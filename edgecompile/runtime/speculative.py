"""Self-speculative decoding with multi-token-prediction heads (Gloeckle et al. 2024; Stern et al. 2018).

A graph with n heads returns `logits` (head 0: the next token) and `logits_1..logits_{n-1}` (head j:
the token j+1 places further), all from ONE pass of the shared trunk; the extra heads' logits are
computed at one position only, the last one head 0 confirms (the graph is told `draft_count`). Each step feeds the pending
token (exact: head 0 chose it) followed by the n-1 tokens the extra heads drafted, in one forward
pass; head 0's prediction at each fed position verifies the next draft. The accepted drafts and
head 0's first disagreeing prediction are exactly the tokens greedy decoding would produce; the KV
cache (trunk and every head layer) is cut back to the accepted prefix, and the extra heads at the
last accepted position draft again. Every pass yields between 1 and n tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from edgecompile.runtime.decode import PAST, PRESENT, empty_cache

DRAFT_COUNT = "draft_count"  # a multi-token-prediction graph's input: how many drafts follow the pending token


@dataclass
class SpeculativeGeneration:
    tokens: list[int]
    forward_passes: int
    drafted: int  # draft tokens proposed by the extra heads
    accepted: int  # of which head 0 confirmed
    prefill_ms: float
    step_ms: list[float] = field(default_factory=list)
    # per extra head j (index j - 1): passes in which its draft was checked (every earlier draft accepted), and accepted
    checked_by_head: list[int] = field(default_factory=list)
    accepted_by_head: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def head_acceptance(self) -> list[float | None]:
        """Per extra head, the share of its checked drafts head 0 confirmed (head 1's: of every pass's first draft)."""
        return [a / c if c else None for a, c in zip(self.accepted_by_head, self.checked_by_head)]

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per decode forward pass (the prefill pass yields the first token and is not counted)."""
        decode_passes = self.forward_passes - 1
        return (len(self.tokens) - 1) / decode_passes if decode_passes else 0.0


def extra_head_outputs(session: ort.InferenceSession) -> list[str]:
    names = {o.name for o in session.get_outputs()}
    heads = []
    while f"logits_{len(heads) + 1}" in names:
        heads.append(f"logits_{len(heads) + 1}")
    return heads


def speculative_greedy(session: ort.InferenceSession, prompt: list[int], max_new_tokens: int,
                       eos_token_ids: frozenset[int] = frozenset()) -> SpeculativeGeneration:
    """Greedy decoding, drafting with the extra heads and verifying with head 0 (token-identical to greedy)."""
    heads = extra_head_outputs(session)
    output_names = [o.name for o in session.get_outputs()]
    ids = np.array([prompt], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), **empty_cache(session)}
    start = time.perf_counter()
    results = dict(zip(output_names, session.run(output_names, feed)))
    prefill_ms = (time.perf_counter() - start) * 1e3
    cached = len(prompt)
    tokens = [int(np.argmax(results["logits"][0, -1]))]
    drafts = [int(np.argmax(results[h][0, -1])) for h in heads]  # the extra heads' logits: one position, the last
    # an input with a default (onnxruntime lists those apart); graphs written before it drafted at every position
    counts = {i.name for i in session.get_overridable_initializers()} & {DRAFT_COUNT}
    cache = {PAST + n[len(PRESENT):]: v for n, v in results.items() if n.startswith(PRESENT)}
    passes, drafted, accepted, steps = 1, 0, 0, []
    checked_by_head, accepted_by_head = [0] * len(heads), [0] * len(heads)
    while len(tokens) < max_new_tokens and tokens[-1] not in eos_token_ids:
        drafts = drafts[: max_new_tokens - len(tokens)]  # never verify past the token budget
        fed = [tokens[-1]] + drafts
        start = time.perf_counter()
        x = np.array([fed], np.int64)
        feed = {"input_ids": x, "attention_mask": np.ones((1, cached + len(fed)), np.int64), **cache}
        feed.update({name: np.array([len(drafts)], np.int64) for name in counts})
        results = dict(zip(output_names, session.run(output_names, feed)))
        steps.append((time.perf_counter() - start) * 1e3)
        passes += 1
        drafted += len(drafts)
        predicted = np.argmax(results["logits"][0], axis=-1)  # head 0's next token after each fed position
        kept = 0
        while kept < len(drafts) and int(predicted[kept]) == drafts[kept] and drafts[kept] not in eos_token_ids:
            kept += 1
        accepted += kept
        for j in range(min(kept + 1, len(drafts))):  # drafts after the first rejected one were never in question
            checked_by_head[j] += 1
            accepted_by_head[j] += j < kept
        tokens += drafts[:kept] + [int(predicted[kept])]  # an end-of-sequence draft comes back as head 0's own token
        cached += 1 + kept  # the pending token and the accepted drafts; rejected drafts leave the cache
        cache = {PAST + n[len(PRESENT):]: np.ascontiguousarray(v[:, :, :cached]) for n, v in results.items()
                 if n.startswith(PRESENT)}
        # the graph read the extra heads at the last position head 0 confirmed (families/decoder.py draft_position): `kept`
        drafts = [int(np.argmax(results[h][0, -1 if counts else kept])) for h in heads]
    for i, token in enumerate(tokens):  # greedy stops at the first end-of-sequence token
        if token in eos_token_ids:
            tokens = tokens[: i + 1]
            break
    return SpeculativeGeneration(tokens[:max_new_tokens], passes, drafted, accepted, prefill_ms, steps, checked_by_head,
                                 accepted_by_head)
