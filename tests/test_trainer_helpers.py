"""The trainer helpers in edgecompile/reference/: hard-concrete gates with the L0 Lagrangian, differentiable
block gates in the oracle's buffers, and quantization-aware Linears whose forward is the contract's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecompile.inputs.masks import ClusterMasks
from edgecompile.families.bert import bert_gates
from edgecompile.numerics import hard_concrete_gate
from edgecompile.reference.gate_training import set_block_gates
from edgecompile.reference.hard_concrete import HardConcreteGates, probability_kept, sample_hard_concrete
from edgecompile.reference.lowbit import QuantLinear, fake_quantize_weight
from edgecompile.reference.lowbit_training import LowBitTraining, LowBitTrainingLinear


def test_hard_concrete_samples_hit_exact_zero_and_one_at_the_rate_the_l0_formula_predicts():
    torch.manual_seed(0)
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).repeat(20000, 1)
    z = sample_hard_concrete(log_alpha)
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0
    nonzero = (z > 0).float().mean(0)
    assert torch.allclose(nonzero, probability_kept(log_alpha[0]), atol=0.01)


def test_hard_concrete_gradient_reaches_log_alpha_and_eval_uses_the_numerics_rule():
    gates = HardConcreteGates((3, 2))
    gates.train()
    (gates() * torch.arange(6.0).reshape(3, 2)).sum().backward()
    assert gates.log_alpha.grad is not None and bool(gates.log_alpha.grad.abs().sum() > 0)
    gates.eval()
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([[-5.0, -0.5], [0.0, 0.4], [2.0, 9.0]]))
    assert torch.equal(gates(), hard_concrete_gate(gates.log_alpha))


def test_top_k_hard_keeps_exactly_k_units_by_log_alpha_with_ties_to_the_lowest_index():
    gates = HardConcreteGates((2, 3))
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([[0.5, 2.0, 0.5], [-1.0, 0.5, 3.0]]))
    assert gates.top_k_hard(3).tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert gates.top_k_hard(0).sum() == 0 and gates.top_k_hard(6).sum() == 6


def test_l0_augmented_lagrangian_drives_the_expected_kept_fraction_to_the_target_and_keeps_the_useful_units():
    torch.manual_seed(0)
    gates = HardConcreteGates((12,))
    optimizer = torch.optim.Adam([{"params": gates.gate_parameters(), "lr": 0.1},
                                  {"params": gates.lagrangian_parameters(), "lr": 0.02, "maximize": True}])
    cost_of_removing = torch.tensor([0.30, 0.02, 0.03, 0.04, 0.06, 0.03, 0.05, 0.10, 0.12, 0.05, 0.08, 0.25])
    for _ in range(150):
        loss = (cost_of_removing * (1.0 - gates())).sum() + gates.penalty(0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(float(gates.expected_kept_fraction()) - 0.5) < 0.05
    assert float(gates.multiplier) > 0  # it ascended: the constraint pushed against the task
    useful = set(cost_of_removing.argsort(descending=True)[:6].tolist())
    assert len(useful & set(torch.nonzero(gates.top_k_hard(6)).flatten().tolist())) >= 5


def test_differentiable_block_gates_compute_what_the_oracle_computes_with_the_same_constants(st_student):
    from edgecompile.families import load_student
    from edgecompile.families.bert_model import load_student_module

    student = load_student_module(load_student(st_student))
    gates = bert_gates(student.bert)
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    blocks = torch.tensor([[1.0, 0.3], [0.0, 1.0]], requires_grad=True)
    set_block_gates(gates, blocks)
    trained = student(*inputs)[1]
    trained.sum().backward()
    assert blocks.grad is not None and bool(blocks.grad[0, 1] != 0)
    set_block_gates(gates, torch.ones(2, 2))
    config = student.bert.config
    gates.set(ClusterMasks(0, blocks.detach().numpy(), np.ones((2, config.num_attention_heads), np.float32),
                           np.ones((2, config.intermediate_size), np.float32)))
    with torch.no_grad():
        oracle = student(*inputs)[1]
    gates.remove()
    assert torch.allclose(trained.detach(), oracle, atol=1e-6)
    with pytest.raises(ValueError, match="expected shape"):
        set_block_gates(bert_gates(student.bert), torch.ones(3, 2))


def test_quantization_aware_linear_matches_quantlinear_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(4, 5, 16)
    training = LowBitTrainingLinear(linear, bits=1)
    y = training(x)
    oracle_linear = torch.nn.Linear(16, 8)
    with torch.no_grad():
        oracle_linear.weight.copy_(fake_quantize_weight(linear.weight, 1, "row"))
        oracle_linear.bias.copy_(linear.bias)
    assert torch.allclose(y, QuantLinear(oracle_linear, "dynamic")(x), atol=1e-5)
    y.sum().backward()
    assert linear.weight.grad is not None and bool(linear.weight.grad.abs().sum() > 0)


def test_low_bit_training_wraps_matching_modules_and_remove_restores_them(seqcls_student):
    from edgecompile.families import load_student
    from edgecompile.families.bert_model import load_student_module

    model = load_student_module(load_student(seqcls_student)).model
    before = {n: type(m) for n, m in model.named_modules()}
    training = LowBitTraining(model, ["bert.encoder.layer.*.intermediate.dense"], embedding_bits=1)
    assert training.linear_names == ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"]
    ids = torch.tensor([[2, 10, 11, 3]])
    model(input_ids=ids).logits.sum().backward()
    assert model.bert.embeddings.word_embeddings.embedding.weight.grad is not None
    training.remove()
    assert {n: type(m) for n, m in model.named_modules()} == before
