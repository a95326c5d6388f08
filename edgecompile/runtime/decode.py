"""Greedy decoding with a decoder graph in onnxruntime, as an app without onnxruntime-genai would run it.

The graph takes `input_ids`, `attention_mask` over every token so far, and the KV cache of each
layer that has attention (`past_key_values.{i}.*`, empty on the first step); it returns `logits`
and `present.{i}.*`, which become the next step's past. The prompt runs in one forward pass
(prefill), then one token per pass (decode).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

PAST = "past_key_values."
PRESENT = "present."


@dataclass
class Generation:
    tokens: list[int]
    prefill_ms: float
    decode_ms: list[float] = field(default_factory=list)  # one per decoded token after the first
    step_logits: list[np.ndarray] = field(default_factory=list)  # with keep_logits: the logits each token was chosen from

    @property
    def decode_ms_per_token(self) -> float | None:
        return float(np.median(self.decode_ms)) if self.decode_ms else None


def empty_cache(session: ort.InferenceSession, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length past for every KV input the graph has (its own KV head count and head size)."""
    return {i.name: np.zeros((batch, int(i.shape[1]), 0, int(i.shape[3])), np.float32)
            for i in session.get_inputs() if i.name.startswith(PAST)}


def greedy(session: ort.InferenceSession, prompt: list[int], max_new_tokens: int, eos_token_ids: frozenset[int] = frozenset(),
           logits_output: str = "logits", keep_logits: bool = False) -> Generation:
    """Argmax decoding; stops after `max_new_tokens` or on an end-of-sequence token (which is kept)."""
    output_names = [o.name for o in session.get_outputs()]
    ids = np.array([prompt], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), **empty_cache(session)}
    tokens: list[int] = []
    timings: list[float] = []
    kept: list[np.ndarray] = []
    total = len(prompt)
    while len(tokens) < max_new_tokens:
        start = time.perf_counter()
        results = dict(zip(output_names, session.run(output_names, feed)))
        timings.append((time.perf_counter() - start) * 1e3)
        token = int(np.argmax(results[logits_output][0, -1]))
        tokens.append(token)
        if keep_logits:
            kept.append(results[logits_output][0, -1].copy())
        if token in eos_token_ids:
            break
        total += 1
        feed = {"input_ids": np.array([[token]], np.int64), "attention_mask": np.ones((1, total), np.int64)}
        feed.update({PAST + name[len(PRESENT):]: value for name, value in results.items() if name.startswith(PRESENT)})
    return Generation(tokens, timings[0], timings[1:], kept)
