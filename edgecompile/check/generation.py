"""Generation parity for decoders: greedy tokens from PyTorch (masks applied), onnxruntime and onnxruntime-genai.

The reference is transformers' own model with the cluster's gates installed, decoding greedily with
its KV cache; `edgecompile run`'s loop (runtime/decode.py) and onnxruntime-genai's generator run the
shipped folder. All three stop after `max_new_tokens` or on an end-of-sequence token (kept).
A build passes only when every sample's tokens are identical.
"""

from __future__ import annotations

import inspect
import numpy as np

from edgecompile.check.parity import Comparison


TOP_K = 8  # reference logits kept per generated token, to judge where a quantized graph may diverge


def reference_greedy(model, prompt: list[int], max_new_tokens: int,
                     eos_token_ids: frozenset[int]) -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
    """(prefill logits [S, V], generated tokens, top-k logit values and ids per step [T, k]) from a
    transformers causal LM, one sample, no padding."""
    import torch

    from edgecompile.reference.evaluate import single_thread

    tokens: list[int] = []
    top_values, top_ids = [], []
    # later transformers 5 releases (5.24 here) renamed `past_key_values` to `cache`; the old name goes in 5.40
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad(), single_thread():
        out = model(torch.tensor([prompt]), use_cache=True)
        prefill = out.logits[0].numpy().copy()
        logits, cache = out.logits, out[cache_argument]
        while len(tokens) < max_new_tokens:
            last = logits[0, -1]
            top = torch.topk(last, min(TOP_K, last.shape[-1]))
            top_values.append(top.values.numpy().copy())
            top_ids.append(top.indices.numpy().astype(np.int64))
            token = int(torch.argmax(last))
            tokens.append(token)
            if token in eos_token_ids:
                break
            out = model(torch.tensor([[token]]), **{cache_argument: cache}, use_cache=True)
            logits, cache = out.logits, out[cache_argument]
    return prefill, tokens, np.stack(top_values), np.stack(top_ids)


def first_difference(ref: list[int], got: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))


def compare_tokens(target: str, graph: str, runner: str, refs: list[list[int]], gots: list[list[int]],
                   near_ties: list[bool] | None = None) -> Comparison:
    """One row: the share of samples whose generated tokens are identical (must be 1).

    `near_ties[s]`: sample s diverged at a near-tie of the low-bit contract (see divergence_is_a_near_tie);
    such samples pass and are counted in the row's label.
    """
    same = [r == g for r, g in zip(refs, gots)]
    tied = [not s and bool(near_ties and near_ties[i]) for i, s in enumerate(same)]
    agreement = float(np.mean(same)) if same else 1.0
    label = f"greedy tokens ({runner})" + (f"; {sum(tied)} diverged at low-bit near-ties" if any(tied) else "")
    failed = [not s and not t for s, t in zip(same, tied)]
    worst = failed.index(True) if True in failed else 0
    row = Comparison(target, graph, label, len(refs), None, None, None, agreement, worst)
    if any(failed):
        ref, got = refs[worst], gots[worst]
        step = first_difference(ref, got)
        row.failures.append(f"{sum(failed)} sample(s) differ; sample {worst} first at new token {step}: "
                            f"expected {ref[step:step + 3]}, found {got[step:step + 3]}")
    return row
