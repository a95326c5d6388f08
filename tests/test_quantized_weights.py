"""Block-quantized weights after pruning (`--weights int4|int8`, targets' [weights] table; passes/quantize_weights.py):
onnxruntime's own quantizer in the form onnxruntime-genai's builder emits, a parity contract against transformers with
the same dequantized weights (exact through an accuracy-level-0 twin), block-pruned clusters sharing every blob."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from factories import make_bert, make_decoder, write_masks
from test_bad_inputs import assert_one_line_error
from edgecompile.passes.quantize_weights import dequantize_blockwise, quantize_blockwise

LAYERS, HEADS, INTERMEDIATE = 4, 4, 256
TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_weights_are_what_matmulnbits_computes_with(bits):
    rng = np.random.default_rng(bits)
    weight = rng.standard_normal((96, 40)).astype(np.float32)
    packed, scales = quantize_blockwise(weight, bits, 32)
    dequantized = dequantize_blockwise(packed, scales, bits, 96)
    assert np.abs(dequantized - weight).max() <= np.abs(weight).max() / (2 ** (bits - 1) - 1)  # half a step of the widest block
    x = ir.Value(name="x", shape=ir.Shape([3, 96]), type=ir.TensorType(ir.DataType.FLOAT))
    b, s = ir.Value(name="b", const_value=ir.tensor(packed)), ir.Value(name="s", const_value=ir.tensor(scales))
    node = ir.node("MatMulNBits", [x, b, s], domain="com.microsoft",
                   attributes={"K": 96, "N": 40, "bits": bits, "block_size": 32, "accuracy_level": 0})
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[b, s], opset_imports={"": 17, "com.microsoft": 1})
    session = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = rng.standard_normal((3, 96)).astype(np.float32)
    assert np.array_equal(session.run(None, {"x": inputs})[0], inputs @ dequantized)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    router = make_bert(root / "router", family="st", seed=6, hidden=24, heads=2, intermediate=48)
    samples = root / "prompts.txt"
    samples.write_text("How do I reset my password?\nParis is the capital of France.\nOk\n", encoding="utf-8")
    rng = np.random.default_rng(3)
    masks = write_masks(root / "masks.safetensors", {
        0: {"blocks": np.ones((LAYERS, 2))},
        1: {"blocks": np.array([[1, 0], [0, 1], [1, 1], [0, 0.5]])},  # block pruning and a soft block gate
        2: {"heads": np.array([[0, 0, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0.5]]),  # groups, zeroed and soft heads
            "neurons": (rng.random((LAYERS, INTERMEDIATE)) > 0.4) * rng.uniform(0.3, 1.0, (LAYERS, INTERMEDIATE))},
    }, (rng.standard_normal((3, 24)) * 0.3).astype(np.float32))
    return root, router, samples, masks


@pytest.fixture(scope="module")
def built(setup):
    """The tiny Llama (tied embeddings) and Gemma 3 (output norms, q/k norms), int4 after pruning."""
    from edgecompile.build import BuildRequest, build

    root, router, samples, masks = setup
    out = {}
    for family in ("llama", "gemma3"):
        student = make_decoder(root / family, family, seed=11, intermediate=INTERMEDIATE, tied=True)
        out[family] = student, build(BuildRequest(student, masks, router, root / f"{family}_int4", samples=samples, weights="int4"))
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_int4_after_pruning_passes_its_parity_contract(built, family):
    _, result = built[family]
    table = result.table
    for graph in ("dense", "cluster_0", "cluster_1", "cluster_2"):
        # the lowering is exact: its float-activation twin matches transformers with the dequantized weights
        row = next(line for line in table.splitlines() if f"| cpu | {graph} | prefill_logits (weights exact: accuracy level 0) |" in line)
        assert float(row.split("|")[6]) < 1e-4, row
        assert f"| cpu | {graph} | greedy tokens (onnxruntime-genai vs onnxruntime) | 3 |" in table
    assert "FAIL" not in table
    target = result.manifest["targets"]["cpu"]
    assert target["target"]["linear_weights"]["format"] == "int4"
    assert target["quantized_graphs"] == ["cluster_0", "cluster_1", "cluster_2", "dense"]
    cost = target["quantization_cost"]
    assert cost["perplexity_fp32"] > 1 and cost["perplexity_quantized"] > 1 and 0 <= cost["greedy_token_agreement"] <= 1


def test_int4_graphs_are_matmulnbits_over_one_shared_table(built):
    student, result = built["llama"]
    out = result.out / "cpu" / "decoder"
    dense = onnx.load(str(out / "dense.onnx"), load_external_data=False)
    ops = [n.op_type for n in dense.graph.node]
    assert "MatMul" not in ops and ops.count("MatMulNBits") == LAYERS * 5 + 1  # packed qkv, o, gate, up, down per layer; lm_head
    nbits = {n.name: {a.name: (a.i if a.type == onnx.AttributeProto.INT else None) for a in n.attribute}
             for n in dense.graph.node if n.op_type == "MatMulNBits"}
    assert all(a["bits"] == 4 and a["block_size"] == 32 and a["accuracy_level"] == 4 for a in nbits.values())
    gather = next(n for n in dense.graph.node if n.op_type == "GatherBlockQuantized")  # tied: the lm_head's own blob
    lm_head = next(n for n in dense.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    reshape = next(n for n in dense.graph.node if n.output[0] == gather.input[0])
    assert reshape.input[0] == lm_head.input[1] and gather.input[2] == lm_head.input[2]

    def extents(graph: str) -> set:
        model = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False)
        return {(e["offset"], e["length"]) for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                for e in [{kv.key: kv.value for kv in t.external_data}]}

    # quantizing is deterministic: the cluster keeping everything adds no bytes; the block-pruned one only the scales
    # of the projection its soft gate (0.5) scales, whose 4-bit codes are the dense one's (quantizing is scale-invariant)
    assert extents("cluster_0") == extents("dense")
    added = extents("cluster_1") - extents("dense")
    assert len(added) == 1 and int(next(iter(added))[1]) == 64 * (INTERMEDIATE // 32) * 4  # down_proj scales [hidden, K / 32]
    assert extents("cluster_2") - extents("dense")  # sliced heads / neurons are quantized as the cluster keeps them
    fp32_bytes = sum(t.numel() * 4 for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(student / "model.safetensors")).values())
    assert sum(int(length) for _, length in extents("dense")) < fp32_bytes / 3  # 4-bit codes + fp32 scales per 32


def test_cpu_int4_lm8_keeps_the_unembedding_and_its_tied_embedding_in_8_bits_and_passes_parity(setup, tmp_path):
    """targets/cpu-int4-lm8.toml: every Linear 4-bit, the lm_head 8-bit, the tied embedding a GatherBlockQuantized over
    that 8-bit blob; the parity contract holds against the reference with those dequantized weights."""
    from edgecompile.build import BuildRequest, build

    root, router, samples, masks = setup
    student = make_decoder(tmp_path / "llama", "llama", seed=11, intermediate=INTERMEDIATE, tied=True)
    result = build(BuildRequest(student, masks, router, tmp_path / "bundle", targets=["cpu-int4-lm8"], samples=samples))
    assert "FAIL" not in result.table
    row = next(line for line in result.table.splitlines() if "| cpu-int4-lm8 | dense | prefill_logits (weights exact: accuracy level 0) |" in line)
    assert float(row.split("|")[6]) < 1e-4, row
    target = result.manifest["targets"]["cpu-int4-lm8"]
    assert target["target"]["linear_weights"]["lm_head_format"] == "int8" and target["quantization_cost"]["perplexity_quantized"] > 1
    dense = onnx.load(str(result.out / "cpu-int4-lm8" / "decoder" / "dense.onnx"), load_external_data=False)
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in dense.graph.node if n.op_type == "MatMulNBits"}
    assert {b for name, b in bits.items() if "lm_head" in name} == {8} and {b for name, b in bits.items() if "lm_head" not in name} == {4}
    gather = next(n for n in dense.graph.node if n.op_type == "GatherBlockQuantized")
    assert next(a.i for a in gather.attribute if a.name == "bits") == 8


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="onnxruntime-genai's model builder needs transformers 5")
def test_int4_dense_graph_computes_what_onnxruntime_genais_builder_writes(built, tmp_path):
    """The same checkpoint through onnxruntime-genai's own builder (-p int4): the same logits."""
    student, result = built["llama"]
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(student), "-o", str(tmp_path / "anchor"),
                    "-p", "int4", "-e", "cpu"], check=True, capture_output=True)
    ids = np.array([[0, 17, 45, 99, 120, 7, 3, 50]], np.int64)

    def logits(path, cache_dims) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values"):
                feed[i.name] = np.zeros((1, cache_dims[0], 0, cache_dims[1]), np.float32)
            elif i.name == "position_ids":
                feed[i.name] = np.arange(ids.shape[1])[None]
        return session.run(["logits"], feed)[0]

    config = json.loads((student / "config.json").read_text())
    dims = (config["num_key_value_heads"], config["hidden_size"] // config["num_attention_heads"])
    ours, anchor = logits(result.out / "cpu" / "decoder" / "dense.onnx", dims), logits(tmp_path / "anchor" / "model.onnx", dims)
    assert np.abs(ours - anchor).max() <= 1e-5 * np.abs(anchor).max()


def test_a_quantized_graph_whose_weights_are_off_fails_the_exact_row(setup, tmp_path, monkeypatch, cli):
    """The contract can fail: weights one quantization step off (a wrong lowering) are caught by the twin row (exit 3)."""
    import edgecompile.passes.quantize_weights as quantize

    root, router, samples, masks = setup
    real = quantize.quantize_blockwise

    def off_by_one(weight, bits, block_size):
        packed, scales = real(weight, bits, block_size)
        return packed, scales * np.float32(1.01)

    monkeypatch.setattr(quantize, "quantize_blockwise", off_by_one)
    monkeypatch.setattr(quantize, "dequantize_blockwise", lambda p, s, b, k, real=quantize.dequantize_blockwise: real(p, s / np.float32(1.01), b, k))
    student = make_decoder(tmp_path / "llama", "llama", seed=12, intermediate=INTERMEDIATE)
    code, _, stderr = cli("build", student, "--masks", masks, "--router-encoder", router, "--samples", samples, "--weights", "int4",
                          "--out", tmp_path / "out", "-q")
    assert code == 3 and "weights exact: accuracy level 0" in stderr and "FAIL" in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_verify_rechecks_an_int4_bundle_against_its_own_reference(built, cli, tmp_path):
    from bundles import copy_bundle, edit_manifest

    _, result = built["llama"]
    code, stdout, stderr = cli("verify", result.out)
    assert code == 0, stderr
    assert "prefill_logits (weights exact: accuracy level 0)" in stdout
    bundle = copy_bundle(result.out, tmp_path / "bundle")
    edit_manifest(bundle, lambda m: m["targets"]["cpu"]["target"].update(linear_weights={"format": "int8"}))
    assert_one_line_error(cli("verify", bundle), "expected the reference of target 'cpu''s int8 weights", "cluster_0~int8", code=5)
    edit_manifest(bundle, lambda m: m["targets"]["cpu"]["target"].update(linear_weights={"format": "int3"}))
    assert_one_line_error(cli("verify", bundle), "linear_weights.format", "'int3'", code=5)


def test_weights_options_that_cannot_apply_are_refused(setup, cli, tmp_path, st_student, router_encoder):
    root, router, samples, masks = setup
    encoder_masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((2, 2))}}, np.zeros((1, 24), np.float32))
    assert_one_line_error(cli("build", st_student, "--masks", encoder_masks, "--router-encoder", router_encoder, "--weights", "int4",
                              "--out", tmp_path / "o", "-q"), "--weights", "fp32 for encoder students", "int4")
    student = make_decoder(tmp_path / "llama", "llama", seed=13, intermediate=INTERMEDIATE)
    assert_one_line_error(cli("build", student, "--masks", masks, "--router-encoder", router, "--target", "cpu-attention",
                              "--weights", "int4", "--out", tmp_path / "o", "-q"), "cpu-attention.toml", "quantize_weights")


