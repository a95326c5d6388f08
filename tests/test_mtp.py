"""Multi-token-prediction heads (families/mtp.py) and self-speculative decoding (runtime/speculative.py):
every head's logits against transformers, speculative tokens identical to greedy at low and high acceptance."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from factories import add_mtp_heads, make_bert, make_llama, write_masks
from test_bad_inputs import assert_one_line_error
from edgecompile.families.llama import Llama
from edgecompile.families.mtp import head_logits, load_extra_heads
from edgecompile.inputs.masks import ClusterMasks
from edgecompile.passes.pipeline import build_cluster_graph
from edgecompile.runtime.decode import empty_cache, greedy
from edgecompile.runtime.speculative import speculative_greedy

LAYERS = 4
EOS = frozenset([1])


@pytest.fixture(scope="module")
def mtp_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp")
    return {
        "random_n2": add_mtp_heads(make_llama(root / "random_n2", seed=21), 2, seed=1),
        "random_n4": add_mtp_heads(make_llama(root / "random_n4", seed=22), 4, seed=2),
        "predict_well_n4": add_mtp_heads(make_llama(root / "well_n4", seed=23), 4, copies=True, predict_well=True),
        # one layer: head 0 is layer 0 and the trunk is empty, every head reads the embeddings
        "one_layer_n3": add_mtp_heads(make_llama(root / "one_layer_n3", seed=25, layers=1), 3, seed=3),
    }


def session_for(path, masks: ClusterMasks | None = None):
    dims = Llama.dims(json.loads((path / "config.json").read_text()))
    weights = Llama.load_weights(path / "model.safetensors", dims)
    graph = Llama.export(weights, dims)
    if masks is not None:
        graph = build_cluster_graph(graph, Llama.structure(dims), masks)
    session = ort.InferenceSession(ir.to_proto(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return dims, weights, graph, session


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[0] + [int(t) for t in rng.integers(3, 300, size=int(rng.integers(2, 14)))] for _ in range(count)]


HALF = ClusterMasks(0, np.array([[1, 0], [0, 1], [1, 1], [1, 0]], np.float32), np.ones((LAYERS, 4), np.float32),
                    np.ones((LAYERS, 128), np.float32))


@pytest.mark.parametrize("model, masks", [("random_n2", None), ("random_n2", HALF), ("random_n4", None), ("random_n4", HALF),
                                          ("one_layer_n3", None)], ids=["n2-dense", "n2-cluster", "n4-dense", "n4-cluster", "one_layer"])
def test_every_head_matches_transformers_on_the_trunk_output(mtp_models, model, masks):
    dims, weights, graph, session = session_for(mtp_models[model], masks)
    reference = Llama.load_reference(mtp_models[model])
    if masks is not None:
        Llama.gates(reference, dims).set(masks)
    expected = head_logits(reference, load_extra_heads(Llama, reference, weights, dims.extra_heads), prompts(1)[0])
    x = np.array([prompts(1)[0]], np.int64)
    names = ["logits"] + [f"logits_{j + 1}" for j in range(dims.extra_heads)]
    got = session.run(names, {"input_ids": x, "attention_mask": np.ones_like(x), **empty_cache(session)})
    for name, value, ref in zip(names, got, expected):
        if name != "logits":  # an extra head's logits: only where its drafts are read, the last position by default
            assert value.shape[1] == 1
            ref = ref[-1:]
        assert np.abs(value[0] - ref).max() / np.abs(ref).max() < 1e-5, name
    if masks is None:  # the trunk runs once: one attention per trunk layer, head 0 and extra head, one unembedding per head
        assert sum(n.op_type == "GroupQueryAttention" for n in graph.graph) == dims.layers + dims.extra_heads
        assert sum(n.op_type == "Gather" and n.inputs[0].name == "model.embed_tokens.weight" for n in graph.graph) == 1
    # every extra head has its own KV cache at index L + j, beside the trunk's and head 0's
    assert {v.name for v in graph.graph.inputs if v.name.endswith(".key")} >= {
        f"past_key_values.{dims.layers + j}.key" for j in range(dims.extra_heads)} | {f"past_key_values.{dims.layers - 1}.key"}


@pytest.mark.parametrize("fed, drafts, position", [([5, 5, 5, 9], 3, 2), ([5, 5, 5, 5], 3, 3), ([5, 7, 5, 5], 3, 0),
                                                    ([5, 7, 5, 5], 0, 3), ([7, 5, 5, 5], 2, 3), ([7, 5, 6, 5], 2, 1)])
def test_extra_heads_compute_their_logits_only_where_head_0_stops_confirming(mtp_models, fed, drafts, position):
    """`draft_count` drafts end the fed tokens; the extra heads' logits come from the last position head 0 confirms.
    predict_well's head 0 predicts the token it is fed, so a draft is confirmed when it repeats the token before it."""
    path = mtp_models["predict_well_n4"]
    dims, weights, _, session = session_for(path)
    reference = Llama.load_reference(path)
    expected = head_logits(reference, load_extra_heads(Llama, reference, weights, dims.extra_heads), [0, 12] + fed)
    x = np.array([[0, 12] + fed], np.int64)
    names = ["logits_1", "logits_2", "logits_3"]
    got = session.run(names, {"input_ids": x, "attention_mask": np.ones_like(x), "draft_count": np.array([drafts], np.int64),
                              **empty_cache(session)})
    for value, ref in zip(got, expected[1:]):
        assert np.abs(value[0, 0] - ref[2 + position]).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("model, acceptance", [("random_n2", (0.0, 0.6)), ("random_n4", (0.0, 0.6)), ("predict_well_n4", (0.99, 1.0))])
