"""Each rewrite, on graph structure and on numbers: onnxruntime vs the gated PyTorch reference."""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from conftest import HEADS, HIDDEN, INTERMEDIATE, LAYERS
from edgecompile.bundle.accounting import linear_macs_from_graph
from edgecompile.families.bert import kept_structure, macs_per_token
from edgecompile.families.bert import export_student
from edgecompile.inputs.masks import ClusterMasks
from edgecompile.families import load_student
from edgecompile.families.bert import BertStructure
from edgecompile.passes.provenance import module_of
from edgecompile.passes.pipeline import build_cluster_graph
from edgecompile.families.bert import bert_gates
from edgecompile.families.bert_model import load_student_module

HEAD = HIDDEN // HEADS
IDS = np.array([[2, 40, 41, 42, 43, 44, 3, 0, 0], [2, 50, 51, 52, 53, 54, 55, 56, 3]], np.int64)
MASK = np.array([[1] * 7 + [0, 0], [1] * 9], np.int64)
TYPES = np.zeros_like(IDS)
RNG = np.random.default_rng(0)


@functools.lru_cache(maxsize=None)
def exported(path):
    spec = load_student(path)
    student = load_student_module(spec)
    dense = export_student(student)
    structure = BertStructure(student.encoder_path, spec.num_layers, spec.num_heads, spec.head_size)
    return spec, student, dense, structure


def cluster(blocks=None, heads=None, neurons=None) -> ClusterMasks:
    def gate(value, shape):
        return np.ones(shape, np.float32) if value is None else np.asarray(value, np.float32).reshape(shape)

    return ClusterMasks(0, gate(blocks, (LAYERS, 2)), gate(heads, (LAYERS, HEADS)), gate(neurons, (LAYERS, INTERMEDIATE)))


def run_onnx(model: ir.Model) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"input_ids": IDS, "attention_mask": MASK, "token_type_ids": TYPES}
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})


def run_reference(student, masks: ClusterMasks) -> list[np.ndarray]:
    gates = bert_gates(student.bert)
    gates.set(masks)
    try:
        with torch.no_grad():
            return [t.numpy() for t in student(*(torch.from_numpy(a) for a in (IDS, MASK, TYPES)))]
    finally:
        gates.remove()


def assert_parity(onnx_out, ref_out, names):
    for name, got, ref in zip(names, onnx_out, ref_out):
        if name in ("last_hidden_state", "token_embeddings"):
            got, ref = got * MASK[..., None], ref * MASK[..., None]
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= 1e-5, f"{name}: relative error {rel:.3g}"


def compile_and_check(path, masks: ClusterMasks) -> ir.Model:
    spec, student, dense, structure = exported(path)
    model = build_cluster_graph(dense, structure, masks)
    assert_parity(run_onnx(model), run_reference(student, masks), student.output_names)
    kept = kept_structure(spec, masks)
    assert linear_macs_from_graph(model) == macs_per_token(spec, kept)["linear"]
    return model


def matmul_weights(model: ir.Model, module_suffix: str) -> list[tuple[int, ...]]:
    return [
        tuple(n.inputs[1].const_value.shape.numpy())
        for n in model.graph
        if n.op_type == "MatMul" and module_of(n).endswith(module_suffix) and n.inputs[1].is_initializer()
    ]


def ops_in_layer(model: ir.Model, layer: int) -> list[str]:
    return [n.op_type for n in model.graph if f".layer.{layer}." in module_of(n) + "."]


FAMILIES = ["st_student", "bert_student", "seqcls_student"]


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_pruned_is_the_dense_graph(request, family):
    path = request.getfixturevalue(family)
    _, _, dense, _ = exported(path)
    model = compile_and_check(path, cluster())
    assert [n.op_type for n in model.graph] == [n.op_type for n in dense.graph]
    assert set(model.graph.initializers) == set(dense.graph.initializers)


@pytest.mark.parametrize("family", FAMILIES)
def test_everything_pruned_keeps_embeddings_layernorms_and_head(request, family):
    model = compile_and_check(request.getfixturevalue(family), cluster(blocks=np.zeros((LAYERS, 2))))
    assert linear_macs_from_graph(model) == 0
    for layer in range(LAYERS):
        assert sorted(ops_in_layer(model, layer)) == ["LayerNormalization", "LayerNormalization"]
    assert not [n for n in model.graph if n.op_type == "Softmax"]


def test_one_layer_emptied(st_student):
    model = compile_and_check(st_student, cluster(blocks=[[1, 1], [0, 0]]))
    assert "MatMul" in ops_in_layer(model, 0)
    assert sorted(ops_in_layer(model, 1)) == ["LayerNormalization", "LayerNormalization"]


