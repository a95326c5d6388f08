"""`edgecompile verify`: re-check every file hash, then re-run the parity gate on this machine's
onnxruntime against the PyTorch reference outputs stored in the bundle.

The teacher-forced integer rows of low-bit graphs need the PyTorch model and are checked at build
time only; verify re-checks their end-to-end outputs under the target's lowbit_* tolerances.
The manifest is the root of trust: it records the hashes and the tolerances verify applies.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from edgecompile.bundle.store import REFERENCE_OUTPUTS, REFERENCE_SAMPLES, Bundle, check_hashes
from edgecompile.errors import BundleError
from edgecompile.check.parity import TargetParity, check_target
from edgecompile.inputs.samples import numbered_lines
from edgecompile.reference.evaluate import Outputs
from edgecompile.lowering.targets import target_from_dict
from edgecompile.inputs.tokens import encode, load_tokenizer


def load_reference(bundle: Bundle) -> dict[str, Outputs]:
    from safetensors.numpy import load_file

    flat = load_file(str(bundle.root / REFERENCE_OUTPUTS))
    grouped: dict[str, dict[str, dict[int, np.ndarray]]] = defaultdict(lambda: defaultdict(dict))
    for key, array in flat.items():
        graph, output, index = key.rsplit("/", 2)
        grouped[graph][output][int(index)] = array
    return {g: {o: [by_index[i] for i in sorted(by_index)] for o, by_index in outs.items()} for g, outs in grouped.items()}


def encoded_samples(bundle: Bundle, role: str):
    texts = [line for _, line in numbered_lines((bundle.root / REFERENCE_SAMPLES).read_text(encoding="utf-8"))]
    entry = bundle.manifest[role]
    return encode(load_tokenizer(bundle.root / entry["tokenizer"]), texts, entry["max_seq_length"])


def verify_bundle(bundle: Bundle, targets: list[str] | None = None, threads: int = 0, progress=None) -> list[TargetParity]:
    problems = check_hashes(bundle)
    if problems:
        raise BundleError(f"{bundle.root}: {len(problems)} file(s) do not match the manifest: " + "; ".join(problems[:5]))
    reference = load_reference(bundle)
    student_samples, router_samples = encoded_samples(bundle, "student"), encoded_samples(bundle, "router")
    results = []
    for name in targets or bundle.targets:
        entry = bundle.target(name)
        paths = {graph: bundle.root / info["file"] for graph, info in entry["graphs"].items()}
        results.append(check_target(
            target_from_dict(entry["target"]), paths, reference, student_samples, router_samples, threads, progress,
            lowbit_graphs=frozenset(entry.get("lowbit_graphs", [])),
        ))
    if not results or not any(r.rows for r in results):
        raise BundleError(f"{bundle.root}: manifest.json: targets: expected at least one target with graphs, found none")
    return results
