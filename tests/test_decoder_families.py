"""Every decoder family (families/llama.py, qwen2.py, qwen3.py, gemma3.py) held to the same tests: its graph against
transformers' own model of the family, cluster rewrites against the gated reference, `edgecompile build` / `run`
with onnxruntime-genai loading the folder, binary Linears, and multi-token heads where the family has them.
Each model is a tiny random one made by transformers' own config class for the family (tests/factories.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from factories import DECODER_FAMILIES, add_mtp_heads, make_bert, make_decoder, write_masks
from edgecompile.families import family_for
from edgecompile.inputs.masks import ClusterMasks
from edgecompile.passes.pipeline import build_cluster_graph
from edgecompile.runtime.decode import empty_cache, greedy

LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 4, 4, 2, 128
FAMILIES = list(DECODER_FAMILIES)
NEW = [f for f in FAMILIES if f != "llama"]  # llama's build and low-bit paths are tests/test_decoder.py's
PROMPTS = ["How do I reset my password?", "Paris is the capital of France.", "Ok"]
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}  # config.json's, and genai's


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: make_decoder(root / family, family, seed=31 + i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("families_router") / "router", family="st", seed=6, hidden=24, heads=2, intermediate=48)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("family_prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def loaded(path):
    config = json.loads((path / "config.json").read_text())
    family = family_for(path / "config.json", config)
    dims = family.dims(config)
    return family, dims, family.load_weights(path / "model.safetensors", dims), family.load_reference(path)


def session_of(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def prefill(session: ort.InferenceSession, ids: list[int]) -> np.ndarray:
    x = np.array([ids], np.int64)
    return session.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x), **empty_cache(session)})[0][0]


def reference_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def cluster(blocks=None, heads=None, neurons=None, index=0) -> ClusterMasks:
    def gate(value, shape):
        return np.ones(shape, np.float32) if value is None else np.asarray(value, np.float32).reshape(shape)

    return ClusterMasks(index, gate(blocks, (LAYERS, 2)), gate(heads, (LAYERS, HEADS)), gate(neurons, (LAYERS, INTERMEDIATE)))


CASES = {
    "blocks": cluster(blocks=[[1, 0], [0, 1], [0, 0], [1, 1]]),
    "soft_blocks": cluster(blocks=[[0.5, 1], [1, 0.3], [1, 1], [0.7, 0.9]]),
    "whole_kv_groups": cluster(heads=[[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]),
    "partial_groups_and_soft_heads": cluster(heads=[[1, 0, 1, 1], [0.5, 1, 1, 0], [0, 1, 0, 0.25], [1, 1, 1, 1]]),
    "neurons": cluster(neurons=(np.random.default_rng(0).random((LAYERS, INTERMEDIATE)) > 0.5)
                       * np.random.default_rng(1).uniform(0.2, 1.0, (LAYERS, INTERMEDIATE))),
}
# longer than the Gemma 3 test model's sliding window (6), so its sliding layers must look back only that far
IDS = [0, 17, 45, 99, 120, 7, 3, 50, 11, 230, 64, 8, 199, 31, 77, 150]


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_graph_matches_the_familys_transformers_model(models, family):
    fam, dims, weights, model = loaded(models[family])
    assert fam.name == family
    session = session_of(fam.export(weights, dims))
    assert relative_error(prefill(session, IDS), reference_logits(model, IDS)) < 1e-5
    with torch.no_grad():
        expected = model.generate(torch.tensor([IDS]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(IDS):]
    assert greedy(session, IDS, 16).tokens == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_cluster_rewrites_match_the_gated_reference(models, family, case):
    masks = CASES[case]
    fam, dims, weights, model = loaded(models[family])
    graph = build_cluster_graph(fam.export(weights, dims), fam.structure(dims), masks)
    fam.gates(model, dims).set(masks)
    assert relative_error(prefill(session_of(graph), IDS), reference_logits(model, IDS)) < 1e-5
    attention_kept = [i for i in range(LAYERS) if masks.blocks[i, 0] != 0 and masks.heads[i].any()]
    past = sorted(v.name for v in graph.graph.inputs if v.name.startswith("past_key_values.") and v.name.endswith("key"))
    assert past == [f"past_key_values.{i}.key" for i in attention_kept]


def test_gemma3_layers_keep_their_own_window_and_rope():
    from edgecompile.families.gemma3 import Gemma3

    config = {"num_hidden_layers": 4, "sliding_window": 6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
              "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}
    assert Gemma3.layer_windows(config) == [6, -1, 6, -1]
    assert [r["rope_theta"] for r in Gemma3.layer_ropes(config)] == [1e4, 1e6, 1e4, 1e6]
    # transformers' own default pattern: every 6th layer global
    assert Gemma3.layer_windows({"num_hidden_layers": 7, "sliding_window": 512}) == [512] * 5 + [-1, 512]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, models, router, prompts_file):
    """One bundle per new family: dense, a cluster keeping everything, one removing sub-layers, one slicing heads and neurons."""
    from edgecompile.build import BuildRequest, build

    built = {}
    for family in NEW:
        root = tmp_path_factory.mktemp(f"bundle_{family}")
        rng = np.random.default_rng(3)
        clusters = {
            0: {"blocks": np.ones((LAYERS, 2))},
            1: {"blocks": np.array([[1, 0], [0, 1], [1, 1], [0, 0.5]])},
            2: {"heads": np.array([[0, 0, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0.5]]),
                "neurons": (rng.random((LAYERS, INTERMEDIATE)) > 0.4).astype(np.float32)},
        }
        masks = write_masks(root / "masks.safetensors", clusters, (rng.standard_normal((3, 24)) * 0.3).astype(np.float32))
        result = build(BuildRequest(models[family], masks, router, root / "bundle", samples=prompts_file))
        built[family] = root / "bundle", result
    return built


@pytest.mark.parametrize("family", NEW)
def test_build_proves_greedy_parity_through_both_runtimes(bundles, family):
    _, result = bundles[family]
    for graph in ("dense", "cluster_0", "cluster_1", "cluster_2"):
        for row in ("prefill_logits", "greedy tokens (onnxruntime)", "greedy tokens (onnxruntime-genai)"):
            assert f"| cpu | {graph} | {row} | {len(PROMPTS)} |" in result.table
    assert "FAIL" not in result.table and "greedy tokens (routed, onnxruntime)" in result.table
    assert result.manifest["student"]["family"] == family
    assert result.manifest["student"]["genai_model_type"] == MODEL_TYPES[family]


@pytest.mark.parametrize("family", NEW)
def test_run_and_onnxruntime_genai_give_the_references_tokens(bundles, family, cli):
    import onnxruntime_genai as og
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    from edgecompile.runtime.genai import genai_greedy

    out, _ = bundles[family]
    code, stdout, stderr = cli("run", out, "--prompt", PROMPTS[1], "--max-new-tokens", "32")
    assert code == 0, stderr
    result = json.loads(stdout)
    reference = load_file(str(out / "reference" / "outputs.safetensors"))
    assert result["token_ids"] == reference[f"cluster_{result['cluster_id']}/greedy_tokens/0001"].tolist()
    manifest = json.loads((out / "manifest.json").read_text())
    config = json.loads((out / "cpu" / "decoder" / "genai_config.json").read_text())
    assert config["model"]["type"] == MODEL_TYPES[family]
    model = og.Model(str(out / "cpu" / "decoder"))  # the folder as is: dense.onnx
    ids = AutoTokenizer.from_pretrained(str(out / manifest["student"]["tokenizer"]))(PROMPTS[0])["input_ids"]
    assert genai_greedy(model, ids, 32) == reference["dense/greedy_tokens/0000"].tolist()
    code, _, stderr = cli("verify", out)
    assert code == 0, stderr


@pytest.mark.parametrize("family", NEW)
def test_binary_linears_build_with_greedy_parity(models, router, prompts_file, tmp_path, family):
    """XTC W1A8 on every Linear of the layers (q/k/v with their biases in Qwen2), the exact integer kernels."""
    import shutil

    from edgecompile.build import BuildRequest, build

    student = tmp_path / "student"
    shutil.copytree(models[family], student)
    (student / "edgecompile.json").write_text(json.dumps({"format": "edgecompile-lowbit/1", "linear": [{
        "modules": ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"], "bits": 1, "groups": "row",
        "activations": "dynamic"}]}))
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))},
                                                     1: {"blocks": [[1, 0], [0, 1], [1, 1], [1, 0]],
                                                         "heads": [[1, 1, 0.5, 0], [1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]}},
                        (np.random.default_rng(5).standard_normal((2, 24)) * 0.3).astype(np.float32))
    result = build(BuildRequest(student, masks, router, tmp_path / "out", samples=prompts_file))
    assert "FAIL" not in result.table
    target = result.manifest["targets"]["cpu"]
    assert target["lowbit_graphs"] == ["cluster_0", "cluster_1", "dense"]
    groups = target["lowering"]["dense"]["lowbit"]["linear_groups"]
    assert all(g["kernel"] == "MatMulIntegerToFloat" for g in groups) and len(groups) >= 4 * LAYERS


@pytest.mark.parametrize("family", [f for f in NEW if family_for(None, {"model_type": MODEL_TYPES[f]}).multi_token_heads])
def test_multi_token_heads_match_the_familys_decoder_layer(tmp_path, family):
    from edgecompile.families.mtp import head_logits, load_extra_heads

    path = add_mtp_heads(make_decoder(tmp_path / "mtp", family, seed=41), 3, seed=4)
    fam, dims, weights, reference = loaded(path)
    session = session_of(fam.export(weights, dims))
    ids = IDS[:9]
    expected = head_logits(reference, load_extra_heads(fam, reference, weights, dims.extra_heads), ids)
    x = np.array([ids], np.int64)
    names = ["logits", "logits_1", "logits_2"]
    for name, value, ref in zip(names, session.run(names, {"input_ids": x, "attention_mask": np.ones_like(x), **empty_cache(session)}),
                                expected):
        assert relative_error(value[0], ref if name == "logits" else ref[-1:]) < 1e-5, name  # extra heads: the last position
