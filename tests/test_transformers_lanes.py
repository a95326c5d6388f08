"""What differs between transformers 4.57 and 5.x is handled the same on both lanes: loading, the
attention mask, the exported signature, and BERT config fields the export does not implement."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import HEADS, LAYERS, gates
from edgecompile.errors import InputError
from edgecompile.inputs.compat import transformers_major, transformers_release
from edgecompile.families import load_student
from edgecompile.families.bert_model import load_student_module
from test_bad_inputs import assert_one_line_error

IDS = torch.tensor([[2, 40, 41, 42, 43, 3, 0, 0], [2, 50, 51, 52, 53, 54, 55, 3]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])
TYPES = torch.tensor([[0] * 8, [0, 0, 0, 0, 1, 1, 1, 1]])


def test_compat_reports_the_installed_transformers():
    import transformers

    assert transformers_release()[:2] == tuple(int(p) for p in transformers.__version__.split(".")[:2])
    assert transformers_major() in (4, 5)


def test_factory_tokenizer_knows_its_whole_vocabulary(st_student):
    """transformers 5's BertTokenizerFast(vocab_file=...) silently keeps only the special tokens."""
    from edgecompile.inputs.tokens import load_tokenizer

    tokenizer = load_tokenizer(st_student)
    vocab = (st_student / "vocab.txt").read_text().split()
    assert len(tokenizer) == len(vocab)
    assert tokenizer.unk_token_id not in tokenizer("how do i reset my password?")["input_ids"]


@pytest.mark.parametrize("fixture", ["bert_student", "seqcls_student", "st_student"])
def test_reference_forward_is_bitwise_transformers_own_forward(request, fixture):
    """StudentModule hands BertModel a prepared mask on transformers 5; the outputs must not move a bit."""
    student = load_student_module(load_student(request.getfixturevalue(fixture)))
    with torch.no_grad():
        ours = student(IDS, MASK, TYPES)
        theirs = student.model(input_ids=IDS, attention_mask=MASK, token_type_ids=TYPES)
    expected = theirs.logits if student.spec.family == "bert-sequence-classification" else theirs.last_hidden_state
    assert torch.equal(ours[0], expected)
    if student.spec.has_pooler:
        assert torch.equal(ours[1], theirs.pooler_output)


@pytest.mark.parametrize("fixture", ["bert_student", "seqcls_student"])
def test_attention_traced_for_export_is_bitwise_transformers_own(request, fixture):
    """On 4.57 export swaps BertSelfAttention.forward for a head-count-agnostic copy; on 5 it keeps it."""
    from edgecompile.families.bert import head_agnostic_attention

    student = load_student_module(load_student(request.getfixturevalue(fixture)))
    with torch.no_grad():
        plain = student(IDS, MASK, TYPES)
        with head_agnostic_attention(student):
            traced = student(IDS, MASK, TYPES)
    for a, b in zip(plain, traced, strict=True):
        assert torch.equal(a, b)


def test_loads_in_fp32_with_eager_attention_whatever_the_checkpoint_says(tmp_path, bert_student):
    from safetensors.torch import load_file, save_file

    student = shutil.copytree(bert_student, tmp_path / "half")
    tensors = {k: v.half() for k, v in load_file(str(student / "model.safetensors")).items()}
    save_file(tensors, str(student / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((student / "config.json").read_text())
    config.update(torch_dtype="float16", dtype="float16", attn_implementation="sdpa")
    (student / "config.json").write_text(json.dumps(config))
    module = load_student_module(load_student(student))
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert module.bert.config._attn_implementation == "eager"


def test_config_asking_for_tuple_outputs_still_exports(tmp_path, bert_student):
    student = shutil.copytree(bert_student, tmp_path / "tuples")
    config = json.loads((student / "config.json").read_text())
    config.update(return_dict=False)
    (student / "config.json").write_text(json.dumps(config))
    module = load_student_module(load_student(student))
    with torch.no_grad():
        assert len(module(IDS, MASK, TYPES)) == 2


def test_export_signature_is_optimums(st_student):
    from edgecompile.families.bert import export_student

    model = export_student(load_student_module(load_student(st_student)))
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    for value in model.graph.inputs:
        assert [d if isinstance(d, int) else str(d) for d in value.shape] == ["batch_size", "sequence_length"]
    assert [str(d) for d in model.graph.outputs[1].shape][:1] == ["batch_size"]
    # the mask is the compact additive [B, 1, 1, S] form on both majors, not transformers 5's [B, 1, S, S]
    ops = {node.op_type for node in model.graph}
    assert not ops & {"Range", "And", "Where", "Flatten"}, ops


def test_missing_tensor_is_named(cli, tmp_path, st_student, router_encoder, masks_file):
    from safetensors.torch import load_file, save_file

    student = shutil.copytree(st_student, tmp_path / "missing")
    tensors = load_file(str(student / "model.safetensors"))
    del tensors["encoder.layer.1.intermediate.dense.weight"]
    save_file(tensors, str(student / "model.safetensors"), metadata={"format": "pt"})
    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))})
    result = cli("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b", "-q")
    assert_one_line_error(result, "model.safetensors", "tensor encoder.layer.1.intermediate.dense.weight",
                          "expected in the checkpoint, found missing")


def test_wrong_tensor_shape_is_named(cli, tmp_path, st_student, router_encoder, masks_file):
    from safetensors.torch import load_file, save_file

    student = shutil.copytree(st_student, tmp_path / "mismatch")
    tensors = load_file(str(student / "model.safetensors"))
    tensors["encoder.layer.0.output.dense.bias"] = torch.zeros(7)
    save_file(tensors, str(student / "model.safetensors"), metadata={"format": "pt"})
    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))})
    result = cli("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b", "-q")
    assert_one_line_error(result, "tensor encoder.layer.0.output.dense.bias", "expected shape [32], found [7]")


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("position_embedding_type", "relative_key", "expected 'absolute', found 'relative_key'"),
        ("is_decoder", True, "expected an encoder"),
        ("add_cross_attention", True, "no cross-attention"),
        ("chunk_size_feed_forward", 4, "unchunked), found 4"),
        ("quantization_config", {"quant_method": "bitsandbytes", "load_in_8bit": True}, "a float checkpoint"),
    ],
)
def test_bert_config_fields_not_implemented_are_refused(cli, tmp_path, st_student, router_encoder, masks_file, key, value, needle):
    student = shutil.copytree(st_student, tmp_path / "student")
    config = json.loads((student / "config.json").read_text())
    config[key] = value
    (student / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=f"'{key}'"):
        load_student(student)
    masks = masks_file({0: gates(heads=np.ones((LAYERS, HEADS)))})
    result = cli("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b", "-q")
    assert_one_line_error(result, str(student / "config.json"), f"'{key}'", needle)