def test_attention_only_and_ffn_only_removal(bert_student):
    model = compile_and_check(bert_student, cluster(blocks=[[0, 1], [1, 0]]))
    assert matmul_weights(model, "layer.0.attention.self.query") == []
    assert matmul_weights(model, "layer.0.intermediate.dense") == [(HIDDEN, INTERMEDIATE)]
    assert matmul_weights(model, "layer.1.attention.self.query") == [(HIDDEN, HIDDEN)]
    assert matmul_weights(model, "layer.1.output.dense") == []


def test_soft_block_gates_are_folded_not_multiplied(st_student):
    _, _, dense, _ = exported(st_student)
    model = compile_and_check(st_student, cluster(blocks=[[0.25, 0.8], [1.0, 0.5]]))
    count = lambda m, op: sum(n.op_type == op for n in m.graph)  # noqa: E731
    assert count(model, "Mul") == count(dense, "Mul") and len(model.graph) == len(dense.graph)


def test_heads_shrink_projections(seqcls_student):
    heads = [[1, 0, 1, 0], [0, 0, 0, 1]]
    model = compile_and_check(seqcls_student, cluster(heads=heads))
    for proj in ("query", "key", "value"):
        assert matmul_weights(model, f"layer.0.attention.self.{proj}") == [(HIDDEN, 2 * HEAD)]
        assert matmul_weights(model, f"layer.1.attention.self.{proj}") == [(HIDDEN, HEAD)]
    assert matmul_weights(model, "layer.1.attention.output.dense") == [(HEAD, HIDDEN)]


def test_all_heads_removed_leaves_the_output_bias(bert_student):
    model = compile_and_check(bert_student, cluster(heads=[[1, 1, 1, 1], [0, 0, 0, 0]]))
    assert matmul_weights(model, "layer.1.attention.self.query") == []
    assert [n.op_type for n in model.graph if module_of(n).endswith("layer.1.attention.output")] == ["Add"]


def test_neurons_shrink_both_ffn_matrices(st_student):
    neurons = (RNG.random((LAYERS, INTERMEDIATE)) > 0.5).astype(np.float32)
    model = compile_and_check(st_student, cluster(neurons=neurons))
    for i in range(LAYERS):
        kept = int(neurons[i].sum())
        assert matmul_weights(model, f"layer.{i}.intermediate.dense") == [(HIDDEN, kept)]
        assert matmul_weights(model, f"layer.{i}.output.dense") == [(kept, HIDDEN)]


def test_all_neurons_removed_leaves_the_output_bias(st_student):
    neurons = np.ones((LAYERS, INTERMEDIATE), np.float32)
    neurons[0] = 0
    model = compile_and_check(st_student, cluster(neurons=neurons))
    assert matmul_weights(model, "layer.0.intermediate.dense") == []
    assert [n.op_type for n in model.graph if module_of(n).endswith("layer.0.output")] == ["Add"]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_granularities_combined_with_soft_values(request, family):
    neurons = (RNG.random((LAYERS, INTERMEDIATE)) > 0.3) * RNG.uniform(0.1, 1.0, (LAYERS, INTERMEDIATE))
    heads = [[0.5, 0, 1, 0.9], [1, 1, 0, 0.3]]
    compile_and_check(request.getfixturevalue(family), cluster(blocks=[[0.6, 1], [1, 0.3]], heads=heads, neurons=neurons))


def test_head_gates_in_a_removed_branch_are_ignored(st_student):
    model = compile_and_check(st_student, cluster(blocks=[[0, 1], [1, 1]], heads=[[0, 1, 0, 1], [1, 1, 1, 1]]))
    assert matmul_weights(model, "layer.0.attention.self.query") == []


def test_dense_export_is_not_modified_by_cluster_rewrites(st_student):
    _, _, dense, structure = exported(st_student)
    before = ir.to_proto(dense).SerializeToString()
    build_cluster_graph(dense, structure, cluster(blocks=[[0, 0.5], [1, 0]], heads=[[0, 1, 1, 1], [1, 1, 1, 1]]))
    assert ir.to_proto(dense).SerializeToString() == before


def test_sites_are_found_in_every_layer(bert_student):
    _, _, dense, structure = exported(bert_student)
    layers = structure.find_layers(dense)
    assert len(layers) == LAYERS and all(layer.attention is not None and layer.ffn is not None for layer in layers)
    assert all(layer.attention.ups[0].weight_array().shape == (HIDDEN, HIDDEN) for layer in layers)
