"""The PyTorch reference against independent implementations: transformers' head pruning, forward
hooks, and the sentence-transformers library."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import HEADS, INTERMEDIATE, LAYERS
from edgecompile.inputs.masks import ClusterMasks
from edgecompile.families import load_student
from edgecompile.numerics import hard_concrete_gate
from edgecompile.families.bert import bert_gates
from edgecompile.families.bert_model import load_student_module

IDS = torch.tensor([[2, 40, 41, 42, 43, 3, 0, 0], [2, 50, 51, 52, 53, 54, 55, 3]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])
TYPES = torch.zeros_like(IDS)


def cluster(blocks=None, heads=None, neurons=None) -> ClusterMasks:
    ones = lambda shape: np.ones(shape, np.float32)  # noqa: E731
    return ClusterMasks(
        0,
        ones((LAYERS, 2)) if blocks is None else np.asarray(blocks, np.float32),
        ones((LAYERS, HEADS)) if heads is None else np.asarray(heads, np.float32),
        ones((LAYERS, INTERMEDIATE)) if neurons is None else np.asarray(neurons, np.float32),
    )


def gated_outputs(student, masks):
    gates = bert_gates(student.bert)
    gates.set(masks)
    try:
        with torch.no_grad():
            return student(IDS, MASK, TYPES)
    finally:
        gates.remove()


def prune_heads_with_transformers(bert: torch.nn.Module, heads_to_prune: dict[int, list[int]]) -> None:
    """transformers' own head pruning: `BertModel.prune_heads` on 4.x; transformers 5 removed it, so
    there its `prune_linear_layer` slices the same rows and columns and its own forward (which
    reshapes with -1 heads) runs the pruned layers."""
    if hasattr(bert, "prune_heads"):
        bert.prune_heads(heads_to_prune)
        return
    from transformers.pytorch_utils import prune_linear_layer

    for layer_index, heads in heads_to_prune.items():
        attention = bert.encoder.layer[layer_index].attention
        size, count = attention.self.attention_head_size, attention.self.num_attention_heads
        keep = torch.tensor([i for h in range(count) if h not in heads for i in range(h * size, (h + 1) * size)])
        for name in ("query", "key", "value"):
            setattr(attention.self, name, prune_linear_layer(getattr(attention.self, name), keep))
        attention.output.dense = prune_linear_layer(attention.output.dense, keep, dim=1)
        attention.self.num_attention_heads = count - len(heads)


@pytest.mark.parametrize("fixture", ["bert_student", "seqcls_student"])
def test_head_gates_match_transformers_head_pruning(request, fixture):
    student = load_student_module(load_student(request.getfixturevalue(fixture)))
    heads = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    ours = gated_outputs(student, cluster(heads=heads))
    peer = copy.deepcopy(student)
    prune_heads_with_transformers(peer.bert, {0: [1, 3], 1: [0, 1, 2]})
    assert peer.bert.encoder.layer[1].attention.self.num_attention_heads == 1
    with torch.no_grad():
        theirs = peer(IDS, MASK, TYPES)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the gates really did something
    with torch.no_grad():
        dense = student(IDS, MASK, TYPES)
    assert not torch.allclose(dense[0], ours[0], atol=1e-4)


def test_neuron_and_block_gates_match_forward_hooks(bert_student):
    student = load_student_module(load_student(bert_student))
    rng = np.random.default_rng(0)
    neurons = (rng.random((LAYERS, INTERMEDIATE)) > 0.4) * rng.uniform(0.2, 1.0, (LAYERS, INTERMEDIATE))
    blocks = np.array([[0.0, 0.7], [0.4, 0.0]], np.float32)
    ours = gated_outputs(student, cluster(blocks=blocks, neurons=neurons))

    handles = []
    for i, layer in enumerate(student.bert.encoder.layer):
        gate = torch.tensor(neurons[i], dtype=torch.float32)
        handles.append(layer.intermediate.register_forward_hook(lambda m, inp, out, g=gate: out * g))
        for module, scale in ((layer.attention.output.dense, blocks[i, 0]), (layer.output.dense, blocks[i, 1])):
            handles.append(module.register_forward_hook(lambda m, inp, out, s=float(scale): out * s))
    try:
        with torch.no_grad():
            theirs = student(IDS, MASK, TYPES)
    finally:
        for h in handles:
            h.remove()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_removed_block_keeps_the_post_layernorm(bert_student):
    """Gate 0 on both branches: each layer reduces to LN_ffn(LN_attn(x)), not to the identity."""
    student = load_student_module(load_student(bert_student))
    out = gated_outputs(student, cluster(blocks=np.zeros((LAYERS, 2))))
    bert = student.bert
    with torch.no_grad():
        x = bert.embeddings(input_ids=IDS, token_type_ids=TYPES)
        for layer in bert.encoder.layer:
            x = layer.output.LayerNorm(layer.attention.output.LayerNorm(x))
    torch.testing.assert_close(out[0], x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "mean_sqrt_len_tokens"])
@pytest.mark.parametrize("normalize", [True, False])
def test_sentence_embedding_matches_sentence_transformers(tmp_path, pooling, normalize):
    from factories import make_bert
    from sentence_transformers import SentenceTransformer

    path = make_bert(tmp_path / "st", family="st", pooling=pooling, normalize=normalize, seed=7)
    texts = ["how do i reset my password?", "paris is the capital of france.", "ok"]
    peer = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True, batch_size=8)
    student = load_student_module(load_student(path))
    from edgecompile.reference.evaluate import student_outputs
    from edgecompile.inputs.tokens import encode, load_tokenizer

    encoded = encode(load_tokenizer(path), texts, 64)
    ours = np.stack(student_outputs(student, encoded)["sentence_embedding"])
    np.testing.assert_allclose(ours, peer, rtol=1e-5, atol=2e-6)


def test_router_reference_matches_sentence_transformers_and_numpy(router_encoder):
    from sentence_transformers import SentenceTransformer

    from edgecompile.reference.evaluate import router_outputs
    from edgecompile.reference.router import RouterModule
    from edgecompile.inputs.tokens import encode, load_tokenizer

    texts = ["where is the nearest train station?", "mix the red and blue paint", "error 404"]
    embeddings = SentenceTransformer(str(router_encoder), device="cpu").encode(texts, convert_to_numpy=True).astype(np.float64)
    rng = np.random.default_rng(3)
    weight, bias = rng.standard_normal((5, 24)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    cents = rng.standard_normal((4, 5)).astype(np.float32)
    encoder = load_student_module(load_student(router_encoder))
    encoded = encode(load_tokenizer(router_encoder), texts, 64)
    for metric in ("l2", "cosine"):
        router = RouterModule(encoder, cents, metric, weight, bias)
        ours = router_outputs(router, encoded)
        projected = embeddings @ weight.T.astype(np.float64) + bias
        if metric == "l2":
            expected = np.linalg.norm(projected[:, None, :] - cents[None], axis=-1)
        else:
            unit = projected / np.linalg.norm(projected, axis=1, keepdims=True)
            expected = 1 - unit @ (cents / np.linalg.norm(cents, axis=1, keepdims=True)).T
        np.testing.assert_allclose(np.stack(ours["distances"]), expected, rtol=1e-4, atol=1e-5)
        assert [int(c[0]) for c in ours["cluster_id"]] == list(expected.argmin(axis=1))


def test_hard_concrete_rule():
    log_alpha = torch.tensor([-10.0, np.log(1 / 11), 0.0, 10.0, np.log(11.0)])
    z = hard_concrete_gate(log_alpha)
    # sigmoid(a) * 1.2 - 0.1 clamped to [0, 1]
    expected = (torch.sigmoid(log_alpha) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(z, expected)
    assert z[0] == 0.0 and z[3] == 1.0 and abs(float(z[2]) - 0.5) < 1e-7