def test_speculative_decoding_gives_exactly_the_greedy_tokens(mtp_models, model, acceptance):
    _, _, _, session = session_for(mtp_models[model])
    rates, per_pass = [], []
    for prompt in prompts(12, seed=3):
        plain = greedy(session, prompt, 32, EOS)
        fast = speculative_greedy(session, prompt, 32, EOS)
        assert fast.tokens == plain.tokens
        assert fast.forward_passes <= len(plain.tokens)
        rates.append(fast.acceptance_rate)
        per_pass.append(fast.tokens_per_pass)
    low, high = acceptance
    assert low <= float(np.mean(rates)) <= high
    if low > 0.9:  # every draft right: n tokens per pass
        assert float(np.mean(per_pass)) > 3.5


def test_speculative_decoding_respects_the_token_budget_and_end_of_sequence(mtp_models):
    _, _, _, session = session_for(mtp_models["predict_well_n4"])
    for budget in (1, 2, 5, 7):
        for prompt in prompts(3, seed=budget):
            assert speculative_greedy(session, prompt, budget, EOS).tokens == greedy(session, prompt, budget, EOS).tokens
    prompt = [0, 5, 1]  # this model repeats the last token: an end-of-sequence token ends at once
    assert speculative_greedy(session, prompt, 10, EOS).tokens == greedy(session, prompt, 10, EOS).tokens == [1]


def test_speculative_speedup_is_not_decided_by_one_slow_pass(mtp_models, monkeypatch):
    """`run --speculative` times one run of each loop; a scheduling spike in one pass must not make the figure."""
    import edgecompile.serve.generate as generate

    def stalled_once(*args, **kwargs):
        run = greedy(*args, **kwargs)
        run.decode_ms[3] += 500.0  # the machine stalled once during plain greedy decoding
        return run

    _, _, _, session = session_for(mtp_models["random_n2"])
    prompt = prompts(1, seed=5)[0]
    plain = greedy(session, prompt, 32)
    monkeypatch.setattr(generate, "greedy", stalled_once)
    summary = generate.speculative_summary(session, prompt, 32, frozenset(), plain, "dense")["speculative"]
    assert summary["tokens_per_forward_pass"] < 1.5  # random heads: speculation cannot be much faster
    assert summary["speedup_vs_greedy"] < 2.0, summary
    assert summary["greedy_decode_passes"] == 31 and summary["decode_passes"] >= 31 / 2


@pytest.fixture(scope="module")
def mtp_bundle(tmp_path_factory, mtp_models):
    return _mtp_bundle(tmp_path_factory, mtp_models, "random_n4")


