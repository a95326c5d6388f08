"""Training multi-token-prediction heads (edgecompile/reference/mtp_training.py): the memory-saving backward
order gives the naive order's gradients with a smaller peak, and the saved checkpoint is families/mtp.py's
contract, whose reference computes the very logits that were trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from factories import make_llama
from edgecompile.families.llama import Llama
from edgecompile.families.mtp import head_logits, load_extra_heads
from edgecompile.reference.mtp_training import MultiTokenLlama
from edgecompile.reference.tensor_memory import PeakTensorMemory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("mtp_training") / "llama")


def mtp_model(llama_dir, n_future_tokens: int, seed: int = 0) -> MultiTokenLlama:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(llama_dir), attn_implementation="eager")
    model = MultiTokenLlama(model, n_future_tokens)
    torch.manual_seed(seed)
    with torch.no_grad():  # heads that differ from head 0 and from each other
        for head in model.extra_heads:
            for parameter in head.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def batch(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(3, vocab, size=(4, 24)))


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_memory_saving_order_gives_the_naive_gradients_and_losses(llama_dir):
    model = mtp_model(llama_dir, 3)
    ids = batch(model.model.config.vocab_size)
    naive_losses = model.step_naive(ids)
    naive = gradients(model)
    model.zero_grad(set_to_none=True)
    saving_losses = model.step_memory_saving(ids)
    saving = gradients(model)
    assert naive_losses == pytest.approx(saving_losses, rel=1e-6)
    assert naive.keys() == saving.keys() and len(naive) == len(list(model.parameters()))  # every parameter, the trunk's too
    for name in naive:
        torch.testing.assert_close(saving[name], naive[name], rtol=1e-4, atol=1e-7, msg=name)
    assert naive_losses[0] != naive_losses[1]  # the heads predict different tokens


def test_memory_saving_order_has_a_smaller_peak(llama_dir):
    model = mtp_model(llama_dir, 4)
    ids = batch(model.model.config.vocab_size)
    peaks = {}
    for name in ("naive", "memory_saving"):
        model.zero_grad(set_to_none=True)
        with PeakTensorMemory() as memory:
            getattr(model, f"step_{name}")(ids)
        peaks[name] = memory.peak_bytes
    logits = ids.numel() * model.model.config.vocab_size * 4
    assert peaks["memory_saving"] < peaks["naive"] - 2 * logits  # at least two fewer heads' logits alive at once


def test_peak_tensor_memory_counts_new_storages_until_freed_and_not_views_of_older_ones():
    weights = torch.ones(1000)
    with PeakTensorMemory() as memory:
        view = weights[:500].view(10, 50)
        weights.mul_(2.0)
        assert memory.current_bytes == 0
        a = torch.zeros(1000)
        b = a * 2.0
        assert memory.current_bytes == 8000
        del a, b
        c = torch.zeros(250)
    assert memory.peak_bytes == 8000 and memory.current_bytes == 1000
    del view, c


def test_saved_checkpoint_is_the_mtp_contract_and_its_reference_computes_the_trained_logits(llama_dir, tmp_path):
    model = mtp_model(llama_dir, 2).eval()
    out = model.save(tmp_path / "mtp")
    config = json.loads((out / "config.json").read_text())
    assert config["n_future_tokens"] == 2
    dims = Llama.dims(config)
    weights = Llama.load_weights(out / "model.safetensors", dims)  # the build's reader: no tensor missing or unexpected
    reference = Llama.load_reference(out)
    prompt = [0, 17, 93, 5, 44, 201, 8]
    expected = head_logits(reference, load_extra_heads(Llama, reference, weights, dims.extra_heads), prompt)
    with torch.no_grad():
        trunk, context = model.trunk(torch.tensor([prompt]))
        trained = [model.head_logits(j, trunk, context)[0].numpy() for j in range(2)]
    for j in range(2):
        np.testing.assert_allclose(trained[j], expected[j], rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected[0], expected[1])


def test_multi_token_model_needs_a_trunk_and_a_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    one_layer = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="at least 2 layers"):
        MultiTokenLlama(one_layer, 2)
