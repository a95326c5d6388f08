from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from factories import make_bert, write_masks  # noqa: E402

LAYERS, HEADS, HIDDEN, INTERMEDIATE = 2, 4, 32, 64


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def st_student(models_dir) -> Path:
    return make_bert(models_dir / "st_student", family="st", seed=1)


@pytest.fixture(scope="session")
def bert_student(models_dir) -> Path:
    return make_bert(models_dir / "bert_student", family="bert", seed=3)


@pytest.fixture(scope="session")
def seqcls_student(models_dir) -> Path:
    return make_bert(models_dir / "seqcls_student", family="seqcls", seed=4)


@pytest.fixture(scope="session")
def router_encoder(models_dir) -> Path:
    return make_bert(models_dir / "router", family="st", seed=2, hidden=24, heads=2, intermediate=48)


def gates(blocks=None, heads=None, neurons=None, layers=LAYERS):
    out = {}
    if blocks is not None:
        out["blocks"] = np.asarray(blocks, np.float32).reshape(layers, 2)
    if heads is not None:
        out["heads"] = np.asarray(heads, np.float32).reshape(layers, -1)
    if neurons is not None:
        out["neurons"] = np.asarray(neurons, np.float32).reshape(layers, -1)
    return out


def centroids(k: int, dim: int = 24, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((k, dim)) * 0.3).astype(np.float32)


@pytest.fixture
def masks_file(tmp_path):
    """write_masks with test defaults: router centroids of the tiny router's width (24)."""

    def make(clusters: dict, k: int | None = None, **kwargs) -> Path:
        path = kwargs.pop("path", tmp_path / "masks.safetensors")
        cents = kwargs.pop("centroids", None)
        if cents is None:
            cents = centroids(len(clusters) if k is None else k)
        return write_masks(path, clusters, cents, **kwargs)

    return make


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from edgecompile.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def pytest_collection_modifyitems(config, items):
    """Real models (tests marked real_model) run in the tf5 lane: the tf4 lane compiles the same code paths on tiny
    models, and converting the models twice would cost CI minutes (EDGECOMPILE_REAL_MODELS=1 runs them anywhere)."""
    from edgecompile.inputs.compat import transformers_major

    if transformers_major() >= 5 or os.environ.get("EDGECOMPILE_REAL_MODELS") == "1":
        return
    skip = pytest.mark.skip(reason="real models run in the tf5 lane (EDGECOMPILE_REAL_MODELS=1 runs them here)")
    for item in items:
        if "real_model" in item.keywords:
            item.add_marker(skip)
