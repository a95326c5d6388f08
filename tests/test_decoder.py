"""Decoder language models (families/llama.py): the graph against transformers' own LlamaForCausalLM,
cluster rewrites against the gated reference, and `edgecompile build` / `run` end to end with
onnxruntime-genai loading the shipped folders unchanged."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from factories import make_bert, make_llama, write_masks
from test_bad_inputs import assert_one_line_error
from edgecompile.families.llama import Llama
from edgecompile.inputs.masks import ClusterMasks
from edgecompile.passes.pipeline import build_cluster_graph
from edgecompile.runtime.decode import empty_cache, greedy

TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])
LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 4, 4, 2, 128
PROMPTS = ["How do I reset my password?", "Paris is the capital of France.", "Ok"]


@pytest.fixture(scope="session")
def llama(models_dir):
    return make_llama(models_dir / "llama", seed=5)


@pytest.fixture(scope="session")
def llama_router(models_dir):
    return make_bert(models_dir / "llama_router", family="st", seed=6, hidden=24, heads=2, intermediate=48)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def loaded(path):
    dims = Llama.dims(json.loads((path / "config.json").read_text()))
    return dims, Llama.load_weights(path / "model.safetensors", dims), Llama.load_reference(path)


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


@pytest.mark.parametrize("variant", ["untied", "tied", "fresh_init"])
def test_dense_graph_matches_transformers_prefill_and_greedy(models_dir, variant):
    path = make_llama(models_dir / f"llama_{variant}", seed=7, tied=variant == "tied", fresh_init=variant == "fresh_init")
    dims, weights, model = loaded(path)
    session = session_of(Llama.export(weights, dims))
    ids = [0, 17, 45, 99, 120, 7, 3, 50]
    assert relative_error(prefill(session, ids), reference_logits(model, ids)) < 1e-5
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(ids):]
    assert greedy(session, ids, 16).tokens == expected.tolist()


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_tied_embedding_is_stored_once_and_the_logits_stay_within_float_rounding(models_dir, variant):
    """share_tied_embedding: a tied table is read by the Gather and, transposed inside the kernel, by the lm_head
    (FusedMatMul transB); an untied model keeps both tables. The logits move by float rounding at most."""
    from edgecompile.passes.share_tied_embedding import ShareTiedEmbedding

    path = make_llama(models_dir / f"llama_{variant}", seed=7, tied=variant == "tied")
    dims, weights, model = loaded(path)
    ids = [0, 17, 45, 99, 120, 7, 3, 50]
    before = prefill(session_of(Llama.export(weights, dims)), ids)
    graph = Llama.export(weights, dims)
    share = ShareTiedEmbedding()
    ir.passes.PassManager([share, ir.passes.common.RemoveUnusedNodesPass()])(graph)
    tables = [v for v in graph.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT
              and sorted(v.const_value.shape) == sorted([dims.vocab, dims.hidden])]
    assert len(tables) == (1 if variant == "tied" else 2)
    heads = [n for n in graph.graph if n.op_type in ("MatMul", "FusedMatMul") and n.outputs[0].name == "logits"]
    assert [(n.op_type, n.attributes.get_int("transB", 0)) for n in heads] == [("FusedMatMul", 1) if variant == "tied" else ("MatMul", 0)]
    after = prefill(session_of(graph), ids)
    assert relative_error(after, before) < 1e-6  # the same sums; the transposed packing may order them differently
    assert relative_error(before, reference_logits(model, ids)) < 1e-5


def test_reference_greedy_loop_is_transformers_generate_without_deprecated_arguments(llama):
    """The parity oracle's own loop: the tokens of transformers' generate, through the installed release's
    cache argument (transformers 5.24 deprecates `past_key_values`, to be removed in 5.40)."""
    import warnings

    from edgecompile.check.generation import reference_greedy

    _, _, model = loaded(llama)
    ids = [0, 17, 45, 99, 120, 7, 3, 50]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, tokens, _, _ = reference_greedy(model, ids, 16, frozenset())
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(ids):]
    assert tokens == expected.tolist()


CASES = {
    "blocks": cluster(blocks=[[1, 0], [0, 1], [0, 0], [1, 1]]),
    "soft_blocks": cluster(blocks=[[0.5, 1], [1, 0.3], [1, 1], [0.7, 0.9]]),
    "whole_kv_groups": cluster(heads=[[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]),
    "partial_groups_and_soft_heads": cluster(heads=[[1, 0, 1, 1], [0.5, 1, 1, 0], [0, 1, 0, 0.25], [1, 1, 1, 1]]),
    "neurons": cluster(neurons=(np.random.default_rng(0).random((LAYERS, INTERMEDIATE)) > 0.5)
                       * np.random.default_rng(1).uniform(0.2, 1.0, (LAYERS, INTERMEDIATE))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cluster_rewrites_match_the_gated_reference(llama, case):
    masks = CASES[case]
    dims, weights, model = loaded(llama)
    graph = build_cluster_graph(Llama.export(weights, dims), Llama.structure(dims), masks)
    gates = Llama.gates(model, dims)
    gates.set(masks)
    ids = [0, 9, 33, 120, 201, 14, 77]
    assert relative_error(prefill(session_of(graph), ids), reference_logits(model, ids)) < 1e-5
    past = {v.name: int(v.shape[1]) for v in graph.graph.inputs if v.name.startswith("past_key_values.") and v.name.endswith("key")}
    attention_kept = [i for i in range(LAYERS) if masks.blocks[i, 0] != 0 and masks.heads[i].any()]
    assert sorted(past) == [f"past_key_values.{i}.key" for i in attention_kept]
    outputs = {v.name for v in graph.graph.outputs}
    assert outputs == {"logits"} | {f"present.{i}.{kv}" for i in attention_kept for kv in ("key", "value")}
    for i in attention_kept:  # a KV head stays exactly while one of its query heads does
        groups = {h // (HEADS // KV_HEADS) for h in np.flatnonzero(masks.heads[i])}
        assert past[f"past_key_values.{i}.key"] == len(groups)


def test_removed_branches_take_their_norms_and_projections(llama):
    dims, weights, _ = loaded(llama)
    graph = build_cluster_graph(Llama.export(weights, dims), Llama.structure(dims),
                                cluster(blocks=[[0, 1], [1, 0], [1, 1], [1, 1]]))
    names = {n.name for n in graph.graph}
    assert not any(n.startswith("/model/layers.0/input_layernorm") or n.startswith("/model/layers.0/self_attn") for n in names)
    assert not any(n.startswith("/model/layers.1/post_attention_layernorm") or n.startswith("/model/layers.1/mlp") for n in names)
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.graph) == LAYERS - 1


@pytest.fixture(scope="module")
def decoder_bundle(tmp_path_factory, llama, llama_router, prompts_file):
    from edgecompile.build import BuildRequest, build

    root = tmp_path_factory.mktemp("decoder")
    rng = np.random.default_rng(3)
    clusters = {
        0: {"blocks": np.ones((LAYERS, 2))},
        1: {"blocks": np.array([[1, 0], [0, 1], [1, 1], [0, 0]])},
        2: {"heads": np.array([[0, 0, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0.5]]),
            "neurons": (rng.random((LAYERS, INTERMEDIATE)) > 0.4).astype(np.float32)},
    }
    masks = write_masks(root / "masks.safetensors", clusters, (rng.standard_normal((3, 24)) * 0.3).astype(np.float32))
    out = root / "bundle"
    result = build(BuildRequest(llama, masks, llama_router, out, samples=prompts_file))
    return out, result.table


def test_build_reports_prefill_and_greedy_parity_through_both_runtimes(decoder_bundle):
    _, table = decoder_bundle
    for graph in ("dense", "cluster_0", "cluster_1", "cluster_2"):
        for row in ("prefill_logits", "greedy tokens (onnxruntime)", "greedy tokens (onnxruntime-genai)"):
            assert f"| cpu | {graph} | {row} | {len(PROMPTS)} |" in table
    assert "greedy tokens (routed, onnxruntime)" in table and "FAIL" not in table


def test_manifest_lists_each_clusters_kv_cache(decoder_bundle):
    out, _ = decoder_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    by_id = {c["id"]: c for c in manifest["clusters"]}
    assert [e["layer"] for e in by_id[1]["kv_cache"]] == [0, 2]
    assert [e["shape"][1] for e in by_id[2]["kv_cache"]] == [1, 2, 2, 2]
    assert by_id[2]["kept"]["layers"][3]["heads"] == [0, 1, 2, 3] and by_id[2]["kept"]["layers"][1]["heads_zeroed"] == [1]
    for cluster in manifest["clusters"]:
        session = ort.InferenceSession(str(out / "cpu" / "decoder" / f"{cluster['graph']}.onnx"), providers=["CPUExecutionProvider"])
        names = {i.name: i.shape for i in session.get_inputs()}
        for entry in cluster["kv_cache"]:
            assert names[entry["inputs"][0]][1] == entry["shape"][1]


def test_onnxruntime_genai_loads_the_folder_and_every_cluster_by_overlay(decoder_bundle):
    import onnxruntime_genai as og
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    out, _ = decoder_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    reference = load_file(str(out / "reference" / "outputs.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(str(out / manifest["student"]["tokenizer"]))
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    folder = out / manifest["targets"]["cpu"]["genai_folder"]

    def generate(model) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + 32, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt], np.int32))
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens

    assert generate(og.Model(str(folder))) == reference["dense/greedy_tokens/0000"].tolist()  # the folder as is: dense
    for cluster in manifest["clusters"]:
        config = og.Config(str(folder))
        config.overlay(manifest["targets"]["cpu"]["graphs"][cluster["graph"]]["genai_overlay"])
        model = og.Model(config)
        # onnxruntime-genai's own tokenizer loads from the folder; it adds no BOS for this tokenizer class,
        # so apps (and the parity gate) feed transformers' ids
        assert list(map(int, og.Tokenizer(model).encode(PROMPTS[0]))) == tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
        assert generate(model) == reference[f"{cluster['graph']}/greedy_tokens/0000"].tolist()


def test_clusters_share_one_weights_file(decoder_bundle):
    import onnx

    out, _ = decoder_bundle
    folder = out / "cpu" / "decoder"
    assert sorted(p.name for p in folder.glob("*.onnx")) == ["cluster_0.onnx", "cluster_1.onnx", "cluster_2.onnx", "dense.onnx"]
    assert [p.name for p in folder.glob("*.bin")] == ["weights.bin"]

    def extents(graph: str) -> set[tuple[str, str]]:
        model = onnx.load(str(folder / f"{graph}.onnx"), load_external_data=False)
        return {(e["offset"], e["length"]) for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                for e in [{kv.key: kv.value for kv in t.external_data}]}

    dense = extents("dense")
    assert extents("cluster_0") == dense and extents("cluster_1") < dense  # block pruning adds no bytes at all
    assert extents("cluster_2") - dense  # sliced heads / neurons are new tensors, stored once


def test_verify_reruns_decoder_parity_on_the_shipped_folder(decoder_bundle, cli):
    out, _ = decoder_bundle
    code, stdout, stderr = cli("verify", out)
    assert code == 0 and "all file hashes match and parity passed" in stderr, stderr
    assert "| cpu | cluster_2 | greedy tokens (onnxruntime-genai) | 3 |" in stdout and "FAIL" not in stdout


def test_clusters_without_any_attention_or_any_sub_layer_decode_in_both_runtimes(llama, llama_router, prompts_file, tmp_path):
    """Odd but real masks: attention removed in every layer (no KV cache at all), and every sub-layer removed
    (embedding -> final norm -> lm_head), each through onnxruntime-genai too."""
    from edgecompile.build import BuildRequest, build

    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.array([[0, 1]] * LAYERS)},
                                                      1: {"heads": np.zeros((LAYERS, HEADS)), "neurons": np.zeros((LAYERS, INTERMEDIATE))}},
                        (np.random.default_rng(7).standard_normal((2, 24)) * 0.3).astype(np.float32))
    result = build(BuildRequest(llama, masks, llama_router, tmp_path / "out", samples=prompts_file))
    assert "FAIL" not in result.table
    for graph in ("cluster_0", "cluster_1"):
        assert f"| cpu | {graph} | greedy tokens (onnxruntime-genai) | {len(PROMPTS)} |" in result.table
    clusters = {c["id"]: c for c in result.manifest["clusters"]}
    assert clusters[0]["kv_cache"] == [] and clusters[1]["kv_cache"] == []
    assert clusters[1]["kept"]["attention_blocks_kept"] == clusters[1]["kept"]["ffn_blocks_kept"] == 0
    session = ort.InferenceSession(str(tmp_path / "out" / "cpu" / "decoder" / "cluster_1.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]


def test_run_routes_the_prompt_and_generates_greedily(decoder_bundle, cli):
    out, _ = decoder_bundle
    code, stdout, stderr = cli("run", out, "--prompt", PROMPTS[1], "--max-new-tokens", "32")
    assert code == 0, stderr
    result = json.loads(stdout)
    from safetensors.numpy import load_file

    reference = load_file(str(out / "reference" / "outputs.safetensors"))
    assert result["cluster_id"] == int(reference["router/cluster_id/0001"][0])
    assert result["token_ids"] == reference[f"cluster_{result['cluster_id']}/greedy_tokens/0001"].tolist()
    assert result["prefill_ms"] > 0 and set(result) >= {"text", "decode_ms_per_token", "distances"}


def test_run_graph_decodes_the_named_graph_and_still_reports_the_routers_choice(decoder_bundle, cli):
    from safetensors.numpy import load_file

    out, _ = decoder_bundle
    reference = load_file(str(out / "reference" / "outputs.safetensors"))
    routed = int(reference["router/cluster_id/0001"][0])
    for graph in ("dense", *(f"cluster_{k}" for k in range(3) if k != routed)):
        code, stdout, stderr = cli("run", out, "--prompt", PROMPTS[1], "--max-new-tokens", "32", "--graph", graph)
        assert code == 0, stderr
        result = json.loads(stdout)
        assert result["graph"] == graph and result["cluster_id"] == routed
        assert result["token_ids"] == reference[f"{graph}/greedy_tokens/0001"].tolist()
    assert_one_line_error(cli("run", out, "--prompt", PROMPTS[1], "--graph", "router"), "--graph", "dense or cluster_0", "'router'")


def test_run_decodes_up_to_the_position_limit_and_refuses_prompts_it_cannot_decode(decoder_bundle, cli, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    out, _ = decoder_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    positions = manifest["student"]["max_seq_length"]
    prompt = "word " * 60
    length = len(AutoTokenizer.from_pretrained(str(out / manifest["student"]["tokenizer"]))(prompt)["input_ids"])
    code, stdout, stderr = cli("run", out, "--prompt", prompt, "--max-new-tokens", positions - length)
    assert code == 0, stderr
    assert 0 < len(json.loads(stdout)["token_ids"]) <= positions - length
    line = assert_one_line_error(cli("run", out, "--prompt", prompt, "--max-new-tokens", positions - length + 1),
                                 "--prompt", f"{positions} positions")
    assert line.rstrip().endswith(f"found {length} + {positions - length + 1}")
    # a tokenizer that adds no BOS token (as many do) turns an empty prompt into no tokens at all
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    tokenizer_json = copy / manifest["student"]["tokenizer"] / "tokenizer.json"
    tokenizer_json.write_text(json.dumps(dict(json.loads(tokenizer_json.read_text()), post_processor=None)))
    assert_one_line_error(cli("run", copy, "--prompt", ""), "--prompt", "prompt tokens", "at least 1", "found 0")


def test_run_speculative_without_extra_heads_fails_in_one_line(decoder_bundle, cli):
    out, _ = decoder_bundle
    assert_one_line_error(cli("run", out, "--prompt", PROMPTS[0], "--speculative"), "--speculative", "no multi-token-prediction heads",
                          "n_future_tokens > 1")


def test_parity_gate_fails_a_decoder_whose_rope_is_wrong(llama, llama_router, prompts_file, tmp_path, cli, monkeypatch):
    import edgecompile.families.decoder as family

    original = family.inverse_frequencies
    monkeypatch.setattr(family, "inverse_frequencies", lambda rope, head_dim: original(rope, head_dim) * np.float32(1.02))
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}},
                        np.random.default_rng(0).standard_normal((1, 24)).astype(np.float32))
    code, _, stderr = cli("build", llama, "--masks", masks, "--router-encoder", llama_router, "--samples", prompts_file,
                          "--out", tmp_path / "out", "-q")
    assert code == 3 and "prefill_logits" in stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("runner", ["onnxruntime", "onnxruntime-genai"])
def test_parity_gate_fails_when_one_runtimes_greedy_tokens_differ(llama, llama_router, prompts_file, tmp_path, cli, monkeypatch,
                                                                  runner):
    """Prefill logits alone do not pass a build: the 32nd greedy token of one prompt differing in either runtime is exit 3."""
    from transformers import AutoTokenizer

    import edgecompile.check.decoder_parity as decoder_parity

    prompts = [AutoTokenizer.from_pretrained(str(llama))(text)["input_ids"] for text in PROMPTS]

    def last_token_changed(tokens: list[int]) -> list[int]:
        return tokens[:-1] + [(tokens[-1] + 1) % 256]

    if runner == "onnxruntime":
        original = decoder_parity.greedy

        def patched(session, prompt, *args, **kwargs):
            run = original(session, prompt, *args, **kwargs)
            run.tokens = last_token_changed(run.tokens) if prompt == prompts[-1] else run.tokens
            return run
        monkeypatch.setattr(decoder_parity, "greedy", patched)
    else:
        original = decoder_parity.genai_greedy
        monkeypatch.setattr(decoder_parity, "genai_greedy", lambda model, prompt, new: (
            last_token_changed(original(model, prompt, new)) if prompt == prompts[-1] else original(model, prompt, new)))
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}},
                        np.random.default_rng(0).standard_normal((1, 24)).astype(np.float32))
    code, _, stderr = cli("build", llama, "--masks", masks, "--router-encoder", llama_router, "--samples", prompts_file,
                          "--out", tmp_path / "out", "-q")
    assert code == 3 and f"greedy tokens ({runner})" in stderr and "sample 2 first at new token 31" in stderr, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="configs with rope_parameters are written by transformers 5")
def test_llama3_rope_saved_by_transformers_5_matches_transformers(models_dir):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    path = make_llama(models_dir / "llama3_rope", seed=8, rope=rope, max_positions=256)
    assert json.loads((path / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    dims, weights, model = loaded(path)
    session = session_of(Llama.export(weights, dims))
    ids = list(range(3, 203))  # positions past original_max_position_embeddings, where llama3 scaling differs
    assert relative_error(prefill(session, ids), reference_logits(model, ids)) < 1e-5


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="configs with rope_parameters are written by transformers 5")
def test_llama3_config_saved_by_transformers_5_builds_to_transformers_own_greedy_tokens(models_dir, llama_router, prompts_file,
                                                                                        tmp_path, cli):
    """Issue 8's round trip: a Llama-3-style checkpoint saved by transformers 5, `edgecompile build`, `edgecompile run`:
    the same tokens as transformers 5's own greedy `generate` on that checkpoint (no edgecompile code in the reference)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    path = make_llama(models_dir / "llama3_round_trip", seed=12, rope=rope, max_positions=256)
    assert json.loads((path / "config.json").read_text())["rope_parameters"] == rope
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}},
                        np.random.default_rng(0).standard_normal((1, 24)).astype(np.float32))
    out = tmp_path / "bundle"
    code, _, stderr = cli("build", path, "--masks", masks, "--router-encoder", llama_router, "--samples", prompts_file,
                          "--out", out, "-q")
    assert code == 0, stderr
    model = LlamaForCausalLM.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    for prompt in PROMPTS[:2]:
        code, stdout, stderr = cli("run", out, "--prompt", prompt, "--max-new-tokens", "40")
        assert code == 0, stderr
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
        assert json.loads(stdout)["token_ids"] == expected and len(expected) >= 8, (prompt, expected)