@pytest.fixture(scope="module")
def tied_mtp_bundle(tmp_path_factory, mtp_models):
    """Heads whose unembedding equals the embedding: the build stores the table once (FusedMatMul transB lm_head)."""
    return _mtp_bundle(tmp_path_factory, mtp_models, "predict_well_n4")


def _mtp_bundle(tmp_path_factory, mtp_models, model: str):
    from edgecompile.build import BuildRequest, build

    root = tmp_path_factory.mktemp("mtp_bundle")
    router = make_bert(root / "router", family="st", seed=6, hidden=24, heads=2, intermediate=48)
    masks = write_masks(root / "masks.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}, 1: {"blocks": HALF.blocks}},
                        (np.random.default_rng(4).standard_normal((2, 24)) * 0.3).astype(np.float32))
    samples = root / "prompts.txt"
    samples.write_text("How do I reset my password?\nOk\nParis is the capital of France.\n", encoding="utf-8")
    result = build(BuildRequest(mtp_models[model], masks, router, root / "bundle", samples=samples))
    return root / "bundle", result.table


def test_build_checks_every_head_and_the_speculative_path(mtp_bundle):
    out, table = mtp_bundle
    for graph in ("dense", "cluster_0", "cluster_1"):
        for row in ("prefill_logits", "prefill_logits_1", "prefill_logits_2", "prefill_logits_3",
                    "greedy tokens (speculative, onnxruntime)", "greedy tokens (onnxruntime-genai)"):
            assert f"| cpu | {graph} | {row} | 3 |" in table
    assert "FAIL" not in table
    manifest = json.loads((out / "manifest.json").read_text())
    mtp = manifest["multi_token_prediction"]
    assert mtp["n_future_tokens"] == 4 and [h["output"] for h in mtp["heads"]] == ["logits", "logits_1", "logits_2", "logits_3"]
    assert [h["kv_index"] for h in mtp["heads"]] == [3, 4, 5, 6]
    assert set(manifest["targets"]["cpu"]["speculative_on_parity_prompts"]) == {"dense", "cluster_0", "cluster_1"}


def test_run_speculative_prints_acceptance_and_speedup(mtp_bundle, cli):
    out, _ = mtp_bundle
    code, stdout, stderr = cli("run", out, "--prompt", "Ok", "--max-new-tokens", "24", "--speculative")
    assert code == 0, stderr
    result = json.loads(stdout)
    plain = json.loads(cli("run", out, "--prompt", "Ok", "--max-new-tokens", "24")[1])
    assert result["token_ids"] == plain["token_ids"] and result["speculative"]["identical_to_greedy"] is True
    assert {"acceptance_rate", "tokens_per_forward_pass", "speedup_vs_greedy", "speedup_vs_greedy_without_heads"} <= set(result["speculative"])


@pytest.mark.parametrize("new_tokens", ["1", "2", "3"])
def test_run_speculative_with_budgets_shorter_than_a_draft_gives_the_greedy_tokens(mtp_bundle, cli, new_tokens):
    """n = 4 drafts 3 tokens a pass: a budget of 1-3 tokens must cut the drafts, never overshoot or fail."""
    out, _ = mtp_bundle
    code, stdout, stderr = cli("run", out, "--prompt", "Ok", "--max-new-tokens", new_tokens, "--speculative")
    assert code == 0, stderr
    plain = json.loads(cli("run", out, "--prompt", "Ok", "--max-new-tokens", new_tokens)[1])
    assert json.loads(stdout)["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) == int(new_tokens)


@pytest.mark.parametrize("edit, needles", [
    (lambda t: t.pop("extra_heads.1.mlp.up_proj.weight"), ("extra_heads.1.mlp.up_proj.weight", "missing")),
    (lambda t: t.update({"extra_heads.3.input_layernorm.weight": t["extra_heads.0.input_layernorm.weight"].clone()}),
     ("extra_heads.3.input_layernorm.weight", "unexpected")),
])
def test_missing_or_extra_head_tensors_fail_in_one_line(tmp_path, cli, edit, needles):
    from safetensors.torch import load_file, save_file

    path = add_mtp_heads(make_llama(tmp_path / "mtp", seed=24), 3)
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    router = make_bert(tmp_path / "router", family="st", seed=6, hidden=24, heads=2, intermediate=48)
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}}, np.ones((1, 24), np.float32))
    assert_one_line_error(cli("build", path, "--masks", masks, "--router-encoder", router, "--out", tmp_path / "o", "-q"),
                          "model.safetensors", *needles)


