"""Cheap routers: a model2vec static-embedding router and a truncated sentence-transformers router, each
checked against its own library (model2vec's StaticModel.encode, sentence-transformers with the same
truncation), and masks files that name the router their centroids were fitted for."""

from __future__ import annotations

import json
from pathlib import Path

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from conftest import centroids, gates
from factories import make_model2vec, write_masks
from edgecompile.inputs.samples import BUILTIN_SAMPLES

TEXTS = list(BUILTIN_SAMPLES[:6]) + ["naïve café ü 漢字 🙂 résumé", "!!!", "the " * 300, "zzzz qqqq"]
CLUSTERS = {0: gates(blocks=np.ones((2, 2))), 1: gates(blocks=[[0, 1], [1, 0]]), 2: gates(blocks=np.zeros((2, 2)))}


@pytest.fixture(scope="session", params=["float32", "float16"])
def model2vec_router(request, models_dir, router_encoder) -> Path:
    return make_model2vec(models_dir / f"m2v_{request.param}", router_encoder, request.param)


def router_graph(router_module) -> ort.InferenceSession:
    from edgecompile.families.router import export_router

    model = export_router(router_module)
    import onnx_ir as ir

    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def run_router(session, samples) -> tuple[np.ndarray, np.ndarray]:
    from edgecompile.inputs.tokens import pad_batch

    feed = pad_batch(samples)
    return tuple(session.run(None, {"input_ids": feed["input_ids"], "attention_mask": feed["attention_mask"]}))


def l2_distances(embeddings: np.ndarray, cents: np.ndarray) -> np.ndarray:
    return np.linalg.norm(embeddings[:, None, :].astype(np.float64) - cents[None].astype(np.float64), axis=-1)