def test_llama3_rope_scaling_as_hub_configs_store_it_matches_transformers(models_dir):
    """Llama 3.x configs on the Hub were written by transformers 4: `rope_theta` plus `rope_scaling` (llama3);
    both lanes must read them as the model they are (transformers 5 converts them on load)."""
    path = make_llama(models_dir / "llama3_hub_rope", seed=13, max_positions=256)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=500000.0, rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                     "original_max_position_embeddings": 64, "rope_type": "llama3"})
    (path / "config.json").write_text(json.dumps(config))
    dims, weights, model = loaded(path)
    assert dims.rope["rope_type"] == "llama3" and dims.rope["rope_theta"] == 500000.0
    session = session_of(Llama.export(weights, dims))
    ids = list(range(3, 203))  # positions past original_max_position_embeddings, where llama3 scaling differs
    assert relative_error(prefill(session, ids), reference_logits(model, ids)) < 1e-5
    plain = replace(dims, layer_ropes=({"rope_type": "default", "rope_theta": 500000.0},))
    assert relative_error(prefill(session_of(Llama.export(weights, plain)), ids), reference_logits(model, ids)) > 1e-3


@pytest.mark.skipif(TRANSFORMERS_MAJOR >= 5, reason="transformers 5 reads rope_parameters")
def test_rope_parameters_under_transformers_4_are_refused(models_dir, llama_router, prompts_file, tmp_path, cli):
    path = make_llama(models_dir / "llama_rope4", seed=9)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (path / "config.json").write_text(json.dumps(config))
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}}, np.ones((1, 24), np.float32))
    assert_one_line_error(cli("build", path, "--masks", masks, "--router-encoder", llama_router, "--out", tmp_path / "o", "-q"),
                          "config.json", "rope_parameters", "rope_theta 10000", "transformers>=5")


