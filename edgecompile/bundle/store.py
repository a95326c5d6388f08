"""The bundle on disk: graph files with shared weights, hashes, and loading a bundle as untrusted data
(staging and the atomic commit are in staging.py).

Layout (all paths relative to the bundle root):
    manifest.json            schema, versions, graphs, clusters, files + sha256
    parity.json, parity.md   the parity gate's results
    reference/               samples.txt and the PyTorch reference outputs (for `verify`)
    tokenizer/               the student's tokenizer files
    router_tokenizer/        only when the router encoder's tokenizer differs from the student's
    <target>/                router.onnx, dense.onnx, cluster_<k>.onnx [, weights.bin]

With shared weights, every tensor of at least SHARED_THRESHOLD bytes lives once in
<target>/weights.bin (deduplicated by content: clusters share everything they did not rewrite)
and each .onnx file references it as ONNX external data.

Loading checks the manifest's keys and types, and that every path it names is a relative path inside
the bundle; `Bundle.file` also refuses a path that leaves the bundle through a symbolic link.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import onnx_ir as ir

from edgecompile.bundle.layout import (
    GRAPH_NAME, MANIFEST, WEIGHTS, epcontext_file, genai_folder, genai_overlay, graph_file,
)
from edgecompile.errors import BundleError, InputError
from edgecompile.inputs.files import sha256_file

SCHEMA_VERSION = "edgecompile-bundle/1"
REFERENCE_OUTPUTS = "reference/outputs.safetensors"
REFERENCE_SAMPLES = "reference/samples.txt"
STUDENT_TOKENIZER = "tokenizer"
ROUTER_TOKENIZER = "router_tokenizer"
STAGING_MARKER = ".edgecompile-staging.json"  # in folders a build makes beside --out (staging.py); never part of a bundle
# student/router.tokenization (inputs/router.Tokenization): key -> the JSON types it may hold
TOKENIZATION_KEYS = {"special_tokens": (bool,), "truncate_characters": (int, type(None)), "drop_token_id": (int, type(None)),
                     "drop_before_truncation": (bool,)}
TASKS = ("causal-lm", "feature-extraction")  # student.task; absent: an encoder (bundles before decoders wrote none)
TARGET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # a target's name is its folder (lowering/targets.py enforces it too)
SHARED_THRESHOLD = 1024
ALIGNMENT = 4096  # page-aligned tensors can be memory-mapped by onnxruntime


def write_graphs(directory: Path, graphs: list[tuple[str, ir.Model]], shared_weights: bool) -> dict[str, int]:
    """Save graphs; with shared_weights, large tensors go once into `directory/weights.bin`.

    Returns, per file, the bytes that graph needs: its .onnx plus the external tensors it reads
    (what it would weigh shipped alone).
    """
    directory.mkdir(parents=True, exist_ok=True)
    needs: dict[str, int] = {}
    if not shared_weights:
        for filename, model in graphs:
            ir.save(model, directory / filename)
            needs[filename] = (directory / filename).stat().st_size
        return needs
    stored: dict[bytes, tuple[int, int]] = {}
    by_identity: dict[int, bytes] = {}  # clones share tensor objects: hash each object once
    with open(directory / WEIGHTS, "wb") as weights:
        for filename, model in graphs:
            external = 0
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes < SHARED_THRESHOLD or isinstance(tensor, ir.ExternalTensor):
                    continue
                data = tensor.tobytes()
                key = by_identity.get(id(tensor))
                if key is None:
                    key = hashlib.sha256(data).digest()
                    by_identity[id(tensor)] = key
                if key not in stored:
                    offset = -weights.tell() % ALIGNMENT
                    weights.write(b"\0" * offset)
                    stored[key] = (weights.tell(), len(data))
                    weights.write(data)
                offset, length = stored[key]
                external += length
                value.const_value = ir.ExternalTensor(
                    WEIGHTS, offset, length, tensor.dtype, shape=tensor.shape, name=value.name, base_dir=directory
                )
            ir.save(model, directory / filename)
            needs[filename] = (directory / filename).stat().st_size + external
    return needs


def _same_files(a: tuple[Path, ...], b: tuple[Path, ...]) -> bool:
    return [p.name for p in a] == [p.name for p in b] and all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def write_tokenizers(root: Path, student_files: tuple[Path, ...], router_files: tuple[Path, ...]) -> str:
    """Copy tokenizer files; returns the folder the router uses (shared when the files are identical)."""
    (root / STUDENT_TOKENIZER).mkdir(exist_ok=True)
    for source in student_files:
        shutil.copyfile(source, root / STUDENT_TOKENIZER / source.name)
    if _same_files(student_files, router_files):
        return STUDENT_TOKENIZER
    (root / ROUTER_TOKENIZER).mkdir(exist_ok=True)
    for source in router_files:
        shutil.copyfile(source, root / ROUTER_TOKENIZER / source.name)
    return ROUTER_TOKENIZER


def save_reference(root: Path, texts: tuple[str, ...], reference: dict[str, dict[str, list]]) -> None:
    """The parity samples and the PyTorch reference outputs, so `verify` can re-check without the models."""
    import numpy as np
    from safetensors.numpy import save_file

    (root / REFERENCE_SAMPLES).parent.mkdir(parents=True, exist_ok=True)
    (root / REFERENCE_SAMPLES).write_text("\n".join(texts) + "\n", encoding="utf-8")
    tensors = {
        f"{graph}/{output}/{i:04d}": np.ascontiguousarray(array)
        for graph, outputs in reference.items()
        for output, arrays in outputs.items()
        for i, array in enumerate(arrays)
    }
    save_file(tensors, str(root / REFERENCE_OUTPUTS))


def _entries(root: Path) -> list[str]:
    """Every file and symbolic link under root (links are not followed), as sorted posix paths."""
    found = []
    for folder, dirs, files in os.walk(root):
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        found += [Path(folder, name).relative_to(root).as_posix() for name in files + links]
    return sorted(found)


def bundle_files(root: Path) -> list[str]:
    """Every file in the bundle except the manifest, as sorted posix paths."""
    return [rel for rel in _entries(root) if rel not in (MANIFEST, STAGING_MARKER)]


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the bundle except the manifest."""
    return {rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size} for rel in bundle_files(root)}


