"""The qnn-htp target on the QNN HTP backend (simulated on x86-64 by onnxruntime-qnn), fallback disabled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from conftest import LAYERS, centroids, gates
from factories import write_masks

pytest.importorskip("onnxruntime_qnn")
QNN = (Path(__file__).parents[1] / "targets" / "qnn-htp.toml").read_text()
CLUSTERS = {
    0: gates(blocks=np.ones((LAYERS, 2))),
    1: gates(blocks=[[0, 1], [1, 0]]),
    2: gates(heads=[[1, 0, 1, 1], [0, 1, 0, 1]], neurons=(np.random.default_rng(3).random((LAYERS, 64)) > 0.4)),
}


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> Path:
    return write_masks(tmp_path_factory.mktemp("qnn") / "masks.safetensors", CLUSTERS, centroids(3))


def build(student, router, masks, out, target="qnn-htp", samples=None):
    from edgecompile.build import BuildRequest, build as run

    return run(BuildRequest(student, masks, router, out, [str(target)], samples))


def test_sentence_encoder_runs_fully_on_htp(st_student, router_encoder, masks, tmp_path):
    samples = tmp_path / "samples.txt"  # a 64-token sample: HTP's LpNormalization broke on it before
    samples.write_text("\n".join(["short one", " ".join(["word"] * 80), "Where is the nearest train station?"]))
    result = build(st_student, router_encoder, masks, tmp_path / "b", samples=samples)
    entry = result.manifest["targets"]["qnn-htp"]
    assert entry["batch"] == 1 and entry["sequence"] == 64 and entry["precision"] == "qdq"
    assert entry["parity_executed_on"].startswith("QNNExecutionProvider, executed on this machine")
    for graph, placement in entry["placement"].items():
        assert placement["fully_placed"], (graph, placement["unsupported"])
        assert placement["partitions"] == 1 and placement["nodes_by_ep"] == {"QNNExecutionProvider": placement["total_nodes"]}
        assert placement["method"].startswith("onnxruntime session on the target EP")
    assert entry["graphs"]["cluster_0"]["inputs"][0]["shape"] == [1, 64]
    rows = json.loads((tmp_path / "b" / "parity.json").read_text())["targets"]["qnn-htp"]["rows"]
    assert all(r["passed"] for r in rows)
    assert all(r["min_cosine"] >= 0.99 for r in rows if r["min_cosine"] is not None)
    # the graphs are static-shape QDQ: uint16 activations, int8 per-channel MatMul weights
    graph = ir.load(str(tmp_path / "b" / "qnn-htp" / "cluster_0.onnx"))
    types = {n.inputs[0].dtype for n in graph.graph if n.op_type == "DequantizeLinear"}
    assert {ir.DataType.UINT16, ir.DataType.INT8} <= types


def test_classifier_logits_agree_on_htp(seqcls_student, router_encoder, masks, tmp_path):
    build(seqcls_student, router_encoder, masks, tmp_path / "b")
    rows = json.loads((tmp_path / "b" / "parity.json").read_text())["targets"]["qnn-htp"]["rows"]
    logits = [r for r in rows if r["output"] == "logits"]
    assert logits and all(r["agreement"] >= 0.99 for r in logits)


def test_lowbit_codes_reach_htp_exactly(router_encoder, masks, tmp_path):
    from factories import make_bert
    from test_lowbit import SIDECAR

    student = make_bert(tmp_path / "lowbit", family="st", seed=31)
    (student / "edgecompile.json").write_text(json.dumps(SIDECAR))
    result = build(student, router_encoder, masks, tmp_path / "b")
    placement = result.manifest["targets"]["qnn-htp"]["placement"]
    assert all(p["fully_placed"] for p in placement.values())
    graph = ir.load(str(tmp_path / "b" / "qnn-htp" / "dense.onnx"))
    codes = [n.inputs[0].const_value.numpy() for n in graph.graph
             if n.op_type == "DequantizeLinear" and n.name.endswith("lowbit/DequantizeLinear")]
    assert len(codes) == 6 * LAYERS  # every encoder Linear: Q, K, V, attention output, FFN in and out
    assert all(set(np.unique(c)) <= {-127, 0, 127} and len(np.unique(c)) > 1 for c in codes)
    lowbit = result.manifest["targets"]["qnn-htp"]["lowering"]["dense"]["lowbit"]
    assert "not exact codes" in lowbit["word_embeddings"]  # said plainly, not hidden
    rows = json.loads((tmp_path / "b" / "parity.json").read_text())["targets"]["qnn-htp"]["rows"]
    assert all(r["passed"] for r in rows)


def test_strict_placement_names_the_nodes_that_fell_off(st_student, router_encoder, masks, tmp_path, cli):
    no_gelu_fusion = tmp_path / "qnn-raw.toml"  # without qnn_preprocess, Erf stays and HTP refuses it
    no_gelu_fusion.write_text(QNN.replace('    "qnn_preprocess",                # folds static shape chains; Erf -> Gelu; ReduceL2/Div -> LpNormalization\n', ""))
    out = tmp_path / "b"
    code, _, err = cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", out,
                       "--target", no_gelu_fusion, "-q")
    assert code == 3 and not out.exists()
    assert "placement failed on 'qnn-htp'" in err
    assert "Erf x" in err and "Operators of type `Erf` are not supported" in err


def test_missing_plugin_names_the_install_command(st_student, router_encoder, masks, tmp_path, cli, monkeypatch):
    from dataclasses import replace

    from edgecompile.runtime import sessions as runtime

    qnn = runtime.PLUGIN_EPS["QNNExecutionProvider"]
    monkeypatch.setitem(runtime.PLUGIN_EPS, "QNNExecutionProvider", replace(qnn, module="onnxruntime_qnn_not_installed"))
    code, _, err = cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b",
                       "--target", "qnn-htp", "-q")
    assert code == 4 and "install it with: pip install onnxruntime-qnn" in err and "Traceback" not in err


def test_sample_longer_than_the_fixed_sequence_is_reported(st_student, router_encoder, masks, tmp_path, cli):
    short = tmp_path / "qnn-32.toml"  # shorter than the tiny model's own max_seq_length (64)
    short.write_text(QNN.replace("sequence = 64", "sequence = 32"))
    samples = tmp_path / "samples.txt"
    samples.write_text("short one\n" + " ".join(["word"] * 40) + "\n")
    code, _, err = cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b",
                       "--target", short, "--samples", samples, "-q")
    assert code == 2 and "samples.txt: line 2" in err and "at most 32 tokens" in err and "not truncated silently" in err


def test_epcontext_models_are_cached_and_identical(st_student, router_encoder, masks, tmp_path):
    import onnx

    cached = tmp_path / "qnn-ctx.toml"
    cached.write_text(QNN.replace("shared_weights = true", "shared_weights = true\nepcontext = true"))
    result = build(st_student, router_encoder, masks, tmp_path / "b", target=cached)
    graphs = result.manifest["targets"]["qnn-htp"]["graphs"]
    for name, info in graphs.items():
        model = onnx.load(str(tmp_path / "b" / info["epcontext"]))
        assert [n.op_type for n in model.graph.node] == ["EPContext"], name  # the compiled HTP program, embedded
        assert info["epcontext"] in result.manifest["files"]