def edited_llama(models_dir, name, config_edit=None, tensors_edit=None):
    """A copy of a tiny Llama with config.json and/or model.safetensors changed the way a bad checkpoint would be."""
    from safetensors.torch import load_file, save_file

    path = make_llama(models_dir / name, seed=11)
    if config_edit:
        config = json.loads((path / "config.json").read_text())
        config_edit(config)
        (path / "config.json").write_text(json.dumps(config))
    if tensors_edit:
        tensors = load_file(str(path / "model.safetensors"))
        tensors_edit(tensors)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


BAD_CHECKPOINTS = {
    "sliding_window": (lambda c: c.update(sliding_window=64), None, ("config.json", "sliding_window", "expected it absent")),
    "rope_type": (lambda c: c.update({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}} if TRANSFORMERS_MAJOR >= 5
                                     else {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
                  None, ("config.json", "rope type", "'yarn'")),
    "rope_scaling_beside_rope_parameters": (
        lambda c: c.update({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
                            "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}), None,
        ("config.json", "'rope_scaling'", "yarn") if TRANSFORMERS_MAJOR >= 5 else ("config.json", "rope_parameters", "transformers>=5")),
    "is_causal": (lambda c: c.update(is_causal=False), None, ("config.json", "is_causal", "expected it absent")),
    "layer_types": (lambda c: c.update(layer_types=["sliding_attention"] * LAYERS), None, ("config.json", "layer_types")),
    "attention_bias": (lambda c: c.update(attention_bias=True), None, ("config.json", "'attention_bias'", "expected False")),
    "hidden_act": (lambda c: c.update(hidden_act="gelu"), None, ("config.json", "'hidden_act'", "'silu'", "'gelu'")),
    "kv_heads": (lambda c: c.update(num_key_value_heads=3), None, ("config.json", "num_key_value_heads", "3")),
    "missing_tensor": (None, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"), ("model.safetensors", "model.layers.2.mlp.up_proj.weight", "missing")),
    "unexpected_tensor": (None, lambda t: t.update({"model.layers.4.mlp.up_proj.weight": torch.zeros(128, 64)}),
                          ("model.safetensors", "model.layers.4.mlp.up_proj.weight", "unexpected")),
    "wrong_shape": (None, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}),
                    ("model.safetensors", "model.layers.0.self_attn.k_proj.weight", "[32, 64]", "[64, 64]")),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_decoder_checkpoints_fail_in_one_line(models_dir, llama_router, tmp_path, cli, case):
    config_edit, tensors_edit, needles = BAD_CHECKPOINTS[case]
    path = edited_llama(models_dir, f"bad_{case}", config_edit, tensors_edit)
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}}, np.ones((1, 24), np.float32))
    assert_one_line_error(cli("build", path, "--masks", masks, "--router-encoder", llama_router, "--out", tmp_path / "o", "-q"), *needles)
    assert not (tmp_path / "o").exists()