def graph_signature(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    def describe(value: ir.Value) -> dict[str, Any]:
        dims = [d if isinstance(d, int) else str(d) for d in (value.shape or [])]
        dtype = value.dtype.name.lower() if value.dtype is not None else "unknown"
        return {"name": value.name, "dtype": dtype, "shape": dims}

    return {"opset": int(model.opset_imports.get("", 0)),
            "inputs": [describe(v) for v in model.graph.inputs], "outputs": [describe(v) for v in model.graph.outputs]}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @property
    def targets(self) -> list[str]:
        return list(self.manifest["targets"])

    def target(self, name: str | None) -> dict[str, Any]:
        targets = self.manifest["targets"]
        if name is None:
            name = next(iter(targets))
        if name not in targets:
            raise InputError(f"{self.root}: target '{name}' not in this bundle; it has: {', '.join(targets)}")
        return targets[name]

    def file(self, rel: str) -> Path:
        """A path the manifest names, which must stay inside the bundle (also through symbolic links)."""
        path = self.root / rel
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise BundleError(f"{path}: leads outside the bundle (through a symbolic link); a bundle holds its own files only")
        return path

    def graph_file(self, target: dict[str, Any], graph: str) -> Path:
        """A graph's file, which must exist (run and bench do not re-hash the bundle)."""
        if graph not in target["graphs"]:
            raise BundleError(f"{self.root / MANIFEST}: targets.{target['target']['name']}.graphs: expected a graph "
                              f"'{graph}', found only {', '.join(target['graphs']) or 'none'}")
        path = self.file(target["graphs"][graph]["file"])
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle (listed in manifest.json); run `edgecompile verify`")
        return path

    def graph_entry(self, graph: str) -> dict[str, Any]:
        """The manifest's description of a student graph ('dense' or 'cluster_<k>': kept structure, KV cache, MACs);
        just {"graph": graph} when the manifest describes no such graph (readers then find its fields missing)."""
        entries = [self.manifest.get("dense", {}), *self.manifest.get("clusters", [])]
        return next((e for e in entries if isinstance(e, dict) and e.get("graph") == graph), {"graph": graph})

    def tokenizer(self, role: str):
        """The tokenizer of 'student' or 'router'; a bundle whose tokenizer does not load is a bundle error."""
        from edgecompile.inputs.router import load_router_tokenizer, tokenization_from_manifest

        try:  # a model2vec router's tokenizer is a plain tokenizers.Tokenizer (inputs/router.py)
            return load_router_tokenizer(self.file(self.manifest[role]["tokenizer"]), tokenization_from_manifest(self.manifest[role]))
        except InputError as exc:
            raise BundleError(str(exc)) from None


def load_bundle(path: Path) -> Bundle:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: not found; is {path} an edgecompile bundle?")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_VERSION:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{manifest_path}: schema: expected {SCHEMA_VERSION!r}, found {found!r}")
    _check_manifest(manifest_path, manifest)
    return Bundle(path, manifest)


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """The keys the bundle commands read, with their types, so a damaged manifest is one clear line."""

    def need(obj: Any, key: str, kind: type, where: str) -> Any:
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, kind) or (kind in (dict, list) and not value and key == "targets"):
            raise BundleError(f"{path}: {where}{key}: expected a {kind.__name__}{' (non-empty)' if key == 'targets' else ''}, found {value!r}"[:300])
        return value

    def inside(rel: str, where: str) -> str:
        parts = PurePosixPath(rel).parts
        if not rel or "\\" in rel or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise BundleError(f"{path}: {where}: expected a relative path inside the bundle, found {rel!r} (outside the bundle)"[:300])
        return rel

    def positive(obj: dict, key: str, where: str) -> None:
        value = need(obj, key, int, where)
        if isinstance(value, bool) or value < 1:
            raise BundleError(f"{path}: {where}{key}: expected a positive integer, found {value!r}")

    for role in ("student", "router"):
        section = need(manifest, role, dict, "")
        if role == "student" and section.get("task", "feature-extraction") not in TASKS:
            raise BundleError(f"{path}: student.task: expected one of {', '.join(TASKS)} or absent, found {section['task']!r}"[:300])
        need(section, "tokenizer", str, f"{role}.")
        for key in ("max_seq_length", "vocab_size"):
            positive(section, key, f"{role}.")
        inside(section["tokenizer"], f"{role}.tokenizer")
        tokenization = section.get("tokenization")  # absent in bundles written before routers recorded it
        if tokenization is not None:
            need(section, "tokenization", dict, f"{role}.")
            for key, kinds in TOKENIZATION_KEYS.items():
                value = tokenization.get(key)
                if key in tokenization and not (isinstance(value, kinds) and (bool in kinds) == isinstance(value, bool)):
                    raise BundleError(f"{path}: {role}.tokenization.{key}: expected "
                                      f"{' or '.join('null' if k is type(None) else k.__name__ for k in kinds)}, found {value!r}"[:300])
    for i, cluster in enumerate([need(manifest, "dense", dict, "")] + need(manifest, "clusters", list, "")):
        where = "dense." if i == 0 else f"clusters[{i - 1}]."
        for key, kind in (("graph", str), ("parameters", int), ("macs_per_token", dict), ("bytes", dict)):
            need(cluster, key, kind, where)
        if i:
            need(cluster, "kept", dict, where)
    for key in ("report", "data"):
        inside(need(need(manifest, "parity", dict, ""), key, str, "parity."), f"parity.{key}")
    files = need(manifest, "files", dict, "")
    for rel, entry in files.items():
        need(entry, "sha256", str, f"files[{inside(rel, f'files[{rel}]')}].")
    decoder = manifest["student"].get("task") == "causal-lm"
    for name, target in need(manifest, "targets", dict, "").items():
        if not TARGET_NAME.fullmatch(name):
            raise BundleError(f"{path}: targets: expected target names of lowercase letters, digits, '-' or '_' (each names "
                              f"its folder), found {name!r}"[:300])
        if need(target, "target", dict, f"targets.{name}.").get("name") != name:
            raise BundleError(f"{path}: targets.{name}.target.name: expected {name!r} (its folder), found {target['target'].get('name')!r}"[:300])
        for key, kind in (("provider", str), ("precision", str), ("format", str), ("parity_executed_on", str),
                          ("dynamic_shapes", bool), ("placement", dict)):
            need(target, key, kind, f"targets.{name}.")
        if "lowbit_graphs" in target and not (isinstance(target["lowbit_graphs"], list)
                                              and all(isinstance(g, str) for g in target["lowbit_graphs"])):
            raise BundleError(f"{path}: targets.{name}.lowbit_graphs: expected a list of graph names, "
                              f"found {target['lowbit_graphs']!r}"[:300])
        for graph, info in need(target, "graphs", dict, f"targets.{name}.").items():
            where = f"targets.{name}.graphs.{graph}"
            if not GRAPH_NAME.fullmatch(graph):
                raise BundleError(f"{path}: targets.{name}.graphs: expected graph names router, dense or cluster_<k>, "
                                  f"found {graph!r}"[:300])
            file = inside(need(info, "file", str, f"{where}."), f"{where}.file")
            # one resolution of graph -> file for every command: the manifest may not point a graph elsewhere
            expected = graph_file(name, graph, decoder=decoder, extension="ort" if target["format"] == "ort" else "onnx")
            if file != expected:
                raise BundleError(f"{path}: {where}.file: expected {expected!r} (where edgecompile writes graph "
                                  f"'{graph}'), found {file!r}"[:300])
            if file not in files:
                raise BundleError(f"{path}: {where}.file: expected a file listed in files, found {file!r}")
            for key, value in (("epcontext", epcontext_file(name, graph)), ("genai_overlay", genai_overlay(graph))):
                if key in info and info[key] != value:
                    raise BundleError(f"{path}: {where}.{key}: expected {value!r}, found {info[key]!r}"[:300])
        if decoder and target.get("genai_folder") != genai_folder(name):
            raise BundleError(f"{path}: targets.{name}.genai_folder: expected {genai_folder(name)!r}, "
                              f"found {target.get('genai_folder')!r}"[:300])


def check_hashes(bundle: Bundle) -> list[str]:
    """Problems found comparing files on disk with the manifest (empty list: all good)."""
    problems = []
    recorded = bundle.manifest.get("files", {})
    for rel, entry in recorded.items():
        path = bundle.root / rel
        if path.is_symlink() or (path.exists() and path.resolve() != bundle.root.resolve() / rel):
            problems.append(f"{rel}: a symbolic link (a bundle holds regular files only)")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        elif (found := sha256_file(path)) != entry["sha256"]:
            problems.append(f"{rel}: sha256 expected {entry['sha256'][:12]}…, found {found[:12]}…")
    # the staging marker is removed before a bundle is committed: a file of that name in a bundle is not ours
    on_disk = {rel for rel in _entries(bundle.root) if rel != MANIFEST}
    problems += [f"{rel}: not listed in the manifest" for rel in sorted(on_disk - set(recorded))]
    return problems
