"""Regressions for problems a code review found: each of these once passed silently or crashed."""

from __future__ import annotations

import json
import shutil

import numpy as np

from conftest import LAYERS, gates
from edgecompile.check.parity import compare
from edgecompile.lowering.targets import load_target


def test_nan_outputs_never_pass_parity():
    cpu = load_target("cpu")
    ones = np.ones(4, np.float32)
    nan = np.full(4, np.nan, np.float32)
    row = compare(cpu, "cluster_0", "sentence_embedding", [ones, ones], [ones, nan])
    assert not row.passed and any("NaN" in f for f in row.failures)
    logits = compare(cpu, "cluster_0", "logits", [np.array([1.0, 2.0])], [np.array([np.nan, np.nan], np.float32)])
    assert not logits.passed and logits.agreement == 0.0


def test_duplicate_spellings_of_a_cluster_are_rejected(cli, st_student, router_encoder, tmp_path):
    from safetensors.numpy import save_file

    from conftest import centroids
    from test_bad_inputs import assert_one_line_error

    path = tmp_path / "m.safetensors"
    save_file({"router.centroids": centroids(1), "cluster.0.blocks": np.ones((LAYERS, 2), np.float32),
               "cluster.00.blocks": np.zeros((LAYERS, 2), np.float32)}, str(path),
              metadata={"format": "edgecompile-masks/1", "router.metric": "l2"})
    result = cli("build", st_student, "--masks", path, "--router-encoder", router_encoder, "--out", tmp_path / "b", "-q")
    assert_one_line_error(result, "tensor cluster.00.blocks", "unknown name")


def test_mixed_quantizers_on_one_input_build_and_verify(tmp_path, router_encoder, masks_file, cli):
    """Q dynamic, K/V static with per-module scales: groups share one input value."""
    from factories import make_bert

    student = make_bert(tmp_path / "mixed", family="st", seed=41)
    scales = {f"encoder.layer.{i}.attention.self.{p}": 0.02 + 0.01 * i for i in range(LAYERS) for p in ("key", "value")}
    (student / "edgecompile.json").write_text(json.dumps({
        "format": "edgecompile-lowbit/1",
        "linear": [
            {"modules": ["encoder.layer.*.attention.self.query"], "bits": 1, "groups": "row", "activations": "dynamic"},
            {"modules": ["encoder.layer.*.attention.self.key", "encoder.layer.*.attention.self.value"], "bits": 2,
             "groups": "row", "activations": "static", "static_scales": scales},
        ],
    }))
    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2))), 1: gates(heads=[[1, 0, 1, 1], [0, 1, 1, 1]])})
    out = tmp_path / "bundle"
    code, stdout, err = cli("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", out, "-q")
    assert code == 0, err
    assert "integer Linear groups" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"]["cpu"]["lowbit_graphs"] == ["cluster_0", "cluster_1", "dense"]
    code, _, err = cli("verify", out)  # verify applies the low-bit tolerances to low-bit graphs
    assert code == 0, err


def test_damaged_manifests_are_one_line_bundle_errors(cli, tmp_path, st_student, router_encoder, masks_file):
    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))})
    good = tmp_path / "good"
    assert cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", good, "-q")[0] == 0
    manifest = json.loads((good / "manifest.json").read_text())
    cases = {
        "empty targets": dict(manifest, targets={}),
        "no student": {k: v for k, v in manifest.items() if k != "student"},
        "list": [1, 2],
        "null hash": dict(manifest, files={**manifest["files"], "parity.md": {"sha256": None}}),
    }
    for label, damaged in cases.items():
        copy = tmp_path / label.replace(" ", "_")
        shutil.copytree(good, copy)
        (copy / "manifest.json").write_text(json.dumps(damaged))
        for command in (["verify", copy], ["inspect", copy], ["run", copy, "--text", "hi"], ["bench", copy, "--runs", "3"]):
            code, _, err = cli(*command)
            assert code == 5 and err.count("\n") == 1 and "Traceback" not in err, (label, command, err)
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "cpu" / "cluster_0.onnx").unlink()
    code, _, err = cli("run", missing, "--text", "hello there")
    assert code == 5 and "missing from the bundle" in err


def test_same_target_name_twice_is_rejected(cli, st_student, router_encoder, masks_file, tmp_path):
    from pathlib import Path

    from test_bad_inputs import assert_one_line_error

    twin = tmp_path / "cpu_twin.toml"
    twin.write_text((Path(__file__).parents[1] / "targets" / "cpu.toml").read_text())
    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))})
    result = cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b",
                 "--target", "cpu", "--target", twin, "-q")
    assert_one_line_error(result, "target name 'cpu'", "each target once")


def test_bad_config_types_name_the_key(cli, st_student, router_encoder, masks_file, tmp_path):
    from test_bad_inputs import assert_one_line_error

    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))})
    for key, value, needle in (("num_hidden_layers", True, "'num_hidden_layers': expected a positive integer, found True"),
                               ("layer_norm_eps", "x", "'layer_norm_eps': expected a number, found 'x'"),
                               ("vocab_size", "abc", "'vocab_size': expected a positive integer")):
        student = tmp_path / f"s_{key}"
        shutil.copytree(st_student, student)
        config = json.loads((student / "config.json").read_text())
        config[key] = value
        (student / "config.json").write_text(json.dumps(config))
        result = cli("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b", "-q")
        assert_one_line_error(result, "config.json", needle)


def test_nan_weights_are_an_input_error(cli, st_student, router_encoder, masks_file, tmp_path):
    from safetensors.torch import load_file, save_file

    from test_bad_inputs import assert_one_line_error

    student = tmp_path / "nan_student"
    shutil.copytree(st_student, student)
    tensors = load_file(str(student / "model.safetensors"))
    tensors["encoder.layer.0.output.dense.bias"][3] = float("nan")
    save_file(tensors, str(student / "model.safetensors"), metadata={"format": "pt"})
    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))})
    result = cli("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b", "-q")
    assert_one_line_error(result, "tensor encoder.layer.0.output.dense.bias", "expected finite values")