def test_fields_no_transformers_config_defines_are_bookkeeping_and_listed(models_dir, llama_router, prompts_file, tmp_path, cli):
    """transformers' GGUF loader writes `_model_name_or_path` and `unk_token_id`; LlamaConfig defines neither and the
    model reads neither, so the checkpoint builds as saved and the manifest says what was ignored."""
    path = edited_llama(models_dir, "gguf_written", lambda c: c.update(_model_name_or_path="/tmp/x", unk_token_id=0), None)
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}}, np.ones((1, 24), np.float32))
    code, _, stderr = cli("build", path, "--masks", masks, "--router-encoder", llama_router, "--samples", prompts_file,
                          "--out", tmp_path / "o")
    assert code == 0, stderr
    assert "neither defines nor reads, ignored as bookkeeping" in stderr and "_model_name_or_path, unk_token_id" in stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["student"]["config_fields_ignored"] == ["_model_name_or_path", "unk_token_id"]


def test_sharded_checkpoint_is_refused_saying_how_to_save_it_whole(llama, llama_router, tmp_path, cli):
    """transformers shards checkpoints above max_shard_size (5 GB on 4.57: a 1.3 B-parameter fp32 Llama)."""
    import shutil

    from transformers import LlamaForCausalLM

    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(str(llama)).save_pretrained(str(sharded), max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llama / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}}, np.ones((1, 24), np.float32))
    assert_one_line_error(cli("build", sharded, "--masks", masks, "--router-encoder", llama_router, "--out", tmp_path / "o", "-q"),
                          "model.safetensors", "sharded checkpoint", "max_shard_size")
    assert not (tmp_path / "o").exists()


