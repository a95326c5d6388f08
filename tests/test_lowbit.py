"""Binary / ternary students (XTC W1A8) lowered to integer kernels: reference rules, rewrites, build, bad input."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from conftest import LAYERS, centroids, gates
from factories import make_bert, redundancy_clean_like, write_masks
from edgecompile.passes.lower_lowbit_linears import ActivationQuant, LowerLowBitLinears
from edgecompile.passes.packing import BIN1, TERN2, pack, unpack
from edgecompile.passes.provenance import set_module
from edgecompile.reference.lowbit import (
    QuantLinear,
    fake_quantize_weight,
    quantize_weight,
    quantize_weight_ste,
    recover_codes,
)

RNG = np.random.default_rng(11)


# --- the numeric rules -------------------------------------------------------------------------


def test_binary_rule_and_sign_of_zero():
    w = torch.tensor([[0.5, -1.5, 0.0, 2.0], [1.0, 1.0, -1.0, 0.0]])
    codes, alpha = quantize_weight(w, 1, "row")
    assert codes.tolist() == [[1, -1, 0, 1], [1, 1, -1, 0]]
    torch.testing.assert_close(alpha.reshape(-1), torch.tensor([1.0, 0.75]))
    codes, alpha = quantize_weight(w, 1, "matrix")
    torch.testing.assert_close(alpha.reshape(-1), torch.tensor([0.875]))


def test_ternary_rule():
    w = torch.tensor([[0.1, -1.0, 0.5, 2.0]])  # mean|w| = 0.9, threshold 0.63
    codes, alpha = quantize_weight(w, 2, "row")
    assert codes.tolist() == [[0, -1, 0, 1]]
    torch.testing.assert_close(alpha.reshape(-1), torch.tensor([1.5]))
    zero_codes, zero_alpha = quantize_weight(torch.zeros(2, 3), 2, "row")
    assert float(zero_alpha.abs().sum()) == 0 and not torch.isnan(zero_alpha).any()


def test_groups_are_contiguous_chunks_like_deepspeed():
    w = torch.arange(1.0, 9.0).reshape(4, 2)
    _, alpha = quantize_weight(w, 1, 2)  # 2 groups of 2 rows each
    torch.testing.assert_close(alpha.reshape(-1), torch.tensor([2.5, 6.5]))


def test_straight_through_gradient():
    w = torch.randn(3, 5, requires_grad=True)
    quantize_weight_ste(w, 1, "row").sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(3, 5))


def test_recover_codes_is_exact_or_refuses():
    w = fake_quantize_weight(torch.randn(6, 10), 2, "row").numpy()
    recovered = recover_codes(w)
    assert recovered is not None and recovered.runs == 1 and np.array_equal(recovered.codes * recovered.alpha, w)
    nearly = w.copy()
    nearly[0, np.flatnonzero(nearly[0])[0]] *= np.float32(1 + 1e-6)
    assert recover_codes(nearly) is None


@pytest.mark.parametrize("scheme,values", [(BIN1, (-1, 1)), (TERN2, (-1, 0, 1))])
def test_packing_round_trip(scheme, values):
    codes = RNG.choice(values, size=(7, 13)).astype(np.int8)
    assert np.array_equal(unpack(pack(codes, scheme), scheme, codes.size).reshape(codes.shape), codes)


# --- one lowered Linear against QuantLinear: ties, zero rows, static, packing folded -----------


def single_linear_graph(weight: np.ndarray, bias: np.ndarray) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, weight.shape[1]]))
    w = ir.Value(name="w", const_value=ir.tensor(np.ascontiguousarray(weight.T)))
    b = ir.Value(name="b", const_value=ir.tensor(bias))
    matmul = ir.node("MatMul", [x, w], name="/lin/MatMul")
    add = ir.node("Add", [matmul.outputs[0], b], name="/lin/Add")
    add.outputs[0].name = "y"
    for n in (matmul, add):
        set_module(n, "lin")
    graph = ir.Graph([x], [add.outputs[0]], nodes=[matmul, add], initializers=[w, b], opset_imports={"": 17})
    return ir.Model(graph, ir_version=9)


@pytest.mark.parametrize("groups", ["row", 30])  # 30 DeepSpeed groups of 8 values: three alphas per row
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("mode,scale", [("dynamic", None), ("static", 0.037)])
def test_lowered_linear_matches_reference_exactly(bits, mode, scale, groups, tmp_path):
    linear = torch.nn.Linear(24, 10)
    with torch.no_grad():
        linear.weight.copy_(fake_quantize_weight(torch.randn(10, 24), bits, groups))
        linear.weight[0, :3] = 0.0  # exact zeros in the codes (sign(0) = 0)
    x = (RNG.standard_normal((2, 5, 24)) * 2).astype(np.float32)
    x[0, 1] = 0.0  # an all-zero input row: scale 0 must not make NaN
    x[1, 2] = np.round(x[1, 2] * 4) / 4  # quarter values: x / s lands on .5 ties
    x[1, 2, 0] = 32.0  # so that s = 0.25 exactly and many x / s are exact ties
    model = single_linear_graph(linear.weight.detach().numpy(), linear.bias.detach().numpy())
    LowerLowBitLinears({"lin": ActivationQuant(mode, scale)})(model)
    from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    NameFixPass()(model)
    ops = Counter(n.op_type for n in model.graph)
    assert ops["MatMulIntegerToFloat"] == (1 if groups == "row" else 3) and ops["MatMul"] == 0
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    with torch.no_grad():
        expected = QuantLinear(linear, mode, scale)(torch.from_numpy(x)).numpy()
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[0, 1], linear.bias.detach().numpy())
    # the packed codes were expanded once, at session creation
    optimized = ir.load(str(tmp_path / "optimized.onnx"))
    assert not [n for n in optimized.graph if n.op_type in ("Gather", "Cast", "Reshape") and n.inputs[0].is_initializer() and n.inputs[0].dtype == ir.DataType.UINT8]


def test_sub_row_groups_are_recovered_as_runs_even_after_pruning():
    from edgecompile.reference.lowbit import MAX_RUNS_PER_ROW

    w = fake_quantize_weight(torch.randn(8, 12), 1, 16).numpy()  # DeepSpeed: 16 chunks of 6, two per row
    assert recover_codes(w) is None  # not one alpha per row
    recovered = recover_codes(w, MAX_RUNS_PER_ROW)
    assert recovered.starts == (0, 6, 12) and recovered.alpha.shape == (8, 2)
    assert np.array_equal(recovered.codes * np.repeat(recovered.alpha, 6, axis=1), w)
    kept = w[:, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]]  # input feature 5 pruned: runs of 5 and 6
    assert recover_codes(kept, 3) is None  # no equal split into at most 3 runs
    uneven = recover_codes(kept, 3, uneven=True)
    assert uneven.starts == (0, 5, 11) and np.array_equal(uneven.alpha, recovered.alpha)
    one_off = w.copy()
    one_off[3, 2] *= np.float32(1.001)  # a corrupted value is not a run of its own
    assert recover_codes(one_off, MAX_RUNS_PER_ROW) is None


@pytest.mark.parametrize("zeros", [0.0, 0.5, 0.9, 0.97, 0.995, 1.0])
def test_sparsity_never_makes_a_float_tensor_look_lowbit(zeros):
    from edgecompile.reference.lowbit import LOWBIT_MIN_EVIDENCE, lowbit_evidence

    w = torch.randn(64, 384) * 0.02
    w[torch.rand(64, 384) < zeros] = 0.0
    assert lowbit_evidence(w.numpy()) < LOWBIT_MIN_EVIDENCE
    bf16 = w.to(torch.bfloat16).float().numpy()  # few distinct magnitudes, still not low-bit
    assert lowbit_evidence(bf16) < LOWBIT_MIN_EVIDENCE


@pytest.mark.parametrize("bits,groups", [(1, "row"), (2, "row"), (1, 128), (2, 384)])
def test_lowbit_tensors_show_evidence_even_one_value_off(bits, groups):
    from edgecompile.reference.lowbit import LOWBIT_MIN_EVIDENCE, describe_mismatch, lowbit_evidence

    w = fake_quantize_weight(torch.randn(64, 384, generator=torch.Generator().manual_seed(0)), bits, groups).numpy()
    assert lowbit_evidence(w) >= LOWBIT_MIN_EVIDENCE
    # (a fixed draw: a ternary run of 64 values can hold fewer non-zeros than a segment needs, which counts as off too)
    assert describe_mismatch(w)[0] == 0
    # one value moved off its run's magnitude (downwards: moved up it would become the run's magnitude and every other
    # value of the run would be the one off)
    w[5, 200 + np.flatnonzero(w[5, 200:])[0]] *= np.float32(0.9999)
    assert lowbit_evidence(w) >= LOWBIT_MIN_EVIDENCE and describe_mismatch(w)[0] == 1


def test_float_activation_linear_keeps_the_float_weight_packed(tmp_path):
    linear = torch.nn.Linear(24, 10)
    with torch.no_grad():
        linear.weight.copy_(fake_quantize_weight(torch.randn(10, 24), 1, 30))
    weight, bias = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    x = RNG.standard_normal((2, 5, 24)).astype(np.float32)
    plain = ort.InferenceSession(ir.to_proto(single_linear_graph(weight, bias)).SerializeToString(), providers=["CPUExecutionProvider"])
    model = single_linear_graph(weight, bias)
    lowering = LowerLowBitLinears({"lin": ActivationQuant("none")})
    lowering(model)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    assert not lowering.lowered and lowering.float_activations[0]["alphas_per_row"] == 3
    stored = [v.const_value for v in model.graph.initializers.values()]
    assert not [t for t in stored if t.dtype == ir.DataType.FLOAT and t.size >= weight.size]  # packed at rest
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, plain.run(None, {"x": x})[0])  # the float export's MatMul, bit for bit
    with torch.no_grad():
        np.testing.assert_array_equal(QuantLinear(linear, "none")(torch.from_numpy(x)).numpy(), linear(torch.from_numpy(x)).numpy())


def test_dequantize_lowering_splits_sub_row_groups_exactly():
    from edgecompile.passes.lowbit_weights_to_dequantize import LowBitWeightsToDequantize

    weight = fake_quantize_weight(torch.randn(10, 24), 2, 20).numpy()  # two alphas per row
    bias = RNG.standard_normal(10).astype(np.float32)
    model = single_linear_graph(weight, bias)
    LowBitWeightsToDequantize(["lin"])(model)
    ops = Counter(n.op_type for n in model.graph)
    assert ops["DequantizeLinear"] == 2 and ops["Slice"] == 2
    x = RNG.standard_normal((2, 5, 24)).astype(np.float32)
    options = ort.SessionOptions()  # the graph as written (the CPU EP would fuse DQ -> MatMul into its own int8 kernel)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight.T + bias, rtol=1e-5, atol=1e-6)


# --- whole builds --------------------------------------------------------------------------------


SIDECAR = {
    "format": "edgecompile-lowbit/1",
    "linear": [
        {"modules": ["encoder.layer.*.attention.self.*", "encoder.layer.*.attention.output.dense"], "bits": 1, "groups": "row", "activations": "dynamic"},
        {"modules": ["encoder.layer.*.intermediate.dense"], "bits": 2, "groups": "matrix", "activations": "dynamic"},
        {"modules": ["encoder.layer.[0-9].output.dense"], "bits": 1, "groups": 4, "activations": "static",
         "static_scales": {"encoder.layer.0.output.dense": 0.03, "encoder.layer.1.output.dense": 0.02}},
    ],
    "word_embeddings": {"bits": 1},
}


@pytest.fixture(scope="module")
def declared_student(tmp_path_factory) -> Path:
    path = make_bert(tmp_path_factory.mktemp("lowbit") / "declared", family="st", seed=21)
    (path / "edgecompile.json").write_text(json.dumps(SIDECAR))
    return path


@pytest.fixture(scope="module")
def cleaned_student(tmp_path_factory) -> Path:
    path = make_bert(tmp_path_factory.mktemp("lowbit") / "cleaned", family="seqcls", seed=22)
    return redundancy_clean_like(path, ternary_ffn=True)


def lowbit_masks(path: Path) -> Path:
    neurons = (RNG.random((LAYERS, 64)) > 0.3) * RNG.uniform(0.2, 1.0, (LAYERS, 64))
    clusters = {
        0: gates(blocks=np.ones((LAYERS, 2))),
        1: gates(blocks=[[0, 1], [0.5, 0]]),
        2: gates(heads=[[1, 0, 0.5, 1], [0, 0, 0, 0]], neurons=neurons),
    }
    return write_masks(path, clusters, centroids(3))


def build(student, router_encoder, tmp_path, progress=None):
    from edgecompile.build import BuildRequest, build as run

    return run(BuildRequest(student, lowbit_masks(tmp_path / "m.safetensors"), router_encoder, tmp_path / "bundle"), progress)


def integer_rows(bundle: Path) -> list[dict]:
    rows = json.loads((bundle / "parity.json").read_text())["targets"]["cpu"]["rows"]
    return [r for r in rows if "integer Linear groups" in r["output"]]


def test_declared_latent_student_with_pruned_clusters(declared_student, router_encoder, tmp_path):
    result = build(declared_student, router_encoder, tmp_path)
    manifest = result.manifest
    precision = manifest["student"]["precision"]
    assert precision["lowbit"]["source"] == "edgecompile.json"
    assert {(p["bits"], p["activations"].split()[-1]) for p in precision["lowbit"]["linear"]} == {(1, "dynamic"), (2, "dynamic"), (1, "static")}
    assert "pooler" in precision["fp32"] and "LayerNorms" in precision["fp32"]
    rows = integer_rows(tmp_path / "bundle")
    assert len(rows) == 4 and all(r["agreement"] == 1.0 and r["max_relative_error"] <= 1e-6 for r in rows)
    lowbit = {c["graph"]: c["lowbit"]["cpu"] for c in manifest["clusters"]}
    assert lowbit["cluster_0"]["linear_weight_bytes"]["ratio"] >= 12  # tiny model: alphas weigh more
    assert lowbit["cluster_0"]["word_embeddings"]["packing"] == "bin1"
    assert {g["kernel"] for g in lowbit["cluster_0"]["linear_groups"]} == {"MatMulIntegerToFloat"}
    assert {g["packing"] for g in lowbit["cluster_0"]["linear_groups"]} == {"bin1", "tern2"}
    # cluster 2 has soft head / neuron gates on low-bit projections: applied as Mul, weights stay codes * alpha
    graph = ir.load(str(tmp_path / "bundle" / "cpu" / "cluster_2.onnx"))
    assert any(n.name.endswith("input_gate/Mul") for n in graph.graph)
    rows = json.loads((tmp_path / "bundle" / "parity.json").read_text())["targets"]["cpu"]["rows"]
    assert all(r["passed"] for r in rows)


def test_redundancy_clean_checkpoint_is_detected_and_the_activation_assumption_said(cleaned_student, router_encoder, tmp_path, capsys):
    from edgecompile.progress import Progress

    result = build(cleaned_student, router_encoder, tmp_path, Progress())
    lowbit = result.manifest["student"]["precision"]["lowbit"]
    assert lowbit["source"] == "detected"
    # the checkpoint cannot tell how activations were trained: the build says what it assumed, and how to choose
    said = [line for line in capsys.readouterr().err.splitlines() if "low-bit (detected)" in line]
    assert len(said) == 1 and "activations assumed 8-bit symmetric dynamic per token (XTC's default" in said[0]
    assert "declare \"activations\" in edgecompile.json" in said[0]
    assert lowbit["activations_from"].startswith("assumed 8-bit symmetric dynamic per token")
    bits = {p["module"].split(".")[-1] if "self" in p["module"] else p["module"].split(".")[-2]: p["bits"] for p in lowbit["linear"]}
    assert bits["intermediate"] == 2 and bits["query"] == 1
    assert all(p["activations"] == "8-bit symmetric dynamic" for p in lowbit["linear"])
    assert lowbit["word_embeddings"]["bits"] == 1
    assert all(r["agreement"] == 1.0 for r in integer_rows(tmp_path / "bundle"))
    rows = json.loads((tmp_path / "bundle" / "parity.json").read_text())["targets"]["cpu"]["rows"]
    assert all(r["agreement"] == 1.0 for r in rows if r["output"] == "logits")


def test_deepspeed_groups_that_cut_rows_compile_exactly(cli, router_encoder, tmp_path):
    student = make_bert(tmp_path / "ds", family="seqcls", seed=25)
    # quantize_groups = 64: half a row of Q/K/V and of output.dense (two alphas per row), one row of intermediate
    redundancy_clean_like(student, ternary_ffn=True, groups=64)
    out = tmp_path / "bundle"
    code, _, err = cli("build", student, "--masks", lowbit_masks(tmp_path / "m.safetensors"), "--router-encoder", router_encoder,
                       "--out", out, "-q")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    groups = {p["module"]: (p["bits"], p["groups"]) for p in manifest["student"]["precision"]["lowbit"]["linear"]}
    layer = "bert.encoder.layer.0"
    assert groups[f"{layer}.attention.self.query"] == (1, 64) and groups[f"{layer}.output.dense"] == (1, 64)
    assert groups[f"{layer}.intermediate.dense"] == (2, "row")
    lowered = {c["graph"]: c["lowbit"]["cpu"]["linear_groups"] for c in manifest["clusters"]}
    assert {g["alphas_per_row"] for g in lowered["cluster_0"]} == {1, 2}
    rows = {(r["graph"], r["output"]): r for r in integer_rows(out)}
    # the checkpoint's own codes and alphas: integer sums identical to the reference built from its floats
    assert all(r["agreement"] == 1.0 and r["passed"] for r in rows.values())
    assert rows[("cluster_0", next(o for g, o in rows if g == "cluster_0"))]["max_relative_error"] <= 1e-6
    assert all(r["passed"] for r in json.loads((out / "parity.json").read_text())["targets"]["cpu"]["rows"])


def test_w1a32_student_compiles_with_float_activations_exactly(cli, router_encoder, tmp_path):
    """DeepSpeed binary weights trained without activation quantization: declared "none", compiled exactly."""
    student = make_bert(tmp_path / "w1a32", family="st", seed=26)
    redundancy_clean_like(student, groups=64)
    (student / "edgecompile.json").write_text(json.dumps({
        "format": "edgecompile-lowbit/1",
        "linear": [{"modules": ["encoder.layer.*"], "bits": 1, "groups": 64, "activations": "none", "stored": "quantized"}],
        "word_embeddings": {"bits": 1, "stored": "quantized"},
    }))
    out = tmp_path / "bundle"
    code, _, err = cli("build", student, "--masks", lowbit_masks(tmp_path / "m.safetensors"), "--router-encoder", router_encoder,
                       "--out", out, "-q")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    lowbit = manifest["student"]["precision"]["lowbit"]
    assert lowbit["activations_from"] == "declared in edgecompile.json"
    assert {p["activations"] for p in lowbit["linear"]} == {"none (float32)"} and len(lowbit["linear"]) == 12
    cpu = manifest["targets"]["cpu"]
    assert cpu["lowbit_graphs"] == []  # no quantized activations: every graph held to the strict fp32 tolerances
    report = cpu["lowering"]["cluster_0"]["lowbit"]
    assert report["linear_groups"] == [] and len(report["float_activation_linears"]) == 12
    assert report["linear_weight_bytes"]["ratio"] >= 12  # stored packed (tiny model: alphas weigh more)
    graph = ir.load(str(out / "cpu" / "cluster_0.onnx"))
    assert not [n for n in graph.graph if n.op_type in ("MatMulIntegerToFloat", "QuantizeLinear")]
    # against the checkpoint's own model (transformers, no edgecompile code): float activations, same weights
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(student))
    feed = dict(tokenizer(["a binary student without activation quantization"], return_tensors="np"))
    got = ort.InferenceSession(str(out / "cpu" / "dense.onnx"), providers=["CPUExecutionProvider"]).run(["token_embeddings"], feed)[0]
    with torch.no_grad():
        expected = BertModel.from_pretrained(str(student), add_pooling_layer=False)(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    assert float(np.abs(got - expected).max() / np.abs(expected).max()) <= 1e-5
    for command in ("verify", "inspect"):  # the commands that read a bundle accept the new fields
        code, _, err = cli(command, out)
        assert code == 0, err


# --- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def student_with(tmp_path, models_dir):
    base = models_dir / "lowbit_base"
    if not base.exists():
        make_bert(base, family="st", seed=23)

    def make(sidecar: dict | None = None, clean: bool = False) -> Path:
        path = tmp_path / "student"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(base, path)
        if clean:
            redundancy_clean_like(path)
        if sidecar is not None:
            (path / "edgecompile.json").write_text(json.dumps(sidecar))
        return path

    return make


def entry(**overrides):
    base = {"modules": ["encoder.layer.*.attention.self.query"], "bits": 1, "groups": "row", "activations": "dynamic"}
    base.update(overrides)
    return {"format": "edgecompile-lowbit/1", "linear": [base]}


@pytest.mark.parametrize(
    "sidecar,needles",
    [
        (entry(modules=["encoder.layer.*.atention.self.query"]), ["linear[0].modules", "no match", "encoder.layer.0"]),
        (entry(modules=["pooler.dense"]), ["no match"]),  # the ST student has no pooler: a name that does not exist
        (entry(bits=4), ["linear[0].bits", "1 (binary) or 2 (ternary)", "found 4"]),
        (entry(groups="column"), ["linear[0].groups", "'row', 'matrix'", "'column'"]),
        (entry(groups=5), ["groups for encoder.layer.0.attention.self.query", "dividing the weight's 32x32", "found 5"]),
        (entry(groups=1024), ["groups for encoder.layer.0.attention.self.query", "at most 8 alphas per row of 32 inputs", "found 1024 (groups of 1 values: 32 per row)"]),
        (entry(activations="static"), ["static_scales", "a scale for encoder.layer.0.attention.self.query", "found none"]),
        (entry(activations="static", static_scales={"encoder.layer.0.attention.self.query": 0.0, "encoder.layer.1.attention.self.query": 0.1}),
         ["static_scales[encoder.layer.0.attention.self.query]", "positive finite", "found 0.0"]),
        (entry(activations="static", static_scales={"encoder.layer.0.attention.self.query": -0.5, "encoder.layer.1.attention.self.query": 0.1}),
         ["positive finite", "found -0.5"]),
        (entry(activations="sometimes"), ["linear[0].activations", "'dynamic' or 'static'", "'none' (float)"]),
        (entry(activations="none", static_scales={"encoder.layer.0.attention.self.query": 0.1}),
         ["linear[0].static_scales", "none with none activations", "found 1 scales"]),
        (entry(stored="quantized"), ["tensor encoder.layer.0.attention.self.query.weight", "1-bit codes * alpha per row as declared", "values off"]),
        ({"format": "edgecompile-lowbit/2"}, ["'format'", "'edgecompile-lowbit/1'"]),
        ({"format": "edgecompile-lowbit/1", "layers": []}, ["key 'layers'", "unknown key"]),
    ],
)
def test_bad_lowbit_declarations(cli, student_with, router_encoder, masks_file, tmp_path, sidecar, needles):
    from test_bad_inputs import assert_one_line_error

    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))})
    out = tmp_path / "bundle"
    result = cli("build", student_with(sidecar), "--masks", masks, "--router-encoder", router_encoder, "--out", out, "-q")
    assert_one_line_error(result, "edgecompile.json" if "tensor" not in needles[0] else "model.safetensors", *needles)
    assert not out.exists()


def test_declared_binary_but_ternary_weights(cli, student_with, router_encoder, masks_file, tmp_path):
    from test_bad_inputs import assert_one_line_error

    path = student_with(entry(modules=["encoder.layer.0.intermediate.dense"], stored="quantized"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    name = "encoder.layer.0.intermediate.dense.weight"
    tensors[name] = fake_quantize_weight(tensors[name], 2, "row")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))})
    result = cli("build", path, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b", "-q")
    assert_one_line_error(result, "intermediate.dense.weight", "binary codes", "zeros (ternary?)")


def test_almost_lowbit_checkpoint_is_reported_not_rounded(cli, student_with, router_encoder, masks_file, tmp_path):
    from safetensors.torch import load_file, save_file

    from test_bad_inputs import assert_one_line_error

    path = student_with(clean=True)
    tensors = load_file(str(path / "model.safetensors"))
    name = "encoder.layer.1.attention.self.key.weight"
    tensors[name][3, 5] *= 1.0000003
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))})
    result = cli("build", path, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b", "-q")
    assert_one_line_error(result, "tensor encoder.layer.1.attention.self.key.weight", "exactly sign * alpha per row", "1 values off")


def test_pooler_and_classifier_stay_fp32(cli, router_encoder, masks_file, tmp_path):
    from test_bad_inputs import assert_one_line_error

    student = make_bert(tmp_path / "cls", family="seqcls", seed=24)
    (student / "edgecompile.json").write_text(json.dumps(entry(modules=["bert.pooler.dense"])))
    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))})
    result = cli("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b", "-q")
    assert_one_line_error(result, "(pooler, classifier and lm_head stay fp32)", "bert.pooler.dense")