def test_static_router_matches_model2vec_encode(model2vec_router):
    from model2vec import StaticModel

    from edgecompile.inputs.router import encode_router, load_router_tokenizer

    from edgecompile.families.router import load_router
    from edgecompile.reference.router import RouterModule, load_static_encoder

    spec = load_router(model2vec_router)
    model = StaticModel.from_pretrained(str(model2vec_router))
    assert spec.kind == "static" and spec.embedding_dim == model.dim and spec.static["dtype"] == str(model.embedding.dtype)
    tokenizer = load_router_tokenizer(spec, spec.tokenization)
    tolerance = 1e-5 if spec.static["dtype"] == "float32" else 2e-3  # model2vec rounds a float16 mean to float16
    import torch

    router = RouterModule(load_static_encoder(model2vec_router), cents := centroids(3, dim=spec.embedding_dim, seed=4),
                          "l2").eval()
    # the tokenization is the installed model2vec's own: the character pre-cut, the token cut, and dropping the
    # unknown token before (< 0.10) or after (>= 0.10) that cut; unknown tokens sit inside the first 8 tokens here
    texts = TEXTS + ["🙂 漢字 🙂 a b c d e f g h i", "x 🙂 y 🙂 z 🙂 w v u t s r"]
    for max_length in (512, 8):
        tokenization = replace(spec.tokenization, truncate_characters=max_length * spec.static["median_token_length"])
        samples = encode_router(tokenizer, tokenization, texts, max_length)
        reference = model.encode(texts, max_length=max_length)  # the peer implementation
        with torch.no_grad():
            for text, sample, expected in zip(texts, samples, reference):
                ids = torch.from_numpy(sample.input_ids)[None]
                got = router.encoder(ids, torch.ones_like(ids))[0].numpy()
                np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0, err_msg=f"{text!r} at {max_length}")
    unk = spec.static["unk_id"]
    assert unk is not None and any(unk in e.ids[:8] for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    other = replace(spec.tokenization, drop_before_truncation=not spec.tokenization.drop_before_truncation)
    assert [s.input_ids.tolist() for s in encode_router(tokenizer, other, texts, 8)] != [
        s.input_ids.tolist() for s in encode_router(tokenizer, spec.tokenization, texts, 8)]  # the order matters here
    samples = encode_router(tokenizer, spec.tokenization, TEXTS, 512)
    reference = model.encode(TEXTS)
    cluster_id, distances = run_router(router_graph(router), samples)
    np.testing.assert_allclose(distances, l2_distances(reference, cents), atol=5 * tolerance, rtol=0)
    assert (cluster_id == l2_distances(reference, cents).argmin(axis=1)).all()
    assert np.linalg.norm(reference[TEXTS.index("!!!")]) in (0.0, pytest.approx(1.0))  # empty or not, both agree


def test_truncated_router_matches_sentence_transformers_truncation(router_encoder):
    import torch
    from sentence_transformers import SentenceTransformer

    from edgecompile.inputs.router import encode_router, load_router_tokenizer

    from edgecompile.families.router import load_router
    from edgecompile.reference.router import RouterModule, TransformerSentenceEncoder
    from edgecompile.families.bert_model import load_student_module

    spec = load_router(router_encoder, layers=1)
    peer = SentenceTransformer(str(router_encoder), device="cpu")
    transformer = peer[0].auto_model
    transformer.encoder.layer = torch.nn.ModuleList(list(transformer.encoder.layer)[:1])
    reference = peer.encode(TEXTS[:7], convert_to_numpy=True)
    cents = centroids(3, dim=spec.embedding_dim, seed=5)
    router = RouterModule(TransformerSentenceEncoder(load_student_module(spec.encoder), 1), cents, "l2").eval()
    samples = encode_router(load_router_tokenizer(spec, spec.tokenization), spec.tokenization, TEXTS[:7], 64)
    cluster_id, distances = run_router(router_graph(router), samples)
    np.testing.assert_allclose(distances, l2_distances(reference, cents), atol=1e-5, rtol=0)
    assert (cluster_id == l2_distances(reference, cents).argmin(axis=1)).all()
    full = RouterModule(TransformerSentenceEncoder(load_student_module(spec.encoder)), cents, "l2").eval()
    assert not np.allclose(run_router(router_graph(full), samples)[1], distances)  # truncation really changed it


def test_build_run_verify_with_a_model2vec_router(cli, tmp_path, st_student, model2vec_router):
    from edgecompile.inputs.router import router_metadata
    from edgecompile.families.router import load_router

    spec = load_router(model2vec_router)
    masks = write_masks(tmp_path / "m.safetensors", CLUSTERS, centroids(3, dim=spec.embedding_dim),
                        metadata={"format": "edgecompile-masks/1", "router.metric": "cosine", **router_metadata(spec)})
    out = tmp_path / "bundle"
    code, table, err = cli("build", st_student, "--masks", masks, "--router-encoder", model2vec_router, "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    router = manifest["router"]
    assert router["kind"] == "static" and router["masks_name_this_router"] and router["macs_per_token"]["encoder"] == 0
    assert router["tokenization"]["special_tokens"] is False and manifest["router"]["tokenizer"] == "router_tokenizer"
    code, out_json, err = cli("run", out, "--text", TEXTS[0])
    assert code == 0, err
    from model2vec import StaticModel

    expected = 1 - StaticModel.from_pretrained(str(model2vec_router)).encode([TEXTS[0]]) @ (
        (c := centroids(3, dim=spec.embedding_dim)) / np.linalg.norm(c, axis=1, keepdims=True)).T
    np.testing.assert_allclose(json.loads(out_json)["distances"], expected[0], atol=5e-3)
    code, _, err = cli("verify", out)
    assert code == 0, err


def test_masks_fitted_for_another_router_is_one_line(cli, tmp_path, st_student, router_encoder):
    from edgecompile.inputs.router import router_metadata
    from edgecompile.families.router import load_router

    fitted_for = router_metadata(load_router(router_encoder))  # the full encoder
    masks = write_masks(tmp_path / "m.safetensors", CLUSTERS, centroids(3),
                        metadata={"format": "edgecompile-masks/1", "router.metric": "l2", **fitted_for})
    code, _, err = cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--router-layers", "1",
                       "--out", tmp_path / "b")
    assert code == 2 and len([line for line in err.splitlines() if line.startswith("error")]) == 1
    assert not (tmp_path / "b").exists()
    assert "metadata 'router.encoder.layers': expected 1" in err and "found 2" in err and "refit" in err
    tampered = dict(fitted_for, **{"router.encoder.sha256": "0" * 64})
    write_masks(masks, CLUSTERS, centroids(3), metadata={"format": "edgecompile-masks/1", "router.metric": "l2", **tampered})
    code, _, err = cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "b")
    assert code == 2 and "metadata 'router.encoder.sha256'" in err


