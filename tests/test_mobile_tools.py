"""ORT-format emission (edgecompile.lowering.ortformat) and static placement (edgecompile.check.placement_static) on a tiny
BERT exported by the project's exporter, dynamic and fixed to batch 1 x sequence 32."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from factories import make_bert
from onnx import TensorProto, helper

from edgecompile.check.placement import ESTIMATED
from edgecompile.lowering.ortformat import OrtConversionError, convert_to_ort, ort_content_digest, write_required_operators_config
from edgecompile.check.placement_static import CHECKERS, DYNAMIC_SHAPE, static_placement

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
ATTENTION_MATMULS = {f"/model/encoder/layer.{i}/attention/self/{m}" for i in (0, 1) for m in ("MatMul", "MatMul_1")}


def _fix_shapes(src: Path, dst: Path, batch: int, seq: int) -> None:
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(src))
    for name in INPUTS:
        make_input_shape_fixed(model.graph, name, [batch, seq])
    fix_output_shapes(model)
    onnx.save(model, str(dst))


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> SimpleNamespace:
    from edgecompile.families.bert import export_student
    from edgecompile.families import load_student
    from edgecompile.families.bert_model import load_student_module

    root = tmp_path_factory.mktemp("mobile")
    student = make_bert(root / "student", family="bert", seed=7)
    exported = export_student(load_student_module(load_student(student)))
    ns = SimpleNamespace(root=root, vocab=json.loads((student / "config.json").read_text())["vocab_size"])
    ns.dynamic = root / "dynamic.onnx"
    ir.save(exported, ns.dynamic)
    (root / "external").mkdir()
    ns.external = root / "external" / "model.onnx"
    ir.save(exported, ns.external, external_data="weights.bin")
    ns.fixed = root / "fixed.onnx"
    _fix_shapes(ns.dynamic, ns.fixed, 1, 32)
    ns.dynamic_ort, ns.fixed_ort = root / "ort" / "dynamic.ort", root / "ort" / "fixed.ort"
    convert_to_ort(ns.dynamic, ns.dynamic_ort)
    convert_to_ort(ns.fixed, ns.fixed_ort)
    return ns


def _feeds(session: ort.InferenceSession, vocab: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = [d if isinstance(d, int) else (batch, seq)[k] for k, d in enumerate(session.get_inputs()[0].shape)]
    mask = np.ones(shape, np.int64)
    mask[-1, shape[1] // 2:] = 0  # padding in the last row
    return {"input_ids": rng.integers(0, vocab, shape, dtype=np.int64), "attention_mask": mask,
            "token_type_ids": rng.integers(0, 2, shape, dtype=np.int64)}


def _session(path: Path, level: ort.GraphOptimizationLevel | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if level is not None:
        options.graph_optimization_level = level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    return session


def _assert_bitwise_equal(onnx_path: Path, ort_path: Path, vocab: int, batch: int, seq: int) -> None:
    reference = _session(onnx_path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    candidate = _session(ort_path)
    assert [o.name for o in candidate.get_outputs()] == ["last_hidden_state", "pooler_output"]
    for seed in range(2):
        feeds = _feeds(reference, vocab, batch, seq, seed)
        for expected, got in zip(reference.run(None, feeds), candidate.run(None, feeds), strict=True):
            assert expected.shape == got.shape and expected.dtype == got.dtype
            assert expected.tobytes() == got.tobytes()


def _ort_node_count(path: Path) -> int:
    from edgecompile.lowering.ortformat import _root

    return _root(path).Model().Graph().NodesLength()


# ---------------------------------------------------------------------------------------------- ortformat
@pytest.mark.parametrize("variant, batch, seq", [("dynamic", 2, 16), ("fixed", 1, 32)])
def test_ort_loads_on_cpu_and_is_bitwise_equal_to_onnx_at_basic(bert, variant, batch, seq):
    onnx_path, ort_path = getattr(bert, variant), getattr(bert, f"{variant}_ort")
    assert ort_path.read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier of an ORT-format model
    _assert_bitwise_equal(onnx_path, ort_path, bert.vocab, batch, seq)


def test_convert_writes_exactly_the_target_and_raises_clearly(bert, tmp_path):
    out = tmp_path / "new" / "m.ort"
    convert_to_ort(bert.dynamic, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.ort"]

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(OrtConversionError, match="broken.onnx"):
        convert_to_ort(broken, tmp_path / "broken.ort")
    assert not (tmp_path / "broken.ort").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx", "new"]
    with pytest.raises(ValueError, match="basic"):
        convert_to_ort(bert.dynamic, tmp_path / "x.ort", level="fast")


def test_content_digest_is_stable_and_sensitive(bert, tmp_path):
    again = tmp_path / "again.ort"
    convert_to_ort(bert.dynamic, again)
    assert ort_content_digest(again) == ort_content_digest(bert.dynamic_ort)
    assert ort_content_digest(bert.fixed_ort) != ort_content_digest(bert.dynamic_ort)

    model = onnx.load(str(bert.dynamic))
    bias = next(t for t in model.graph.initializer if t.name.endswith("layer.1.output.dense.bias"))
    values = onnx.numpy_helper.to_array(bias).copy()
    values[0] += 1e-3
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    changed = tmp_path / "changed.onnx"
    onnx.save(model, str(changed))
    convert_to_ort(changed, tmp_path / "changed.ort")
    assert ort_content_digest(tmp_path / "changed.ort") != ort_content_digest(bert.dynamic_ort)

    with pytest.raises(ValueError, match="not an ORT-format model"):
        ort_content_digest(bert.dynamic)


def test_external_data_input_gives_self_contained_ort(bert, tmp_path):
    stored = {t.name: t for t in onnx.load(str(bert.external), load_external_data=False).graph.initializer}
    word_embeddings = stored["model.embeddings.word_embeddings.weight"]
    assert word_embeddings.data_location == TensorProto.EXTERNAL and not word_embeddings.raw_data
    assert (bert.external.parent / "weights.bin").is_file()
    convert_to_ort(bert.external, tmp_path / "built" / "model.ort")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "built" / "model.ort", alone / "model.ort")  # nothing else next to it
    _assert_bitwise_equal(bert.dynamic, alone / "model.ort", bert.vocab, 2, 16)
    assert ort_content_digest(alone / "model.ort") == ort_content_digest(bert.dynamic_ort)


def _packed_weight_model(path: Path) -> None:
    """A 4-bit packed uint8 weight unpacked in-graph (BitwiseAnd / BitShift / Concat / Cast) then MatMul."""
    packed = np.random.default_rng(0).integers(0, 256, (64, 32), dtype=np.uint8)
    nodes = [
        helper.make_node("BitwiseAnd", ["packed", "low_mask"], ["low"]),
        helper.make_node("BitShift", ["packed", "four"], ["high"], direction="RIGHT"),
        helper.make_node("Concat", ["low", "high"], ["codes"], axis=1),
        helper.make_node("Cast", ["codes"], ["w"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "packed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [onnx.numpy_helper.from_array(packed, "packed"),
         onnx.numpy_helper.from_array(np.array(15, np.uint8), "low_mask"),
         onnx.numpy_helper.from_array(np.array(4, np.uint8), "four")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _config_ops(path: Path) -> dict[str, set[str]]:
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    required, _ = parse_config(str(path))
    return {domain: set().union(*by_opset.values()) for domain, by_opset in required.items()}


def test_fold_constants_false_keeps_packed_weights(tmp_path):
    _packed_weight_model(tmp_path / "packed.onnx")
    convert_to_ort(tmp_path / "packed.onnx", tmp_path / "folded.ort")
    convert_to_ort(tmp_path / "packed.onnx", tmp_path / "packed.ort", fold_constants=False)
    assert (tmp_path / "packed.ort").stat().st_size < (tmp_path / "folded.ort").stat().st_size / 2
    write_required_operators_config([tmp_path / "folded.ort"], tmp_path / "folded.config")
    write_required_operators_config([tmp_path / "packed.ort"], tmp_path / "packed.config")
    assert _config_ops(tmp_path / "folded.config") == {"ai.onnx": {"MatMul"}}
    assert {"BitShift", "BitwiseAnd", "Cast", "MatMul"} <= _config_ops(tmp_path / "packed.config")["ai.onnx"]
    # A loaded .ort is not constant-folded again: the packed one unpacks at every run, and its MatMul (B not
    # an initializer) may round differently, so it equals the .onnx run with the same disabled optimizer.
    x = {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    same_graph = ort.InferenceSession(str(tmp_path / "packed.onnx"), options, providers=["CPUExecutionProvider"],
                                      disabled_optimizers=["ConstantFolding"]).run(None, x)[0]
    folded, packed = (_session(tmp_path / n).run(None, x)[0] for n in ("folded.ort", "packed.ort"))
    assert packed.tobytes() == same_graph.tobytes()
    np.testing.assert_allclose(packed, folded, rtol=1e-5, atol=1e-5)


def test_required_operators_config_unions_and_is_reproducible(bert, tmp_path):
    _packed_weight_model(tmp_path / "packed.onnx")
    convert_to_ort(tmp_path / "packed.onnx", tmp_path / "packed.ort", fold_constants=False)
    models = [bert.dynamic_ort, bert.fixed_ort, tmp_path / "packed.ort"]
    write_required_operators_config(models, tmp_path / "all.config")
    ops = _config_ops(tmp_path / "all.config")
    assert {"MatMul", "LayerNormalization", "Gather", "Erf", "Softmax", "Gemm", "BitShift"} <= ops["ai.onnx"]
    assert set(ops) == {"ai.onnx"}  # basic level: no com.microsoft fusions baked in
    singles = []
    for i, model in enumerate(models):
        write_required_operators_config([model], tmp_path / f"{i}.config")
        singles.append(_config_ops(tmp_path / f"{i}.config")["ai.onnx"])
    assert ops["ai.onnx"] == set().union(*singles)
    assert "BitShift" not in singles[0]

    text = (tmp_path / "all.config").read_text()
    assert "/" not in text and str(tmp_path) not in text
    other = tmp_path / "elsewhere"
    sources = [(bert.dynamic, True), (bert.fixed, True), (tmp_path / "packed.onnx", False)]
    for model, (source, fold) in zip(models, sources, strict=True):  # fresh conversions (other bytes), other folder
        convert_to_ort(source, other / model.name, fold_constants=fold)
    write_required_operators_config([other / m.name for m in models], other / "all.config")
    assert (other / "all.config").read_bytes() == (tmp_path / "all.config").read_bytes()
    with pytest.raises(ValueError, match="not an ORT-format model"):
        write_required_operators_config([bert.dynamic], tmp_path / "bad.config")


# ------------------------------------------------------------------------------------------ placement
@pytest.fixture(scope="module")
def placements(bert) -> dict[tuple[str, str], object]:
    return {(variant, checker): static_placement(getattr(bert, variant), checker, variant)
            for variant in ("dynamic", "fixed") for checker in CHECKERS}


def _unsupported(report, op_type: str) -> dict[str, set[str]]:
    return {u.reason: set(u.nodes) for u in report.unsupported if u.op_type == op_type}


@pytest.mark.parametrize("checker", list(CHECKERS))
def test_placement_report_is_consistent(bert, placements, checker):
    for variant in ("dynamic", "fixed"):
        report = placements[variant, checker]
        assert report.method == ESTIMATED and report.graph == variant and report.ep == CHECKERS[checker]
        assert set(report.nodes_by_ep) == {CHECKERS[checker], "CPUExecutionProvider"}
        assert report.total_nodes == _ort_node_count(getattr(bert, f"{variant}_ort"))  # the graph the .ort holds
        assert sum(report.nodes_by_ep.values()) == report.total_nodes
        listed = [n for u in report.unsupported for n in u.nodes]
        assert len(listed) == len(set(listed)) == report.nodes_by_ep["CPUExecutionProvider"]
        assert 0 < report.partitions <= report.on_target
        assert not report.fully_placed
        assert json.loads(json.dumps(report.to_dict()))["method"] == ESTIMATED
    assert placements["dynamic", checker].dynamic_inputs == INPUTS
    assert placements["fixed", checker].dynamic_inputs == []


@pytest.mark.parametrize("checker", ["nnapi", "coreml-mlprogram", "coreml-neuralnetwork"])
def test_dynamic_shapes_place_little_fixed_shapes_more(placements, checker):
    dynamic, fixed = placements["dynamic", checker], placements["fixed", checker]
    assert dynamic.on_target < 0.2 * dynamic.total_nodes
    assert any(u.reason == DYNAMIC_SHAPE for u in dynamic.unsupported)
    assert not any(u.reason == DYNAMIC_SHAPE for u in fixed.unsupported)
    assert fixed.on_target > 4 * dynamic.on_target


def test_coreml_mlprogram_fixed_is_nearly_one_partition(placements):
    report = placements["fixed", "coreml-mlprogram"]
    assert report.on_target >= 0.9 * report.total_nodes and report.partitions <= 2
    assert {u.op_type for u in report.unsupported} == {"Gather"}  # the wheel's MLProgram table lacks Gather
    assert any("Core ML 5" in n for n in report.notes) and any("under-reported" in n for n in report.notes)


def test_nnapi_fixed_reasons(placements):
    report = placements["fixed", "nnapi"]
    layernorm, gather = _unsupported(report, "LayerNormalization"), _unsupported(report, "Gather")
    assert set(layernorm) == {"op not supported by NNAPI"} and len(layernorm["op not supported by NNAPI"]) == 5
    assert "/model/embeddings/word_embeddings/Gather" in gather["Gather indices must be constant unless int32"]
    assert any("API 27" in n for n in report.notes)


def test_coreml_neuralnetwork_needs_constant_matmul_b(placements):
    report = placements["fixed", "coreml-neuralnetwork"]
    assert _unsupported(report, "MatMul") == {"MatMul input B must be constant": ATTENTION_MATMULS}
    assert "op not supported by Core ML NeuralNetwork" in _unsupported(report, "LayerNormalization")


@pytest.mark.parametrize("variant", ["dynamic", "fixed"])
def test_xnnpack_claims_constant_weight_matmuls(placements, variant):
    report = placements[variant, "xnnpack"]
    assert _unsupported(report, "MatMul") == {"MatMul B must be a constant initializer": ATTENTION_MATMULS}
    assert not _unsupported(report, "Gemm")  # the pooler
    assert "op not supported by XNNPACK" in _unsupported(report, "LayerNormalization")
    softmax = _unsupported(report, "Softmax")
    if variant == "dynamic":  # 12 weight MatMuls + pooler Gemm
        assert report.on_target == 13 and set(softmax) == {"Softmax last dim must be fixed"}
    else:  # + both Softmaxes once the last dim is fixed
        assert report.on_target == 15 and not softmax
    assert any("re-implemented" in n for n in report.notes)


def test_unknown_checker_raises(bert):
    with pytest.raises(ValueError, match=r"'qnn'.*nnapi.*coreml-mlprogram.*coreml-neuralnetwork.*xnnpack"):
        static_placement(bert.fixed, "qnn", "fixed")


def test_placement_is_quiet_and_leaves_globals_alone(bert, capfd):
    handlers, level = list(logging.getLogger().handlers), logging.getLogger().level
    node_hash = onnx.NodeProto.__dict__.get("__hash__", "absent")
    capfd.readouterr()
    report = static_placement(bert.external, "nnapi", "external")  # external data is read by onnxruntime
    assert capfd.readouterr() == ("", "")
    assert logging.getLogger().handlers == handlers and logging.getLogger().level == level
    assert onnx.NodeProto.__dict__.get("__hash__", "absent") == node_hash
    assert report.total_nodes == _ort_node_count(bert.dynamic_ort)


def test_fresh_process_keeps_logging_and_nodeproto_untouched(bert, tmp_path):
    """Imports included: onnxruntime.tools.ort_format_model calls logging.basicConfig() at import, and the
    checker patches onnx.NodeProto.__hash__; neither may leak out of our modules."""
    import subprocess
    import sys

    script = f"""
import logging, onnx
from pathlib import Path
from edgecompile.lowering.ortformat import ort_content_digest, write_required_operators_config
from edgecompile.check.placement_static import static_placement
ort_content_digest(Path({str(bert.fixed_ort)!r}))
write_required_operators_config([Path({str(bert.fixed_ort)!r})], Path({str(tmp_path / "x.config")!r}))
static_placement(Path({str(bert.fixed)!r}), "xnnpack", "fixed")
assert not logging.getLogger().handlers, logging.getLogger().handlers
assert "__hash__" not in onnx.NodeProto.__dict__
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