BAD_MASKS = {
    "layers": ({"blocks": np.ones((LAYERS - 1, 2))}, ("cluster.0.blocks", f"[{LAYERS}, 2]", f"[{LAYERS - 1}, 2]")),
    "heads": ({"heads": np.ones((LAYERS, KV_HEADS))}, ("cluster.0.heads", f"[{LAYERS}, {HEADS}]", f"[{LAYERS}, {KV_HEADS}]")),
    "neurons": ({"neurons": np.ones((LAYERS, 64))}, ("cluster.0.neurons", f"[{LAYERS}, {INTERMEDIATE}]")),
}


@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_masks_that_do_not_fit_the_decoder_fail_in_one_line(llama, llama_router, tmp_path, cli, case):
    gates, needles = BAD_MASKS[case]
    masks = write_masks(tmp_path / "m.safetensors", {0: gates}, np.ones((1, 24), np.float32))
    assert_one_line_error(cli("build", llama, "--masks", masks, "--router-encoder", llama_router, "--out", tmp_path / "o", "-q"), *needles)


def test_prompt_longer_than_the_positions_fails_naming_line_and_length(models_dir, llama_router, tmp_path, cli):
    path = make_llama(models_dir / "llama_short", seed=12, max_positions=48)
    samples = tmp_path / "prompts.txt"
    samples.write_text("Ok\n" + "word " * 40 + "\n", encoding="utf-8")
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}}, np.ones((1, 24), np.float32))
    line = assert_one_line_error(cli("build", path, "--masks", masks, "--router-encoder", llama_router, "--samples", samples,
                                     "--out", tmp_path / "o", "-q"), "prompts.txt", "line 2", "max_position_embeddings 48")
    from transformers import AutoTokenizer

    assert line.rstrip().endswith(f"found {len(AutoTokenizer.from_pretrained(str(path))(('word ' * 40).strip())['input_ids'])}")