def test_router_layers_out_of_range_and_on_a_static_router(cli, tmp_path, st_student, router_encoder, model2vec_router):
    masks = write_masks(tmp_path / "m.safetensors", CLUSTERS, centroids(3))
    code, _, err = cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--router-layers", "3",
                       "--out", tmp_path / "b")
    assert code == 2 and "--router-layers: layers: expected 1 .. 2" in err
    code, _, err = cli("build", st_student, "--masks", masks, "--router-encoder", model2vec_router, "--router-layers", "1",
                       "--out", tmp_path / "b")
    assert code == 2 and "a static-embedding model2vec model" in err


def test_bench_routed_over_given_samples_agrees_with_the_router(cli, tmp_path, st_student, router_encoder):
    masks = write_masks(tmp_path / "m.safetensors", CLUSTERS, centroids(3))
    out = tmp_path / "bundle"
    assert cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--router-layers", "1",
               "--out", out, "-q")[0] == 0
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:5]) + "\n")
    code, stdout, err = cli("bench", out, "--runs", "3", "--warmup", "0", "--samples", texts, "--json", tmp_path / "b.json")
    assert code == 0, err
    routed = json.loads((tmp_path / "b.json").read_text())["routed"]
    picked = [json.loads(cli("run", out, "--text", t)[1])["cluster_id"] for t in TEXTS[:5]]
    assert routed["inputs"] == 5 and routed["source"] == str(texts)
    assert routed["clusters_chosen"] == {f"cluster_{k}": picked.count(k) for k in sorted(set(picked))}
    code, stdout, _ = cli("inspect", out)
    assert "router " in stdout and "transformer, 1 of 2 layers" in stdout


def test_compare_routers_reports_cost_and_agreement(cli, tmp_path, st_student, router_encoder, model2vec_router):
    from edgecompile.families.router import load_router

    full_masks = write_masks(tmp_path / "full.safetensors", CLUSTERS, centroids(3))
    static_dim = load_router(model2vec_router).embedding_dim
    static_masks = write_masks(tmp_path / "static.safetensors", CLUSTERS, centroids(3, dim=static_dim, seed=9))
    full, static = tmp_path / "full", tmp_path / "static"
    assert cli("build", st_student, "--masks", full_masks, "--router-encoder", router_encoder, "--out", full, "-q")[0] == 0
    assert cli("build", st_student, "--masks", static_masks, "--router-encoder", model2vec_router, "--out", static, "-q")[0] == 0
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:6]) + "\n")
    code, out, err = cli("compare-routers", full, static, "--samples", texts, "--runs", "3", "--json", tmp_path / "c.json")
    assert code == 0, err
    data = json.loads((tmp_path / "c.json").read_text())
    picked = {b: [json.loads(cli("run", b, "--text", t)[1])["cluster_id"] for t in TEXTS[:6]] for b in (full, static)}
    expected = float(np.mean(np.array(picked[full]) == np.array(picked[static])))
    agreement = data["agreements"][0]
    assert agreement["agreement"] == pytest.approx(expected) and sum(map(sum, agreement["confusion"])) == 6
    assert np.trace(np.array(agreement["confusion"])) == round(expected * 6)
    encoders = [r["encoder"] for r in data["routers"]]
    assert encoders[0] == "transformer, 2 layers" and encoders[1].startswith("static embeddings (model2vec)")
    assert data["routers"][1]["macs_per_token"] == 0 and all(r["p50_ms"] > 0 and r["share_of_dense"] > 0 for r in data["routers"])
    assert "same cluster for" in out and "| bundle | router encoder |" in out
    code, _, err = cli("compare-routers", full, static, "--target", "xnnpack")
    assert code == 2 and "target 'xnnpack' not in this bundle" in err


