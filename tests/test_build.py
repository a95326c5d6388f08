"""`edgecompile build` end to end on tiny models, and the commands that read a bundle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import HEADS, INTERMEDIATE, LAYERS, centroids, gates
from factories import write_masks

RNG = np.random.default_rng(5)
CLUSTERS = {
    0: gates(blocks=np.ones((LAYERS, 2))),
    1: gates(blocks=[[0, 1], [0.5, 0]]),
    2: gates(heads=[[1, 0, 1, 0], [0, 0, 0, 0]], neurons=(RNG.random((LAYERS, INTERMEDIATE)) > 0.3)),
    3: gates(blocks=np.zeros((LAYERS, 2))),
}


@pytest.fixture(scope="module")
def masks_path(tmp_path_factory) -> Path:
    return write_masks(tmp_path_factory.mktemp("masks") / "masks.safetensors", CLUSTERS, centroids(4), metric="cosine")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, st_student, router_encoder, masks_path) -> Path:
    from edgecompile.build import BuildRequest, build

    out = tmp_path_factory.mktemp("built") / "bundle"
    result = build(BuildRequest(st_student, masks_path, router_encoder, out))
    assert result.passed
    return out


def test_bundle_contents_and_manifest(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schema"] == "edgecompile-bundle/1"
    assert {"edgecompile", "onnx", "onnxruntime"} <= set(manifest["tool"]) and manifest["export_opset"] == 17
    # the cpu target keeps the export's opset so its files load on onnxruntime 1.20 (see test_runtime_floor.py)
    cpu = manifest["targets"]["cpu"]
    assert all(graph["opset"] == 17 for graph in cpu["graphs"].values())
    assert (cpu["min_onnxruntime"], cpu["opset"], cpu["files_need_onnxruntime"]) == ("1.20", 17, "1.20")
    for name in ["router.onnx", "dense.onnx", "weights.bin"] + [f"cluster_{k}.onnx" for k in CLUSTERS]:
        assert (bundle / "cpu" / name).is_file(), name
    for name in ["parity.json", "parity.md", "reference/samples.txt", "reference/outputs.safetensors", "tokenizer/vocab.txt"]:
        assert (bundle / name).is_file(), name
    graphs = manifest["targets"]["cpu"]["graphs"]
    assert [o["name"] for o in graphs["router"]["outputs"]] == ["cluster_id", "distances"]
    assert graphs["router"]["outputs"][0]["dtype"] == "int64"
    assert [i["name"] for i in graphs["cluster_0"]["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert graphs["cluster_0"]["inputs"][0]["shape"] == ["batch_size", "sequence_length"]
    clusters = {c["id"]: c for c in manifest["clusters"]}
    assert clusters[0]["macs_ratio_vs_dense"] == 1.0
    assert clusters[1]["kept"]["attention_blocks_kept"] == 1 and clusters[1]["kept"]["ffn_blocks_kept"] == 1
    assert clusters[2]["kept"]["layers"][0]["heads"] == [0, 2] and clusters[2]["kept"]["layers"][1]["heads"] == []
    assert clusters[3]["kept"]["layers_without_compute"] == [0, 1] and clusters[3]["macs_per_token"]["total"] == 0
    assert clusters[3]["parameters"] < clusters[2]["parameters"] < clusters[0]["parameters"]
    # every file is listed with its hash, and each cluster names the files it needs
    files = manifest["files"]
    assert set(files) == {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(clusters[2]["files"]["cpu"]) == {"cpu/cluster_2.onnx", "cpu/weights.bin"}
    assert clusters[2]["files"]["cpu"]["cpu/cluster_2.onnx"] == files["cpu/cluster_2.onnx"]["sha256"]
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["passed"] and {row["graph"] for row in parity["targets"]["cpu"]["rows"]} >= {"router", "dense", "end-to-end", "cluster_3"}


def test_shared_weights_are_stored_once(bundle):
    total_external = 0
    import onnx

    for k in CLUSTERS:
        model = onnx.load(str(bundle / "cpu" / f"cluster_{k}.onnx"), load_external_data=False)
        total_external += sum(
            int(next(e.value for e in t.external_data if e.key == "length")) for t in model.graph.initializer if t.external_data
        )
    assert (bundle / "cpu" / "weights.bin").stat().st_size < total_external


def test_inspect_run_verify_bench(cli, bundle):
    code, out, _ = cli("inspect", bundle)
    assert code == 0 and "cluster 3" in out and "PASSED" in out and "cosine distance to 4 centroids" in out
    code, out, _ = cli("run", bundle, "--text", "Where is the nearest train station?")
    assert code == 0
    result = json.loads(out)
    assert result["cluster_id"] == int(np.argmin(result["distances"])) and len(result["distances"]) == 4
    assert len(result["outputs"]["sentence_embedding"]) == 32
    assert len(result["outputs"]["token_embeddings"]) == result["tokens"]
    code, out, err = cli("verify", bundle)
    assert code == 0 and "parity passed" in err and "end-to-end" in out
    code, out, _ = cli("bench", bundle, "--runs", "3", "--warmup", "1", "--sequence", "16")
    assert code == 0 and "cluster_3" in out and "p50 ms" in out and "routed (router + cluster)" in out


def test_run_matches_the_reference_router_and_cluster(bundle, st_student, router_encoder, masks_path):
    """The app path (router.onnx then cluster_k.onnx) against the PyTorch reference, end to end."""
    import torch

    from edgecompile.bundle.store import load_bundle
    from edgecompile.serve.infer import route_and_run
    from edgecompile.inputs.masks import load_masks
    from edgecompile.families import load_student
    from edgecompile.families.bert import bert_gates
    from edgecompile.reference.router import RouterModule
    from edgecompile.families.bert_model import load_student_module
    from edgecompile.inputs.tokens import load_tokenizer

    text = "Please schedule a meeting with the design team"
    got = route_and_run(load_bundle(bundle), text)
    spec = load_student(st_student)
    router = RouterModule(load_student_module(load_student(router_encoder)), *(lambda m: (m.centroids, m.metric))(load_masks(masks_path, spec, 24)))
    enc = load_tokenizer(router_encoder)(text, return_tensors="pt")
    with torch.no_grad():
        k, distances = router(enc["input_ids"], enc["attention_mask"])
    assert got["cluster_id"] == int(k[0])
    np.testing.assert_allclose(got["distances"], distances[0].numpy(), rtol=1e-5)
    student = load_student_module(spec)
    gates_ = bert_gates(student.bert)
    gates_.set(load_masks(masks_path, spec, 24).clusters[int(k[0])])
    enc = load_tokenizer(st_student)(text, return_tensors="pt")
    with torch.no_grad():
        ref = student(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[1][0].numpy()
    np.testing.assert_allclose(got["outputs"]["sentence_embedding"], ref, rtol=1e-4, atol=1e-6)


def test_rebuild_is_byte_identical(bundle, tmp_path, st_student, router_encoder, masks_path):
    from edgecompile.build import BuildRequest, build

    again = tmp_path / "again"
    build(BuildRequest(st_student, masks_path, router_encoder, again))
    first = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    second = {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()}
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_force_replaces_a_bundle(cli, tmp_path, st_student, router_encoder, masks_file):
    out = tmp_path / "b"
    one = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))}, path=tmp_path / "one.safetensors")
    two = masks_file({0: gates(blocks=np.ones((LAYERS, 2))), 1: gates(heads=np.ones((LAYERS, HEADS)))}, path=tmp_path / "two.safetensors")
    assert cli("build", st_student, "--masks", one, "--router-encoder", router_encoder, "--out", out, "-q")[0] == 0
    code, _, err = cli("build", st_student, "--masks", two, "--router-encoder", router_encoder, "--out", out, "-q")
    assert code == 2 and "already exists" in err
    assert len(json.loads((out / "manifest.json").read_text())["clusters"]) == 1
    assert cli("build", st_student, "--masks", two, "--router-encoder", router_encoder, "--out", out, "-q", "--force")[0] == 0
    assert len(json.loads((out / "manifest.json").read_text())["clusters"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "one.safetensors", "two.safetensors"]


def test_parity_miss_fails_the_build_with_a_table(cli, tmp_path, st_student, router_encoder, masks_file):
    strict = tmp_path / "strict.toml"
    strict.write_text(
        (Path(__file__).parents[1] / "targets" / "cpu.toml").read_text().replace("max_relative_error = 1e-4", "max_relative_error = 1e-12")
    )
    masks = masks_file({0: gates(blocks=np.ones((LAYERS, 2)))})
    out = tmp_path / "b"
    code, stdout, err = cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", out, "-q", "--target", strict)
    assert code == 3
    assert err.startswith("error: parity failed; no bundle was written")
    assert "| cpu | cluster_0 | sentence_embedding |" in err and "FAIL: max rel error" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_verify_detects_tampering(cli, bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "cpu" / "weights.bin", "r+b") as handle:
        handle.seek(5000)
        byte = handle.read(1)
        handle.seek(5000)
        handle.write(bytes([byte[0] ^ 1]))
    code, _, err = cli("verify", copy)
    assert code == 5 and "cpu/weights.bin: sha256 expected" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_build_leaves_no_bundle(tmp_path, st_student, router_encoder, masks_path, sig):
    out = tmp_path / "bundle"
    samples = tmp_path / "samples.txt"  # enough work after the staging folder exists to interrupt it
    samples.write_text("\n".join(f"sample number {i} about the weather and trains" for i in range(600)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecompile", "build", str(st_student), "--masks", str(masks_path),
         "--router-encoder", str(router_encoder), "--out", str(out), "--samples", str(samples)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    seen = []
    for line in proc.stderr:  # wait until the build is writing into its staging folder
        seen.append(line)
        if "writing graphs" in line:
            break
    time.sleep(0.05)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    code = proc.wait(timeout=60)
    assert not out.exists(), "".join(seen) + rest
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 130 and "interrupted; nothing was written" in rest and "Traceback" not in rest
        assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.txt"]


@pytest.mark.parametrize("family,outputs", [("seqcls_student", ["logits"]), ("bert_student", ["last_hidden_state", "pooler_output"])])
def test_other_families_build(request, tmp_path, router_encoder, masks_file, family, outputs):
    from edgecompile.build import BuildRequest, build

    masks = masks_file({0: gates(heads=[[1, 0, 1, 1], [0, 1, 1, 1]]), 1: gates(blocks=[[1, 0], [0, 1]])})
    result = build(BuildRequest(request.getfixturevalue(family), masks, router_encoder, tmp_path / "b"))
    assert result.manifest["student"]["outputs"] == outputs
    rows = json.loads((tmp_path / "b" / "parity.json").read_text())["targets"]["cpu"]["rows"]
    if family == "seqcls_student":
        assert all(r["agreement"] == 1.0 for r in rows if r["output"] == "logits")
