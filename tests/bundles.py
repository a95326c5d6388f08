"""A small built bundle for tests that read, tamper with or replace one, and helpers to edit it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from conftest import HEADS, LAYERS, centroids, gates
from factories import write_masks

CLUSTERS = {0: gates(blocks=np.ones((LAYERS, 2))), 1: gates(heads=[[1, 0, 1, 1], [0, 1, 1, 0]][:LAYERS])}


def small_masks(path: Path) -> Path:
    assert HEADS == 4
    return write_masks(path, CLUSTERS, centroids(len(CLUSTERS)))


def build_small_bundle(folder: Path, student: Path, router: Path, **request: Any) -> Path:
    from edgecompile.build import BuildRequest, build

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "bundle"
    build(BuildRequest(student, small_masks(folder / "masks.safetensors"), router, out, **request))
    return out


def copy_bundle(bundle: Path, where: Path) -> Path:
    shutil.copytree(bundle, where, symlinks=True)
    return where


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Apply `change` to manifest.json in place (as a tamperer with a text editor would)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def rehash(bundle: Path, *rels: str) -> None:
    """Record the current sha256 of files (followed as the tool would) so only deeper checks can catch a tamper."""

    def update(manifest: dict[str, Any]) -> None:
        for rel in rels:
            data = (bundle / rel).read_bytes()
            manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    edit_manifest(bundle, update)
