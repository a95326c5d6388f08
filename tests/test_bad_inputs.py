"""Every bad input: exit code 2, one line naming file / tensor / expected / found, no bundle, no traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import HEADS, INTERMEDIATE, LAYERS, centroids, gates


def assert_one_line_error(result, *needles: str, code: int = 2) -> str:
    exit_code, out, err = result
    assert exit_code == code, (exit_code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def build(cli, st_student, router_encoder, tmp_path):
    def run(masks, student=None, router=None, *extra):
        out = tmp_path / "bundle"
        result = cli("build", student or st_student, "--masks", masks, "--router-encoder", router or router_encoder,
                     "--out", out, "-q", *extra)
        if result[0] != 0:
            assert not out.exists()
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.partial-")]
        return result

    return run


@pytest.fixture
def good(masks_file):
    return masks_file({0: gates(blocks=np.ones((LAYERS, 2))), 1: gates(heads=np.ones((LAYERS, HEADS)))})


def test_missing_files(build, good, tmp_path, st_student):
    assert_one_line_error(build(tmp_path / "nope.safetensors"), "nope.safetensors", "not found")
    assert_one_line_error(build(good, student=tmp_path / "no_student"), "no_student", "student folder not found")
    assert_one_line_error(build(good, router=tmp_path / "no_router"), "no_router", "router encoder folder not found")
    assert_one_line_error(build(good, None, None, "--samples", tmp_path / "none.txt"), "none.txt", "samples file not found")
    broken = tmp_path / "broken"
    shutil.copytree(st_student, broken)
    (broken / "model.safetensors").unlink()
    assert_one_line_error(build(good, student=broken), "model.safetensors", "file not found")


def test_corrupt_safetensors(build, good, tmp_path, st_student):
    bad = tmp_path / "masks.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_one_line_error(build(bad), str(bad), "not a readable safetensors file")
    student = tmp_path / "corrupt_student"
    shutil.copytree(st_student, student)
    data = (student / "model.safetensors").read_bytes()
    (student / "model.safetensors").write_bytes(data[:100])
    assert_one_line_error(build(good, student=student), "model.safetensors", "not a readable safetensors file")


def test_unsupported_architecture(build, good, tmp_path, bert_student):
    student = tmp_path / "gpt2"
    shutil.copytree(bert_student, student)
    config = json.loads((student / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (student / "config.json").write_text(json.dumps(config))
    line = assert_one_line_error(build(good, student=student), "config.json", "'gpt2'", "GPT2LMHeadModel", "supported: BertModel")
    assert "BertForSequenceClassification" in line and "sentence-transformers" in line and "LlamaForCausalLM" in line
    config.update(model_type="bert", architectures=["BertForMaskedLM"])
    (student / "config.json").write_text(json.dumps(config))
    assert_one_line_error(build(good, student=student), "'BertForMaskedLM' is not supported")


@pytest.mark.parametrize(
    "tensor,value,needles",
    [
        ("blocks", np.ones((LAYERS + 1, 2)), ["cluster.0.blocks shape", f"expected [{LAYERS}, 2]", f"found [{LAYERS + 1}, 2]"]),
        ("heads", np.ones((LAYERS, HEADS - 1)), ["cluster.0.heads shape", f"[{LAYERS}, {HEADS}]"]),
        ("neurons", np.ones((LAYERS, INTERMEDIATE * 2)), ["cluster.0.neurons shape", f"[{LAYERS}, {INTERMEDIATE}]"]),
        ("heads", np.full((LAYERS, HEADS), np.nan), ["cluster.0.heads", "expected finite values", "nan at [0, 0]"]),
        ("blocks", np.array([[1, 1], [np.inf, 1]]), ["cluster.0.blocks", "finite", "inf at [1, 0]"]),
        ("blocks", np.array([[1, 1.5], [1, 1]]), ["cluster.0.blocks", "values in [0, 1]", "found 1.5 at [0, 1]"]),
        ("neurons", -np.ones((LAYERS, INTERMEDIATE)), ["cluster.0.neurons", "values in [0, 1]", "found -1"]),
    ],
)
def test_bad_mask_tensor(build, masks_file, tensor, value, needles):
    masks = masks_file({0: {tensor: np.asarray(value, np.float32)}})
    assert_one_line_error(build(masks), "masks.safetensors", *needles)


def test_hard_concrete_masks_accept_any_finite_log_alpha(masks_file, st_student):
    from edgecompile.inputs.masks import load_masks
    from edgecompile.families import load_student

    log_alpha = np.array([[-5.0, 5.0], [0.0, -0.5]], np.float32)
    path = masks_file({0: {"blocks": log_alpha}}, kind="hard_concrete_log_alpha")
    z = load_masks(path, load_student(st_student), 24).clusters[0].blocks
    assert z[0, 0] == 0.0 and z[0, 1] == 1.0 and abs(z[1, 0] - 0.5) < 1e-6 and 0 < z[1, 1] < 0.5


def test_cluster_numbering_and_centroid_pairing(build, masks_file):
    gaps = masks_file({0: gates(blocks=np.ones((LAYERS, 2))), 2: gates(blocks=np.ones((LAYERS, 2)))}, k=3)
    assert_one_line_error(build(gaps), "cluster numbering", "without gaps", "missing cluster.1")
    no_centroid = masks_file({0: gates(blocks=np.ones((LAYERS, 2))), 1: gates(blocks=np.ones((LAYERS, 2)))}, k=1)
    assert_one_line_error(build(no_centroid), "cluster.1", "centroid", "K = 1")
    no_cluster = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))}, k=3)
    assert_one_line_error(build(no_cluster), "router.centroids row 1", "no cluster")


def test_zero_clusters(build, masks_file):
    masks = masks_file({}, centroids=np.zeros((0, 24), np.float32))
    assert_one_line_error(build(masks), "router.centroids", "K >= 1", "K = 0")


def test_dimension_mismatches(build, masks_file):
    wrong = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))}, centroids=centroids(1, dim=16))
    assert_one_line_error(build(wrong), "router.centroids shape", "[K, 24]", "router encoder", "found [1, 16]")
    projection = (np.ones((8, 30), np.float32), np.ones(8, np.float32))
    bad_projection = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))}, centroids=centroids(1, dim=8), projection=projection)
    assert_one_line_error(build(bad_projection), "router.projection.weight shape", "[8, 24]", "[8, 30]")
    ok_projection = (np.ones((8, 24), np.float32), np.ones(8, np.float32))
    bad_centroid = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))}, centroids=centroids(1, dim=24), projection=ok_projection)
    assert_one_line_error(build(bad_centroid), "router.centroids shape", "[K, 8]", "projection output")


def test_metadata(build, masks_file):
    one = {0: gates(blocks=np.ones((LAYERS, 2)))}
    assert_one_line_error(build(masks_file(one, metadata={"format": "other/2", "router.metric": "l2"})),
                          "metadata 'format'", "'edgecompile-masks/1'", "found 'other/2'")
    assert_one_line_error(build(masks_file(one, metadata={"router.metric": "l2"})), "metadata 'format'", "found none")
    assert_one_line_error(build(masks_file(one, metric="manhattan")), "router.metric", "l2 or cosine", "'manhattan'")
    assert_one_line_error(build(masks_file(one, kind="soft")), "mask.kind", "'soft'")
    assert_one_line_error(
        build(masks_file(one, metadata={"format": "edgecompile-masks/1", "router.metric": "l2", "mask_kind": "hard"})),
        "metadata", "unknown key 'mask_kind'",
    )


def test_unknown_tensor_and_wrong_dtype(build, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "m.safetensors"
    meta = {"format": "edgecompile-masks/1", "router.metric": "l2"}
    save_file({"router.centroids": centroids(1), "cluster.0.block": np.ones((LAYERS, 2), np.float32)}, str(path), metadata=meta)
    assert_one_line_error(build(path), "tensor cluster.0.block", "unknown name")
    save_file({"router.centroids": centroids(1), "cluster.0.blocks": np.ones((LAYERS, 2), np.float64)}, str(path), metadata=meta)
    assert_one_line_error(build(path), "cluster.0.blocks dtype", "float32", "float64")


def test_router_encoder_must_be_sentence_transformers(build, good, bert_student):
    assert_one_line_error(build(good, router=bert_student), "router encoder", "sentence-transformers", "BertModel")


def test_samples_file_problems(build, good, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_one_line_error(build(good, None, None, "--samples", empty), "empty.txt", "at least one non-empty line")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine line\ncaf\xe9\n")
    assert_one_line_error(build(good, None, None, "--samples", latin), "latin.txt", "line 2", "UTF-8", "0xe9")


def test_unknown_target_lists_known_ones(build, good):
    assert_one_line_error(build(good, None, None, "--target", "tpu"), "unknown target 'tpu'", "cpu")


def test_existing_out_is_left_alone(cli, good, st_student, router_encoder, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("build", st_student, "--masks", good, "--router-encoder", router_encoder, "--out", out, "-q")
    assert_one_line_error(result, str(out), "already exists", "--force")
    result = cli("build", st_student, "--masks", good, "--router-encoder", router_encoder, "--out", out, "-q", "--force")
    assert_one_line_error(result, "not an edgecompile bundle")
    assert (out / "keep.txt").read_text() == "mine"