def test_l2_distances_stay_exact_for_embeddings_that_sit_close_together():
    """A small router's embeddings can all lie within a few hundredths of each other (a model2vec model
    distilled from a tiny encoder did): the distances must keep float32 precision relative to their own
    size, in PyTorch and in the exported graph, against float64."""
    import torch
    from torch import nn

    from edgecompile.reference.router import RouterModule

    rng = np.random.default_rng(0)
    direction = rng.normal(size=32)
    direction /= np.linalg.norm(direction)
    near = lambda n: (direction + 0.02 / np.sqrt(32) * rng.normal(size=(n, 32))).astype(np.float32)  # noqa: E731
    points, embeddings = near(3), near(8)

    class Fixed(nn.Module):  # a stand-in encoder: the embedding is a row of a constant table
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.from_numpy(embeddings))

        def forward(self, input_ids, attention_mask):
            return self.table[input_ids[:, 0]] * attention_mask[:, :1].to(torch.float32)

    router = RouterModule(Fixed(), points, "l2").eval()
    truth = np.sqrt(((embeddings.astype(np.float64)[:, None] - points.astype(np.float64)[None]) ** 2).sum(-1))
    ids = torch.arange(8).reshape(8, 1)
    with torch.no_grad():
        torch_distances = router.distances(router.embed(ids, torch.ones_like(ids))).numpy()
    assert np.abs(torch_distances - truth).max() / truth.max() < 1e-5
    import onnx_ir as ir

    from edgecompile.families.bert import export_module
    from edgecompile.reference.router import ROUTER_INPUT_NAMES, ROUTER_OUTPUT_NAMES

    model = export_module(router, (ids, torch.ones_like(ids)), ROUTER_INPUT_NAMES, ROUTER_OUTPUT_NAMES, {})
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    _, graph_distances = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((8, 1), np.int64)})
    assert np.abs(graph_distances - truth).max() / truth.max() < 1e-5


def test_bench_table_gives_no_latency_per_mac_for_a_router_doing_almost_no_macs():
    from edgecompile.serve.bench import BenchReport, BenchRow, bench_table

    metadata = {"target": "cpu", "executed_on": "CPUExecutionProvider", "target_provider": "CPUExecutionProvider",
                "onnxruntime": "1", "threads": 1, "runs": 3, "processor": "x", "graphs_shape": {"batch": 1, "sequence": 128}}
    report = BenchReport(metadata, [BenchRow("router", 0.5, 0.6, 0.007, 7e-7, 8),
                                    BenchRow("dense", 70.0, 80.0, 1.0, 1.0, 11_000_000),
                                    BenchRow("cluster_0", 38.0, 47.0, 0.546, 0.588, 6_500_000)])
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in bench_table(report).splitlines() if line.startswith("| ")}
    assert rows["router"] == "—" and rows["dense"] == "1.000" and rows["cluster_0"] == "0.929"