def test_ternary_linears_as_exact_two_bit_codes_with_the_lookup_table(setup, tmp_path, cli):
    """The opt-in target for binary / ternary decoders: exact 2-bit codes (their twin matches the codes * alpha model),
    the lookup-table GEMM asked of onnxruntime and of onnxruntime-genai through the folder's session options."""
    import shutil

    from edgecompile.build import BuildRequest, build

    root, router, samples, masks = setup
    student = tmp_path / "llama_w2"
    shutil.copytree(make_decoder(tmp_path / "llama", "llama", seed=14, intermediate=INTERMEDIATE), student)
    (student / "edgecompile.json").write_text(json.dumps({"format": "edgecompile-lowbit/1", "linear": [{
        "modules": ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"], "bits": 2, "groups": "row",
        "activations": "dynamic"}]}))
    result = build(BuildRequest(student, masks, router, tmp_path / "out", samples=samples, targets=["cpu-lowbit-lut"]))
    assert "FAIL" not in result.table
    for line in result.table.splitlines():
        if "weights exact: accuracy level 0" in line:
            assert float(line.split("|")[6]) < 1e-4, line
    target = result.manifest["targets"]["cpu-lowbit-lut"]
    report = target["lowering"]["dense"]["weights"]
    assert report["exact_2bit"] == 5 * LAYERS and report["quantized"] == 1 and report["lut_gemm"]  # lm_head int4
    dense = onnx.load(str(result.out / "cpu-lowbit-lut" / "decoder" / "dense.onnx"), load_external_data=False)
    bits = sorted(a.i for n in dense.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits")
    assert bits == [2] * (5 * LAYERS) + [4]
    config = json.loads((result.out / "cpu-lowbit-lut" / "decoder" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["mlas.use_lut_gemm"] == "1"
    code, _, stderr = cli("verify", result.out)
    assert code == 0, stderr
