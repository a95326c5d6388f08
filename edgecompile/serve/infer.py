"""`edgecompile run`: what an app does with a bundle: route one text, then run that cluster.

Like the app snippet in the README (docs/bundles.md), a text longer than a model's max_seq_length is cut to it (the
models were built and checked for that length). It is never cut silently: the result's `truncated`
says, per model, how many tokens the text had and how many were kept, and the CLI warns on stderr.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import numpy as np

from edgecompile.bundle.store import Bundle
from edgecompile.check.parity import check_fits
from edgecompile.errors import BundleError
from edgecompile.inputs.router import encode_router, tokenization_from_manifest
from edgecompile.inputs.tokens import pad_batch
from edgecompile.lowering.targets import target_from_dict
from edgecompile.runtime.sessions import bundle_session


def _feed(session, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: batch[i.name] for i in session.get_inputs()}


def route_and_run(bundle: Bundle, text: str, target_name: str | None = None, threads: int = 0) -> dict[str, Any]:
    entry = bundle.target(target_name)
    target = target_from_dict(entry["target"], f"{bundle.root / 'manifest.json'}: targets.{entry['target'].get('name')}.target")
    length = None if target.dynamic_shapes else target.sequence
    truncated: dict[str, dict[str, int]] = {}

    def tokens(role: str):
        tokenizer, limit = bundle.tokenizer(role), bundle.manifest[role]["max_seq_length"]
        tokenization = tokenization_from_manifest(bundle.manifest[role])
        encoded = encode_router(tokenizer, tokenization, [text], limit)
        check_fits(encoded, target, "--text", which=role)
        if tokenization.special_tokens:
            total = len(tokenizer(text, truncation=False)["input_ids"])
        else:  # model2vec: the same ids without its character pre-cut and token limit
            total = encode_router(tokenizer, replace(tokenization, truncate_characters=None), [text], sys.maxsize)[0].length
        if total > encoded[0].length:
            truncated[role] = {"input_tokens": total, "kept": encoded[0].length}
        return encoded[0], pad_batch(encoded, length)

    router_sample, router_batch = tokens("router")
    router = bundle_session(bundle, entry, "router", target, threads)
    cluster_id, distances = router.run(["cluster_id", "distances"], _feed(router, router_batch))
    k = int(cluster_id.reshape(-1)[0])
    if f"cluster_{k}" not in entry["graphs"]:
        raise BundleError(f"{bundle.root}: router.onnx chose cluster {k}, which this bundle does not have")
    sample, batch = tokens("student")
    session = bundle_session(bundle, entry, f"cluster_{k}", target, threads)
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, _feed(session, batch))
    outputs = {}
    for name, value in zip(names, values):
        item = value[0]
        if item.ndim >= 2:  # per-token output: real tokens only
            item = item[: sample.length]
        outputs[name] = item.tolist()
    return {
        "text": text,
        "target": entry["target"]["name"],
        "cluster_id": k,
        "distances": [float(x) for x in distances[0]],
        "tokens": sample.length,
        "truncated": {role: truncated[role] for role in ("student", "router") if role in truncated},
        "outputs": outputs,
    }


def truncation_warning(result: dict[str, Any]) -> str | None:
    """One line saying what `run` cut, or None."""
    cut = result["truncated"]
    if not cut:
        return None
    total = max(c["input_tokens"] for c in cut.values())
    kept = " and ".join(f"the {role} read the first {c['kept']}" for role, c in cut.items())
    return f"--text is {total} tokens; {kept} (max_seq_length); the rest was ignored"