@pytest.mark.parametrize("model", ["random_n2", "random_n4"])
def test_graph_without_heads_is_the_model_before_heads_were_added(tmp_path, mtp_models, model):
    """runtime/without_heads.py cuts an MTP graph back to `logits`: it must be exactly the export of the checkpoint the
    heads were added to (same seed: make_llama is deterministic), with no KV cache or input of the heads left."""
    from edgecompile.runtime.without_heads import without_extra_heads

    seed = {"random_n2": 21, "random_n4": 22}[model]
    _, _, graph, _ = session_for(mtp_models[model])
    ir.save(graph, tmp_path / "with_heads.onnx")
    trunk = ort.InferenceSession(without_extra_heads(tmp_path / "with_heads.onnx"), providers=["CPUExecutionProvider"])
    _, _, _, before = session_for(make_llama(tmp_path / "before", seed=seed))
    assert [o.name for o in trunk.get_outputs()] == [o.name for o in before.get_outputs()]
    assert sorted(i.name for i in trunk.get_inputs()) == sorted(i.name for i in before.get_inputs())  # no draft_count
    for prompt in prompts(4, seed=7):
        ours, reference = greedy(trunk, prompt, 12, keep_logits=True), greedy(before, prompt, 12, keep_logits=True)
        assert ours.tokens == reference.tokens
        assert max(np.abs(a - b).max() for a, b in zip(ours.step_logits, reference.step_logits)) < 1e-5


def test_head_acceptance_counts_each_head_only_when_its_draft_was_in_question(mtp_models):
    _, _, _, session = session_for(mtp_models["predict_well_n4"])
    fast = speculative_greedy(session, [0, 12, 12], 20, EOS)
    assert fast.head_acceptance == [1.0, 1.0, 1.0]  # every draft right
    _, _, _, session = session_for(mtp_models["random_n4"])
    for prompt in prompts(6, seed=9):
        fast = speculative_greedy(session, prompt, 24, EOS)
        assert fast.checked_by_head[0] == fast.forward_passes - 1  # head 1's draft is checked on every decode pass
        # head j + 1's draft is in question only when head j's was accepted (fewer: the token budget cut the drafts)
        assert all(c2 <= a1 for c2, a1 in zip(fast.checked_by_head[1:], fast.accepted_by_head))
        assert sum(fast.accepted_by_head) == fast.accepted


def test_bench_measures_speculative_decoding_on_the_sample_prompts_against_the_model_without_heads(mtp_bundle, cli, tmp_path):
    out, _ = mtp_bundle
    code, stdout, stderr = cli("bench", out, "--runs", "3", "--new-tokens", "12", "--prompt-tokens", "8", "--json", tmp_path / "b.json")
    assert code == 0, stderr
    assert "on the build's 3 sample prompts" in stdout and "head 3 acceptance" in stdout
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["prompt_source"] == "the build's 3 sample prompts" and report["chat"] is False
    rows = {r["graph"]: r for r in report["speculative"]}
    assert set(rows) == {"dense", "cluster_0", "cluster_1"}
    for row in rows.values():
        assert len(row["head_acceptance"]) == 3 and 0 <= row["acceptance_rate"] <= 1
        # the heads' own layers and unembeddings cost time in greedy decoding: the model without them is faster
        assert row["ms_per_token_without_heads"] > 0 and row["ms_per_token_greedy"] > 0
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Ok\n", encoding="utf-8")
    code, stdout, stderr = cli("bench", out, "--runs", "3", "--new-tokens", "6", "--prompt-tokens", "4", "--samples", prompts_file)
    assert code == 0, stderr
    assert f"speculative decoding on {prompts_file}" in stdout