def test_adopt_masks_keeps_masks_of_the_same_router_and_refits_them_only_for_the_same_space(tmp_path, models_dir, router_encoder):
    """examples/fit_router_centroids.adopt_masks, what the MiniLM quickstart does with recipe 1's masks: the router it
    distils is the recipe's (same sha256: the file as it is) or differs in its last bits (centroids refitted on the
    clustering texts land where the shipped ones are, so the build's router check passes); a router of another
    space with the same kind and width, another kind, or a masks file it cannot carry over are refused in one line."""
    import shutil
    import sys

    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    from sklearn.cluster import KMeans

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    from fit_router_centroids import adopt_masks, embed, write_router_masks

    from edgecompile.families.router import load_router
    from edgecompile.inputs.router import check_masks_router

    def metadata(path: Path) -> dict:
        with safe_open(str(path), "np") as f:
            return f.metadata()

    def copy_with(name: str, change) -> Path:  # another distillation of the recipe's router: its table changed by `change`
        folder = Path(shutil.copytree(recipe_router, tmp_path / name))
        table = load_file(str(folder / "model.safetensors"))
        save_file({n: change(t).astype(t.dtype) for n, t in table.items()}, str(folder / "model.safetensors"))
        return folder

    recipe_router = make_model2vec(models_dir / "m2v_adopt", router_encoder)
    texts = list(BUILTIN_SAMPLES)
    kmeans = KMeans(n_clusters=3, n_init=10, random_state=0).fit(embed(recipe_router, texts).astype(np.float64))
    shipped = tmp_path / "recipe_masks.safetensors"  # as recipe 1 writes them: KMeans centroids of the clustering texts
    write_router_masks(shipped, kmeans.cluster_centers_.astype(np.float32), recipe_router, None, CLUSTERS)

    same = adopt_masks(shipped, recipe_router, texts, texts, tmp_path / "same.safetensors")
    assert "used as they are" in same and (tmp_path / "same.safetensors").read_bytes() == shipped.read_bytes()

    noise = np.random.default_rng(0).standard_normal
    last_bits = copy_with("m2v_last_bits", lambda t: t + 1e-6 * np.abs(t).max() * noise(t.shape))
    moved = adopt_masks(shipped, last_bits, texts, texts, tmp_path / "out" / "moved.safetensors")
    assert "refitted" in moved and "100.0% of" in moved
    spec = load_router(last_bits)
    assert metadata(tmp_path / "out" / "moved.safetensors")["router.encoder.sha256"] == spec.sha256
    assert check_masks_router(tmp_path / "out" / "moved.safetensors", metadata(tmp_path / "out" / "moved.safetensors"), spec)
    with safe_open(str(tmp_path / "out" / "moved.safetensors"), "np") as f, safe_open(str(shipped), "np") as g:
        np.testing.assert_allclose(f.get_tensor("router.centroids"), g.get_tensor("router.centroids"), atol=1e-4)
        for k in CLUSTERS:  # the clusters' gates travel unchanged
            np.testing.assert_array_equal(f.get_tensor(f"cluster.{k}.blocks"), g.get_tensor(f"cluster.{k}.blocks"))

    flipped = copy_with("m2v_flipped", lambda t: t * np.where(np.arange(t.shape[-1]) == 0, -1.0, 1.0))  # one axis: same kind, width
    refusals = [(flipped, "is not the router"), (router_encoder, "found static / 24"),
                (recipe_router, None), (tmp_path / "nowhere", "--cheap-encoder")]
    for router, says in refusals:
        source = shipped
        if says is None:  # cosine centroids: the refit's l2 means would silently change the routing rule
            source = write_masks(tmp_path / "cosine.safetensors", CLUSTERS, kmeans.cluster_centers_.astype(np.float32), metric="cosine")
            says = "expected l2, hard gates"
        with pytest.raises(SystemExit) as refused:
            adopt_masks(source, router, texts, texts, tmp_path / "refused.safetensors")
        assert says in str(refused.value) and len(str(refused.value).splitlines()) == 1, str(refused.value)
        assert not (tmp_path / "refused.safetensors").exists() and not (tmp_path / "refused.safetensors.adopting").exists()
