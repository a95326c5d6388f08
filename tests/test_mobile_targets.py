"""xnnpack / nnapi / coreml: ONNX files over one shared weights.bin (or ORT format in a target of one's own),
with estimated placement, checked on the CPU EP."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import LAYERS, gates


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, st_student, router_encoder):
    from conftest import centroids
    from edgecompile.build import BuildRequest, build
    from factories import write_masks

    root = tmp_path_factory.mktemp("mobile")
    masks = write_masks(root / "m.safetensors", {0: gates(blocks=np.ones((LAYERS, 2))), 1: gates(blocks=[[0, 1], [1, 0]])}, centroids(2))
    build(BuildRequest(st_student, masks, router_encoder, root / "b", ["cpu", "xnnpack", "nnapi", "coreml"]))
    return root / "b"


@pytest.mark.parametrize("target,ep", [("xnnpack", "XnnpackExecutionProvider"), ("nnapi", "NnapiExecutionProvider"),
                                       ("coreml", "CoreMLExecutionProvider")])
def test_shared_weight_files_and_estimated_placement(bundle, target, ep):
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["targets"][target]
    assert sorted(p.name for p in (bundle / target).iterdir()) == sorted(
        [f"{g}.onnx" for g in ("router", "dense", "cluster_0", "cluster_1")] + ["weights.bin"])
    assert entry["graphs"]["dense"]["file"] == f"{target}/dense.onnx" and entry["shared_weights"]
    assert entry["graphs"]["dense"]["inputs"][0]["shape"] == [1, 128]
    assert "cannot run here" in entry["parity_executed_on"]
    # every tensor is stored once: cluster 1 only drops branches, so weights.bin holds no more than dense + router
    # (the 1.3x-one-model figure for MiniLM is measured in examples/bench_routing.py; tiny graphs are all overhead)
    weights = (bundle / target / "weights.bin").stat().st_size
    assert weights <= manifest["dense"]["bytes"][target] + manifest["router"]["bytes"][target]
    assert sum(manifest["clusters"][k]["bytes"][target] for k in (0, 1)) > weights
    for graph, placement in entry["placement"].items():
        assert placement["ep"] == ep and placement["method"].startswith("static estimate")
        assert 0 < placement["nodes_by_ep"][ep] <= placement["total_nodes"]
        assert not placement["fully_placed"] or target == "coreml"
    report = (bundle / "parity.md").read_text()
    assert f"### Placement on '{target}'" in report and f"**{ep} cannot run on the build machine" in report


def test_mobile_parity_ran_on_the_ort_files(bundle, cli):
    rows = json.loads((bundle / "parity.json").read_text())["targets"]
    assert set(rows) == {"cpu", "xnnpack", "nnapi", "coreml"}
    for target, data in rows.items():
        assert data["passed"] and all(r["passed"] for r in data["rows"]), target
    code, out, err = cli("verify", bundle)
    assert code == 0, err
    code, out, _ = cli("inspect", bundle)
    assert "ESTIMATED" in out and "[executed]" in out
    code, out, _ = cli("run", bundle, "--target", "nnapi", "--text", "where is the station")
    assert code == 0 and json.loads(out)["target"] == "nnapi"


def test_bench_states_the_shape_and_refuses_another_on_a_fixed_target(bundle, cli, tmp_path):
    code, _, err = cli("bench", bundle, "--target", "xnnpack", "--sequence", "64", "--runs", "3")
    assert code == 2 and "--sequence: sequence on target 'xnnpack': expected 128 (its graphs have fixed shapes), found 64" in err
    code, _, err = cli("bench", bundle, "--target", "xnnpack", "--batch", "2", "--runs", "3")
    assert code == 2 and "--batch" in err
    report = tmp_path / "bench.json"
    code, out, err = cli("bench", bundle, "--target", "xnnpack", "--runs", "3", "--warmup", "0", "--json", report)
    assert code == 0, err
    assert "target xnnpack: CPUExecutionProvider (XnnpackExecutionProvider cannot run here)" in out
    assert "graphs: batch 1 x sequence 128" in out and "padded to 1 x 128" in out
    data = json.loads(report.read_text())
    assert data["metadata"]["graphs_shape"] == {"batch": 1, "sequence": 128, "tokens": "random ids"}
    assert data["metadata"]["target"] == "xnnpack" and data["metadata"]["executed_on"] == "CPUExecutionProvider"
    routed = data["routed"]
    assert routed["inputs"] == 24 and routed["padded_to"] == 128 and sum(routed["clusters_chosen"].values()) == 24
    assert 0 < routed["router_share"] < 1 and routed["router_p50_ms"] < routed["routed_p50_ms"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ort_format_target_of_ones_own(tmp_path, st_student, router_encoder):
    """format = "ort" (for a reduced --minimal_build): self-contained .ort files + required_operators.config."""
    from pathlib import Path

    from onnxruntime.tools.reduced_build_config_parser import parse_config

    from conftest import centroids
    from edgecompile.build import BuildRequest, build
    from factories import write_masks

    shipped = (Path(__file__).parents[1] / "targets" / "xnnpack.toml").read_text()
    own = tmp_path / "xnnpack-ort.toml"
    own.write_text(shipped.replace('name = "xnnpack"', 'name = "xnnpack-ort"').replace('format = "onnx"', 'format = "ort"'))
    masks = write_masks(tmp_path / "m.safetensors", {0: gates(blocks=np.ones((LAYERS, 2))), 1: gates(blocks=[[0, 1], [1, 0]])}, centroids(2))
    result = build(BuildRequest(st_student, masks, router_encoder, tmp_path / "b", [str(own)]))
    folder = tmp_path / "b" / "xnnpack-ort"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{g}.ort" for g in ("router", "dense", "cluster_0", "cluster_1")] + ["required_operators.config"])
    entry = result.manifest["targets"]["xnnpack-ort"]
    assert entry["graphs"]["dense"]["file"] == "xnnpack-ort/dense.ort" and len(entry["graphs"]["dense"]["content_digest"]) == 64
    required, _ = parse_config(str(folder / "required_operators.config"))
    assert any("MatMul" in ops for ops in required["ai.onnx"].values())
