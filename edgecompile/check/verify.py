"""`edgecompile verify`: re-check every file hash, then re-run the parity gate on this machine's
onnxruntime against the PyTorch reference outputs stored in the bundle.

The teacher-forced integer rows of low-bit graphs need the PyTorch model and are checked at build
time only; verify re-checks their end-to-end outputs under the target's lowbit_* tolerances.

The manifest is data to check, not a rule to obey: the hashes it records are compared with the files,
every path must stay inside the bundle, and parity is judged by this edgecompile's own definition of
the target (a manifest may record stricter tolerances, never looser ones: see targets.target_from_dict).
Any inconsistency between manifest, samples, reference outputs and graphs is one BundleError (exit 5).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgecompile.bundle.graph_files import check_graph_file
from edgecompile.bundle.store import REFERENCE_OUTPUTS, REFERENCE_SAMPLES, Bundle, check_hashes
from edgecompile.check.parity import TargetParity, check_target
from edgecompile.errors import BundleError, GraphLoadError, InputError, one_line
from edgecompile.inputs.samples import numbered_lines
from edgecompile.inputs.tokens import Encoded, prompt_ids
from edgecompile.lowering.targets import target_from_dict
from edgecompile.inputs.router import encode_role
from edgecompile.reference.evaluate import Outputs


def load_reference(bundle: Bundle) -> dict[str, Outputs]:
    """The stored reference outputs, grouped graph -> output -> one array per sample (indices 0..N-1)."""
    from safetensors.numpy import load_file

    path = bundle.file(REFERENCE_OUTPUTS)
    try:
        flat = load_file(str(path))
    except Exception as exc:  # OSError, or SafetensorError (which derives from Exception only)
        raise BundleError(f"{path}: unreadable ({one_line(exc)})") from None
    grouped: dict[str, dict[str, dict[int, np.ndarray]]] = defaultdict(lambda: defaultdict(dict))
    for key, array in flat.items():
        parts = key.rsplit("/", 2)
        if len(parts) != 3 or not parts[2].isdigit():
            raise BundleError(f"{bundle.root / REFERENCE_OUTPUTS}: tensor {key!r}: expected graph/output/index")
        grouped[parts[0]][parts[1]][int(parts[2])] = array
    reference = {}
    for graph, outputs in grouped.items():
        reference[graph] = {}
        for output, by_index in outputs.items():
            if sorted(by_index) != list(range(len(by_index))):
                raise BundleError(f"{bundle.root / REFERENCE_OUTPUTS}: {graph}/{output}: expected samples 0..{len(by_index) - 1}, "
                                  f"found indices {sorted(by_index)[:5]}…")
            reference[graph][output] = [by_index[i] for i in range(len(by_index))]
    return reference


def read_samples(bundle: Bundle) -> list[str]:
    path = bundle.file(REFERENCE_SAMPLES)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: expected UTF-8 text, found invalid byte at offset {exc.start}") from None
    except OSError as exc:
        raise BundleError(f"{path}: unreadable ({exc.strerror})") from None
    return [line for _, line in numbered_lines(text)]


def encoded_samples(bundle: Bundle, texts: list[str], role: str) -> list[Encoded]:
    return encode_role(bundle, role, texts)


def check_reference(bundle: Bundle, reference: dict[str, Outputs], samples: int, graphs: dict[str, list[str]]) -> None:
    """Samples, reference outputs and each target's graphs must describe the same build."""
    where = bundle.root / REFERENCE_OUTPUTS
    counts = {len(arrays) for outputs in reference.values() for arrays in outputs.values()}
    if len(counts) > 1:
        raise BundleError(f"{where}: expected the same number of samples for every output, found {sorted(counts)}")
    if counts and counts != {samples}:
        raise BundleError(f"{bundle.root / REFERENCE_SAMPLES}: expected as many samples as {REFERENCE_OUTPUTS} holds "
                          f"({counts.pop()}), found {samples} sample{'s' if samples != 1 else ''} (replaced or damaged)")
    for target, names in graphs.items():
        missing = [g for g in names if not reference.get(g)]
        if missing or not {"cluster_id", "distances"} <= set(reference.get("router", {})):
            raise BundleError(f"{where}: expected reference outputs for every graph of target '{target}', "
                              f"found none for {', '.join(missing or ['router.cluster_id'])}")
        for cluster_id in reference["router"]["cluster_id"]:
            if f"cluster_{int(np.asarray(cluster_id).reshape(-1)[0])}" not in names:
                raise BundleError(f"{where}: router/cluster_id: expected ids of this bundle's clusters, found "
                                  f"{int(np.asarray(cluster_id).reshape(-1)[0])}")


