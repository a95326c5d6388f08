"""`edgecompile run` on a decoder bundle: route the prompt once, then decode greedily with the chosen cluster
(runtime/decode.py), or speculatively with its multi-token-prediction heads (runtime/speculative.py)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgecompile.runtime.decode import Generation, greedy


def route_and_generate(bundle, prompt: str, max_new_tokens: int, target_name: str | None = None, threads: int = 0,
                       speculative: bool = False, *, chat: bool = False, system: str | None = None,
                       graph: str | None = None) -> dict:
    """What an app does with a decoder bundle: route the prompt once, then decode greedily with that cluster.

    With `chat`, the prompt is a user turn of the bundle's chat template (inputs/tokens.prompt_ids); the router
    reads the user's text itself, as the build's parity samples route.

    With `graph` ("dense" or "cluster_<k>"), that graph decodes instead of the router's choice (to compare a routed
    reply with the dense one); the router still runs and its choice is reported.

    With `speculative`, the cluster's multi-token-prediction heads draft and head 0 verifies; the plain
    greedy decoding runs too, for the speed-up and to prove the tokens identical (a difference is a
    parity failure on this machine, exit 3).
    """
    from edgecompile.bundle.decoder_folders import check_kv_cache
    from edgecompile.bundle.layout import MANIFEST
    from edgecompile.errors import BundleError, InputError, input_error
    from edgecompile.inputs.router import encode_role
    from edgecompile.inputs.tokens import pad_batch, prompt_ids
    from edgecompile.lowering.targets import target_from_dict
    from edgecompile.runtime.sessions import bundle_session

    entry = bundle.target(target_name)
    target = target_from_dict(entry["target"])
    student = bundle.manifest["student"]
    option = "--chat" if chat else "--prompt"
    tokenizer = bundle.tokenizer("student")
    try:
        ids = prompt_ids(tokenizer, prompt, chat=chat, system=system, source=option)
    except InputError as exc:
        if "chat template failed" in str(exc):  # the bundle's template, not the user's words
            raise BundleError(f"{bundle.root / student['tokenizer']}: {exc}") from None
        raise
    if not ids:  # a tokenizer that adds no BOS token gives an empty prompt nothing to attend to
        raise input_error(option, "prompt tokens", "at least 1 (this model's tokenizer adds no BOS token)", 0)
    if len(ids) + max_new_tokens > student["max_seq_length"]:
        raise input_error(option, "prompt tokens + --max-new-tokens",
                          f"at most the model's {student['max_seq_length']} positions", f"{len(ids)} + {max_new_tokens}")
    decoders = [name for name in entry["graphs"] if name != "router"]
    if graph is not None and graph not in decoders:
        raise input_error("--graph", "one of the bundle's graphs", " or ".join(decoders), repr(graph))
    router = bundle_session(bundle, entry, "router", target, threads)
    feed = pad_batch(encode_role(bundle, "router", [prompt]))  # as verify's end-to-end row tokenizes for the router
    cluster_id, distances = router.run(["cluster_id", "distances"], {i.name: feed[i.name] for i in router.get_inputs()})
    k = int(cluster_id.reshape(-1)[0])
    chosen = graph or f"cluster_{k}"
    session = bundle_session(bundle, entry, chosen, target, threads)
    check_kv_cache(bundle.root / MANIFEST, bundle.graph_entry(chosen), ((i.name, i.shape) for i in session.get_inputs()))
    eos = frozenset(student.get("eos_token_ids", []))
    result = greedy(session, ids, max_new_tokens, eos)
    extra = {}
    if speculative:
        trunk = bundle_session(bundle, entry, chosen, target, threads, without_heads=True) \
            if "logits_1" in {o.name for o in session.get_outputs()} else None
        extra = speculative_summary(session, ids, max_new_tokens, eos, result, chosen, trunk)
    return {
        "prompt": prompt,
        **({"chat": True, "system": system} if chat else {}),
        "target": entry["target"]["name"],
        "cluster_id": k,
        "graph": chosen,
        "distances": [float(x) for x in distances[0]],
        "prompt_tokens": len(ids),
        "token_ids": result.tokens,
        "text": tokenizer.decode(result.tokens, skip_special_tokens=True),
        "prefill_ms": round(result.prefill_ms, 3),
        "decode_ms_per_token": None if result.decode_ms_per_token is None else round(result.decode_ms_per_token, 3),
        "decode_tokens_per_second": None if not result.decode_ms_per_token else round(1e3 / result.decode_ms_per_token, 2),
        **extra,
    }


def speculative_summary(session: ort.InferenceSession, ids: list[int], max_new_tokens: int, eos: frozenset[int],
                        plain: Generation, graph: str, trunk: ort.InferenceSession | None = None) -> dict:
    """Speculative decoding's tokens (must be `plain`'s) and its speed-up against greedy decoding: of the same graph,
    and (given `trunk`, the graph without its heads: runtime/without_heads.py) of the model before heads were added.

    The loops are timed after `plain` warmed the session, speculative first, then greedy again, then greedy
    without heads (after a warm-up run of its own); each loop's decode time is its median pass times its passes: a
    plain sum lets one scheduling spike of a loaded machine decide the ratio (0.2x to 3x seen on identical runs of a
    tiny model).
    """
    from edgecompile.errors import InputError, ParityError
    from edgecompile.runtime.speculative import extra_head_outputs, speculative_greedy

    if not extra_head_outputs(session):
        raise InputError(f"--speculative: {graph} has no multi-token-prediction heads (outputs logits_1...); "
                         "build a student with n_future_tokens > 1")
    fast = speculative_greedy(session, ids, max_new_tokens, eos)
    if fast.tokens != plain.tokens:
        raise ParityError(f"{graph}: speculative decoding gave {fast.tokens[:8]}..., plain greedy {plain.tokens[:8]}...; "
                          "they must be identical")
    timed = greedy(session, ids, max_new_tokens, eos)
    plain_pass = float(np.median(timed.decode_ms)) if timed.decode_ms else 0.0
    fast_pass = float(np.median(fast.step_ms)) if fast.step_ms else 0.0
    plain_ms, fast_ms = plain_pass * len(timed.decode_ms), fast_pass * len(fast.step_ms)
    without_heads = {}
    if trunk is not None:
        greedy(trunk, ids, max_new_tokens, eos)  # warm-up
        base = greedy(trunk, ids, max_new_tokens, eos)
        if base.tokens != plain.tokens:
            raise ParityError(f"{graph}: without its heads it gave {base.tokens[:8]}..., with them {plain.tokens[:8]}...; "
                              "they must be identical")
        base_pass = float(np.median(base.decode_ms)) if base.decode_ms else 0.0
        without_heads = {"greedy_without_heads_ms_per_pass": round(base_pass, 3),
                         "greedy_without_heads_decode_ms": round(base_pass * len(base.decode_ms), 3),
                         "speedup_vs_greedy_without_heads": round(base_pass * len(base.decode_ms) / fast_ms, 3) if fast_ms else None}
    return {
        "speculative": {
            "identical_to_greedy": True,
            "acceptance_rate": round(fast.acceptance_rate, 4),
            "tokens_per_forward_pass": round(fast.tokens_per_pass, 4),
            "decode_passes": len(fast.step_ms),
            "greedy_decode_passes": len(timed.decode_ms),
            "ms_per_pass": round(fast_pass, 3),
            "greedy_ms_per_pass": round(plain_pass, 3),
            "decode_ms": round(fast_ms, 3),
            "greedy_decode_ms": round(plain_ms, 3),
            "speedup_vs_greedy": round(plain_ms / fast_ms, 3) if fast_ms else None,
            **without_heads,
            "timing": "decode ms = median pass ms x passes; both loops timed after a first greedy run warmed the session",
        }
    }
