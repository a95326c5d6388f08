"""Sentence-transformers folders saved by sentence-transformers 5.x and 6.x load as students and router
encoders on both transformers lanes, and the settings edgecompile does not implement are refused.

Each lane has one sentence-transformers major installed (6 needs transformers 5), so every lane tests
a folder saved live by its own major plus the checked-in folder saved by each major
(`tests/st_folders.py` wrote them, with that library's own `encode` of the texts in `encoded.json`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import centroids
from edgecompile.errors import InputError
from edgecompile.inputs.compat import sentence_transformers_major
from edgecompile.families import load_student
from st_folders import MAX_SEQ_LENGTH, TEXTS, checked_in_folder, save_with_sentence_transformers
from test_bad_inputs import assert_one_line_error


def reference_sentence_embeddings(folder: Path) -> np.ndarray:
    """edgecompile's PyTorch reference, tokenized and truncated the way the build does."""
    from edgecompile.build.router import max_length as _max_length
    from edgecompile.inputs.tokens import encode, load_tokenizer
    from edgecompile.reference.evaluate import student_outputs
    from edgecompile.families.bert_model import load_student_module

    spec = load_student(folder)
    tokenizer = load_tokenizer(spec.transformer_dir)
    encoded = encode(tokenizer, TEXTS, _max_length(spec, tokenizer))
    assert max(e.length for e in encoded) == MAX_SEQ_LENGTH  # the long text was cut where the folder says
    return np.stack(student_outputs(load_student_module(spec), encoded)["sentence_embedding"])


@pytest.fixture(scope="module")
def live_folder(tmp_path_factory) -> Path:
    return save_with_sentence_transformers(tmp_path_factory.mktemp("st_live") / "st")


@pytest.mark.parametrize("major", [5, 6])
def test_checked_in_folder_was_saved_by_that_major(major):
    folder = checked_in_folder(major)
    saved_by = json.loads((folder / "config_sentence_transformers.json").read_text())["__version__"]
    assert saved_by["sentence_transformers"].startswith(f"{major}.")
    assert saved_by["transformers"].startswith("5." if major == 6 else "4.")


@pytest.mark.parametrize("major", [5, 6])
def test_folder_saved_by_each_major_matches_that_majors_encode(major):
    folder = checked_in_folder(major)
    spec = load_student(folder)
    assert (spec.family, spec.pooling_mode, spec.normalize) == ("sentence-transformers", "mean", True)
    expected = np.asarray(json.loads((folder / "encoded.json").read_text())["sentence_embedding"], np.float32)
    np.testing.assert_allclose(reference_sentence_embeddings(folder), expected, rtol=1e-5, atol=2e-6)


def test_folder_saved_by_the_installed_major_matches_its_encode(live_folder):
    from sentence_transformers import SentenceTransformer

    saved_by = json.loads((live_folder / "config_sentence_transformers.json").read_text())["__version__"]
    assert int(saved_by["sentence_transformers"].split(".")[0]) == sentence_transformers_major()
    peer = SentenceTransformer(str(live_folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(reference_sentence_embeddings(live_folder), peer, rtol=1e-5, atol=2e-6)


@pytest.mark.skipif(sentence_transformers_major() < 6, reason="sentence-transformers 5 cannot import 6's module paths")
def test_sentence_transformers_6_reads_a_5_folder_as_edgecompile_does(tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = shutil.copytree(checked_in_folder(5), tmp_path / "st5_folder")
    peer = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(reference_sentence_embeddings(folder), peer, rtol=1e-5, atol=2e-6)


def test_build_with_each_majors_folder_as_student_and_router(cli, masks_file, tmp_path):
    student, router = checked_in_folder(6), checked_in_folder(5)
    masks = masks_file({0: {"heads": np.array([[1, 0], [1, 1]], np.float32)}, 1: {"blocks": np.array([[1, 0], [0, 1]], np.float32)}},
                       centroids=centroids(2, dim=16))
    for student, router in ((student, router), (router, student)):
        out = tmp_path / f"bundle_{student.name}"
        code, _, err = cli("build", student, "--masks", masks, "--router-encoder", router, "--out", out, "-q")
        assert code == 0, err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["student"]["max_seq_length"] == manifest["router"]["max_seq_length"] == MAX_SEQ_LENGTH


@pytest.mark.parametrize(
    "file,key,value,needle",
    [
        ("sentence_bert_config.json", "transformer_task", "fill-mask", "'feature-extraction'"),
        ("sentence_bert_config.json", "modality_config", {"text": {"method": "forward", "method_output_name": "logits"}}, "logits"),
        ("sentence_bert_config.json", "module_output_name", "scores", "'token_embeddings'"),
        ("sentence_bert_config.json", "do_lower_case", True, "found true"),
        ("sentence_bert_config.json", "config_kwargs", {"hidden_act": "relu"}, "load-time overrides"),
        ("sentence_bert_config.json", "query_length", 8, "found 8"),
        ("config_sentence_transformers.json", "default_prompt_name", "query", "no prompt"),
    ],
)
def test_sentence_transformers_settings_not_implemented_are_refused(cli, masks_file, tmp_path, file, key, value, needle):
    folder = shutil.copytree(checked_in_folder(6), tmp_path / "st")
    config = json.loads((folder / file).read_text())
    config[key] = value
    (folder / file).write_text(json.dumps(config))
    with pytest.raises(InputError, match=f"{file}: '{key}': expected"):
        load_student(folder)
    masks = masks_file({0: {"blocks": np.ones((2, 2), np.float32)}}, centroids=centroids(1, dim=16))
    result = cli("build", checked_in_folder(5), "--masks", masks, "--router-encoder", folder, "--out", tmp_path / "b", "-q")
    assert_one_line_error(result, str(folder / file), f"'{key}'", needle)