@pytest.mark.parametrize("bundle", ["mtp_bundle", "tied_mtp_bundle"])
def test_onnxruntime_genai_mtp_generator_drafts_with_the_heads_and_gives_the_greedy_tokens(request, bundle, tmp_path):
    """onnxruntime-genai's own og.MtpGenerator on the folders runtime/genai_mtp.py derives: main graph + hidden_states,
    a head graph without layers; every K up to n-1 gives exactly og.Generator's greedy tokens on the unchanged folder,
    and its draft counts are those of our heads (head 1's draft at the last committed position)."""
    og = pytest.importorskip("onnxruntime_genai")
    if not hasattr(og, "MtpGenerator"):
        pytest.skip("onnxruntime-genai without MtpGenerator")
    from edgecompile.runtime.genai_mtp import write_genai_mtp_folders

    out, _ = request.getfixturevalue(bundle)
    decoder = out / "cpu" / "decoder"
    heads = {n.op_type for n in onnx.load(str(decoder / "dense.onnx"), load_external_data=False).graph.node if "logits" in n.output}
    assert heads == ({"FusedMatMul"} if bundle == "tied_mtp_bundle" else {"MatMul"})
    main_dir, head_dir = write_genai_mtp_folders(decoder, tmp_path / "genai_mtp")
    plain_model, main, head = og.Model(str(decoder)), og.Model(str(main_dir)), og.Model(str(head_dir))
    session = ort.InferenceSession(str(decoder / "dense.onnx"), providers=["CPUExecutionProvider"])
    for prompt in prompts(4, seed=7):
        params = og.GeneratorParams(plain_model)
        params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
        plain = og.Generator(plain_model, params)
        plain.append_tokens(prompt)
        while not plain.is_done():
            plain.generate_next_token()
        expected = [int(t) for t in plain.get_sequence(0)]
        for k in (1, 2, 3):
            params = og.GeneratorParams(main)
            params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
            params.set_speculative_options(max_draft_tokens=k)
            fast = og.MtpGenerator(main, head, params)
            fast.append_tokens(prompt)
            while not fast.is_done():
                fast.generate_next_token()
            assert [int(t) for t in fast.get_sequence()] == expected, k
            stats = fast.get_stats()
            assert stats["draft_tokens_evaluated"] > 0 and stats["draft_forward_passes"] >= stats["rounds"]
        if len(expected) < len(prompt) + 2:  # ended at once
            continue
        # the first round's draft is head 1's at the last prompt position
        ids = np.array([prompt], np.int64)
        head_1 = session.run(["logits_1"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **empty_cache(session)})[0]
        params = og.GeneratorParams(main)
        params.set_search_options(max_length=len(prompt) + 2, do_sample=False)
        params.set_speculative_options(max_draft_tokens=1)
        one = og.MtpGenerator(main, head, params)
        one.append_tokens(prompt)
        while not one.is_done():
            one.generate_next_token()
        accepted = one.get_stats()["draft_tokens_accepted"]
        assert accepted == int(int(np.argmax(head_1[0, -1])) == expected[len(prompt) + 1])


def test_decoder_kernel_benchmark_times_the_xtc_contract_it_names():
    """examples/bench_decoder_kernels.py's W1A8 graph computes what the reference's per-token 8-bit
    activations times ±alpha codes compute, and its 2-bit MatMulNBits packing holds the binary weight
    exactly (level 0, float activations), so the table compares the kernels it says it compares."""
    import importlib.util
    from pathlib import Path

    import torch

    from edgecompile.reference.lowbit import activation_scale, quantize_activation

    path = Path(__file__).parents[1] / "examples" / "bench_decoder_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_decoder_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    weight, sessions = bench.kernels(64, 48, np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    xt = torch.from_numpy(x)
    scale = activation_scale(xt, "dynamic")
    expected = (quantize_activation(xt, scale) * scale).numpy().astype(np.float64) @ weight.astype(np.float64)
    w1a8 = sessions["W1A8 MatMulIntegerToFloat, per-token (edgecompile)"].run(None, {"x": x})[0]
    np.testing.assert_allclose(w1a8, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    exact = sessions["MatMulNBits 2-bit, accuracy level 0 (float activations)"].run(None, {"x": x})[0]
    np.testing.assert_allclose(exact, x.astype(np.float64) @ weight, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