def verify_bundle(bundle: Bundle, targets: list[str] | None = None, threads: int = 0, progress=None) -> list[TargetParity]:
    problems = check_hashes(bundle)
    if problems:
        raise BundleError(f"{bundle.root}: {len(problems)} file(s) do not match the manifest: " + "; ".join(problems[:5]))
    names = targets or bundle.targets
    entries = {name: bundle.target(name) for name in names}
    definitions = {name: target_from_dict(entry["target"], f"{bundle.root / 'manifest.json'}: targets.{name}.target")
                   for name, entry in entries.items()}
    texts = read_samples(bundle)
    reference = load_reference(bundle)
    check_reference(bundle, reference, len(texts), {name: list(entry["graphs"]) for name, entry in entries.items()})
    paths = {name: graph_paths(bundle, entry) for name, entry in entries.items()}
    if bundle.manifest["student"].get("task") == "causal-lm":
        return verify_decoder(bundle, reference, texts, entries, paths, definitions, threads, progress)
    student_samples, router_samples = encoded_samples(bundle, texts, "student"), encoded_samples(bundle, texts, "router")
    results = []
    for name, entry in entries.items():
        try:
            results.append(check_target(
                definitions[name], paths[name], reference, student_samples, router_samples, threads, progress,
                lowbit_graphs=frozenset(entry.get("lowbit_graphs", [])),
            ))
        except GraphLoadError as exc:
            raise BundleError(str(exc)) from None
        except (InputError, KeyError, IndexError, ValueError) as exc:  # the bundle's data disagree with its graphs
            raise BundleError(f"{bundle.root}: target '{name}': the graphs do not fit the stored samples and reference "
                              f"outputs ({type(exc).__name__}: {one_line(exc)})") from None
    if not results or not any(r.rows for r in results):
        raise BundleError(f"{bundle.root}: manifest.json: targets: expected at least one target with graphs, found none")
    return results


def graph_paths(bundle: Bundle, entry: dict) -> dict[str, Path]:
    """Every graph of a target at the file the layout names (the one `run` and `bench` open), each checked for what it
    may ask of onnxruntime before parity hands it over (bundle/graph_files.py)."""
    paths = {graph: bundle.graph_file(entry, graph) for graph in entry["graphs"]}
    for path in paths.values():
        check_graph_file(path)
    return paths


def verify_decoder(bundle: Bundle, reference: dict[str, Outputs], texts: list[str], entries: dict, paths: dict,
                   definitions: dict, threads: int, progress=None) -> list[TargetParity]:
    """Decoder bundles: prefill logits and greedy tokens (onnxruntime and onnxruntime-genai) against the stored reference.

    onnxruntime-genai reads the folder's genai_config.json, which can name libraries and files: the file must be the
    one `build` writes for this manifest, or onnxruntime-genai never sees the folder."""
    from edgecompile.bundle.decoder_folders import check_genai_config, check_kv_cache
    from edgecompile.bundle.layout import MANIFEST, genai_folder
    from edgecompile.check.decoder_parity import DecoderFiles, DecoderSamples, check_decoder_target

    student = bundle.manifest["student"]
    for name, entry in entries.items():
        check_genai_config(bundle.root, bundle.manifest, name, definitions[name].linear_weights.session_config())
        for graph, path in paths[name].items():
            if graph != "router":
                check_kv_cache(bundle.root / MANIFEST, bundle.graph_entry(graph), check_graph_file(path))
    tokenizer = bundle.tokenizer("student")
    chat = bundle.manifest.get("samples", {}).get("chat", False) is True
    try:
        prompts = [prompt_ids(tokenizer, text, chat=chat, source=f"{REFERENCE_SAMPLES}") for text in texts]
    except InputError as exc:  # the bundle's own tokenizer or chat template
        raise BundleError(str(exc)) from None
    router_samples = encoded_samples(bundle, texts, "router")
    samples = DecoderSamples(reference, prompts, router_samples, frozenset(student["eos_token_ids"]),
                             int(bundle.manifest["generation"]["parity_new_tokens"]), threads)
    results = []
    for name, entry in entries.items():
        weights = definitions[name].linear_weights  # as recorded, checked to be a format a target can have
        quantized = frozenset(g for g in entry["graphs"] if g != "router") if weights.quantizes else frozenset()
        graph_reference = reference
        if quantized:  # the graphs' own reference: transformers with their dequantized weights, stored as <graph>~<format>
            missing = [g for g in sorted(quantized) if not reference.get(f"{g}~{weights.tag}")]
            if missing:
                raise BundleError(f"{bundle.root / REFERENCE_OUTPUTS}: expected the reference of target '{name}''s "
                                  f"{weights.tag} weights for every graph, found none for {missing[0]}~{weights.tag}")
            graph_reference = {**reference, **{g: reference[f"{g}~{weights.tag}"] for g in quantized}}
        files = DecoderFiles(paths[name], bundle.file(genai_folder(name)), frozenset(entry.get("lowbit_graphs", [])), quantized)
        graph_samples = replace(samples, reference=graph_reference)
        try:
            results.append(check_decoder_target(definitions[name], files, graph_samples, progress))
        except GraphLoadError as exc:
            raise BundleError(str(exc)) from None
        except (InputError, KeyError, IndexError, ValueError, TypeError) as exc:  # the bundle's data disagree with its graphs
            raise BundleError(f"{bundle.root}: target '{name}': the decoder graphs do not fit the stored samples and "
                              f"reference outputs ({type(exc).__name__}: {one_line(exc)})") from None
    return results