def test_decoders_refuse_targets_other_than_the_cpu_ep(llama, llama_router, tmp_path, cli):
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}}, np.ones((1, 24), np.float32))
    assert_one_line_error(cli("build", llama, "--masks", masks, "--router-encoder", llama_router, "--target", "xnnpack",
                              "--out", tmp_path / "o", "-q"), "--target xnnpack", "CPU EP")


@pytest.mark.parametrize("bits, activations", [(1, "dynamic"), (1, "none"), (2, "dynamic")], ids=["W1A8", "W1A32", "W2A8"])
def test_binary_decoder_linears_compile_to_packed_kernels_with_greedy_parity(llama, llama_router, prompts_file, tmp_path, bits,
                                                                             activations):
    """XTC W1A8 (dynamic per-token activations, integer kernels), W1A32 (float activations) and ternary W2A8 on Llama's Linears."""
    import shutil

    from edgecompile.build import BuildRequest, build

    student = tmp_path / "llama_w1"
    shutil.copytree(llama, student)
    (student / "edgecompile.json").write_text(json.dumps({"format": "edgecompile-lowbit/1", "linear": [{
        "modules": ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"], "bits": bits, "groups": "row",
        "activations": activations}]}))
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}, 1: {"blocks": [[1, 0], [0, 1], [1, 1], [1, 0]],
                        "heads": [[1, 1, 0.5, 0], [1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]}},
                        (np.random.default_rng(5).standard_normal((2, 24)) * 0.3).astype(np.float32))
    result = build(BuildRequest(student, masks, llama_router, tmp_path / "out", samples=prompts_file))
    assert "FAIL" not in result.table and "greedy tokens (onnxruntime-genai" in result.table
    target = result.manifest["targets"]["cpu"]
    groups = [g for g in target["lowering"]["cluster_1"]["lowbit"]["linear_groups"]] if activations == "dynamic" else []
    if activations == "dynamic":
        assert target["lowbit_graphs"] == ["cluster_0", "cluster_1", "dense"]
        assert {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"} in [set(g["modules"]) for g in groups]
        packing = {1: "bin1", 2: "tern2"}[bits]
        assert all(g["kernel"] == "MatMulIntegerToFloat" and g["packing"] == packing for g in groups), [(g["modules"][0], g["packing"]) for g in groups]
    else:
        assert target["lowbit_graphs"] == []
        float_groups = target["lowering"]["dense"]["lowbit"]["float_activation_linears"]
        assert len(float_groups) == 7 * LAYERS and all(g["activation"] == "none" for g in float_groups)
    # codes + one fp32 alpha per row of 64 or 128: at most 32x (binary) / 16x (ternary) smaller than fp32
    assert target["lowering"]["dense"]["lowbit"]["linear_weight_bytes"]["ratio"] > {1: 15, 2: 12}[bits]


def test_a_low_bit_divergence_passes_only_at_a_near_tie():
    from edgecompile.check.parity import is_near_tie as divergence_is_a_near_tie

    top_ids = np.array([7, 3, 9, 1])
    top_values = np.array([2.000, 1.998, 1.5, 1.0], np.float32)
    logits = np.zeros(12, np.float32)
    logits[top_ids] = top_values
    logits[3] += 0.003  # the graph's 8-bit activations moved two near-equal logits past each other
    assert divergence_is_a_near_tie(logits, top_values, top_ids, 3, 0.05)
    wide = logits.copy()
    wide[9] = 2.1  # a clear second choice overtaking the top token needs an error no tie explains
    assert not divergence_is_a_near_tie(wide, top_values, top_ids, 9, 0.05)
    assert not divergence_is_a_near_tie(logits, top_values, top_ids, 11, 0.05)  # not in the reference's top-k
    far = logits * 3  # errors beyond the low-bit tolerance are a fault whatever the ranking
    assert not divergence_is_a_near_tie(far, top_values, top_ids, 3, 0.05)


DECODE_ON = """
import json, sys, numpy as np, onnxruntime as ort
bundle = sys.argv[1]
manifest = json.load(open(f"{bundle}/manifest.json"))
tokens = {}
for name, graph in manifest["targets"]["cpu"]["graphs"].items():
    if name == "router":
        continue
    session = ort.InferenceSession(f"{bundle}/{graph['file']}", providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs() if i.name.startswith("past")}
    ids, out = [0, 42, 306, 278, 81], []
    names = [o.name for o in session.get_outputs()]
    feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64), **past}
    for step in range(8):
        result = dict(zip(names, session.run(names, feed)))
        out.append(int(result["logits"][0, -1].argmax()))
        feed = {"input_ids": np.array([[out[-1]]]), "attention_mask": np.ones((1, len(ids) + len(out)), np.int64)}
        feed.update({k.replace("present", "past_key_values"): v for k, v in result.items() if k.startswith("present")})
    tokens[name] = out
print(json.dumps({"version": ort.__version__, "tokens": tokens}))
"""


def test_decoder_files_decode_on_the_oldest_onnxruntime_the_cpu_target_declares(decoder_bundle):
    import subprocess
    import sys

    from test_runtime_floor import old_onnxruntime

    from edgecompile.lowering.targets import load_target

    out, _ = decoder_bundle
    floor = load_target("cpu").min_onnxruntime
    old = subprocess.run([sys.executable, "-c", DECODE_ON, str(out)], env=dict(os.environ, PYTHONPATH=str(old_onnxruntime(floor))),
                         capture_output=True, text=True, timeout=600)
    assert old.returncode == 0, old.stderr[-2000:]
    current = subprocess.run([sys.executable, "-c", DECODE_ON, str(out)], capture_output=True, text=True, check=True)
    assert json.loads(old.stdout)["version"].startswith(floor + ".")
    assert json.loads(old.stdout)["tokens"] == json.loads(current.stdout)["tokens"]
