"""Decoder bundles as an attacker edits them (every edited file re-hashed into manifest.json, since the hashes
prove integrity, not origin): no file a runtime reads may load code, `verify` checks exactly the files `run` and
`bench` execute, and every bad value is one line with a documented exit code."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest

from bundles import copy_bundle, edit_manifest, rehash
from factories import make_bert, make_llama, write_masks
from test_bad_inputs import assert_one_line_error

LAYERS, INTERMEDIATE = 4, 128
PROMPTS = ["How do I reset my password?", "Paris is the capital of France."]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from edgecompile.build import BuildRequest, build

    root = tmp_path_factory.mktemp("decoder_security")
    llama = make_llama(root / "llama", seed=11)
    router = make_bert(root / "router", family="st", seed=12, hidden=24, heads=2, intermediate=48)
    samples = root / "prompts.txt"
    samples.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    masks = write_masks(root / "masks.safetensors", {0: {"blocks": np.ones((LAYERS, 2))},
                                                     1: {"blocks": np.array([[1, 0], [0, 1], [1, 1], [0, 0]])}},
                        (np.random.default_rng(3).standard_normal((2, 24)) * 0.3).astype(np.float32))
    build(BuildRequest(llama, masks, router, root / "bundle", samples=samples))
    return root / "bundle"


@pytest.fixture
def bundle(built, tmp_path):
    return copy_bundle(built, tmp_path / "bundle")


def genai_config_path(bundle):
    return bundle / "cpu" / "decoder" / "genai_config.json"


def edit_genai_config(bundle, change) -> None:
    path = genai_config_path(bundle)
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config, indent=2))
    rehash(bundle, "cpu/decoder/genai_config.json")


def custom_ops_library(where, marker) -> None:
    """A shared library whose constructor writes `marker`: any dlopen of it leaves the file behind."""
    source = marker.parent / "custom_ops.c"
    source.write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void ran(void) {\n"
        f"    FILE *f = fopen(\"{marker}\", \"w\"); if (f) {{ fputs(\"loaded\", f); fclose(f); }}\n"
        "}\n"
        "void *RegisterCustomOps(void *options, const void *api) { return 0; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(where), str(source)], check=True)


def test_a_custom_ops_library_named_by_genai_config_never_loads(bundle, cli, tmp_path):
    """The attack of issue 16, exactly: the library and the edited genai_config.json, both re-hashed."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the probe library")
    marker = tmp_path / "the_library_ran"
    custom_ops_library(bundle / "cpu" / "decoder" / "libcustom_ops.so", marker)
    edit_manifest(bundle, lambda m: m["files"].update({"cpu/decoder/libcustom_ops.so": {"sha256": "", "bytes": 0}}))
    rehash(bundle, "cpu/decoder/libcustom_ops.so")
    edit_genai_config(bundle, lambda c: c["model"]["decoder"]["session_options"].update(custom_ops_library="libcustom_ops.so"))

    line = assert_one_line_error(cli("verify", bundle), "genai_config.json", "model.decoder.session_options.custom_ops_library",
                                 "expected no such field", "libcustom_ops.so", code=5)
    assert "onnxruntime-genai" in line
    code, stdout, stderr = cli("run", bundle, "--prompt", PROMPTS[0], "--max-new-tokens", "4")
    assert code == 0, stderr  # run never hands the folder to onnxruntime-genai
    code, _, stderr = cli("bench", bundle, "--runs", "3", "--warmup", "0", "--prompt-tokens", "4", "--new-tokens", "4")
    assert code == 0, stderr
    code, _, stderr = cli("inspect", bundle)
    assert code == 0, stderr
    assert not marker.exists()
    # the attack is real: onnxruntime-genai itself, given the folder, loads the library
    import onnxruntime_genai as og

    og.Model(str(bundle / "cpu" / "decoder"))
    assert marker.exists()


@pytest.mark.parametrize("change, field", [
    (lambda c: c["model"]["decoder"].update(filename="../../reference/evil.onnx"), "model.decoder.filename"),
    (lambda c: c["model"]["decoder"]["session_options"].update(provider_options=[{"qnn": {"backend_path": "/tmp/x.so"}}]),
     "model.decoder.session_options.provider_options"),
    (lambda c: c["search"].update(do_sample=True), "search.do_sample"),
    (lambda c: c["model"].update(eos_token_id=[1, 7]), "model.eos_token_id"),
    (lambda c: c.pop("search"), "search"),
])
def test_verify_accepts_only_the_genai_config_edgecompile_writes(bundle, cli, change, field):
    edit_genai_config(bundle, change)
    assert_one_line_error(cli("verify", bundle), "genai_config.json", field, code=5)


def test_verify_refuses_a_manifest_that_points_a_graph_at_another_hashed_file(bundle, cli):
    shutil.copyfile(bundle / "cpu" / "decoder" / "cluster_1.onnx", bundle / "cpu" / "decoder" / "evil.onnx")
    edit_manifest(bundle, lambda m: m["files"].update({"cpu/decoder/evil.onnx": {"sha256": "", "bytes": 0}}))
    rehash(bundle, "cpu/decoder/evil.onnx")
    for file in ("cpu/decoder/evil.onnx", "cpu/decoder/cluster_1.onnx"):
        edit_manifest(bundle, lambda m: m["targets"]["cpu"]["graphs"]["cluster_0"].update(file=file))
        for command in (("verify",), ("run", "--prompt", PROMPTS[0])):
            assert_one_line_error(cli(command[0], bundle, *command[1:]), "targets.cpu.graphs.cluster_0.file",
                                  "expected 'cpu/decoder/cluster_0.onnx'", f"found '{file}'", code=5)


@pytest.mark.parametrize("name", ["../../x", "cluster_0/../../x", "evil", "cluster_01", "cluster_-1"])
def test_graph_names_are_plain_names_of_the_bundle(bundle, cli, name):
    def rename(manifest):
        graphs = manifest["targets"]["cpu"]["graphs"]
        graphs[name] = graphs.pop("cluster_1")

    edit_manifest(bundle, rename)
    for command in (("verify",), ("inspect",), ("run", "--prompt", PROMPTS[0])):
        assert_one_line_error(cli(command[0], bundle, *command[1:]), "targets.cpu.graphs", "cluster_<k>", repr(name)[:20], code=5)


def test_a_target_name_that_is_a_path_is_refused(bundle, cli):
    def rename(manifest):
        manifest["targets"]["../cpu"] = manifest["targets"].pop("cpu")
        manifest["targets"]["../cpu"]["target"]["name"] = "../cpu"

    edit_manifest(bundle, rename)
    assert_one_line_error(cli("verify", bundle), "targets", "'../cpu'", code=5)


def test_genai_folder_and_overlay_must_be_the_layouts(bundle, cli):
    edit_manifest(bundle, lambda m: m["targets"]["cpu"]["graphs"]["cluster_1"].update(
        genai_overlay=json.dumps({"model": {"decoder": {"filename": "dense.onnx"}}})))
    assert_one_line_error(cli("verify", bundle), "targets.cpu.graphs.cluster_1.genai_overlay", "cluster_1.onnx", code=5)


def rewrite_graph(bundle, graph: str, change) -> None:
    path = bundle / "cpu" / "decoder" / f"{graph}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    change(model)
    onnx.save(model, str(path))
    rehash(bundle, f"cpu/decoder/{graph}.onnx")


def external_location(location):
    def change(model):
        tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return change


def custom_domain(model):
    model.graph.node[0].domain = "evil.ops"
    model.opset_import.append(onnx.helper.make_opsetid("evil.ops", 1))


def drop_kv_input(model):
    kept = [i for i in model.graph.input if i.name != "past_key_values.2.key"]
    del model.graph.input[:]
    model.graph.input.extend(kept)


def past_end_of_weights(model):
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(10 ** 12)


@pytest.mark.parametrize("change, needles", [
    (external_location("../../../etc/hostname"), ["external data", "'weights.bin' beside the graph", "../../../etc/hostname"]),
    (external_location("/etc/hostname"), ["external data", "/etc/hostname"]),
    (past_end_of_weights, ["external data", "bytes within weights.bin"]),
    (custom_domain, ["'evil.ops'", "custom-op library"]),
    (drop_kv_input, ["kv_cache", "expected the graph's own KV inputs"]),
])
def test_a_hash_consistent_graph_edgecompile_did_not_write_is_exit_5(bundle, cli, change, needles):
    """Each graph is checked before onnxruntime opens it; `run` routes these prompts to cluster_0 or cluster_1."""
    for graph in ("dense", "cluster_0", "cluster_1"):
        rewrite_graph(bundle, graph, change)
    assert_one_line_error(cli("verify", bundle), *needles, code=5)
    # run and bench open the graphs too; without a KV input the graph no longer loads, which is exit 5 as well
    shared = needles[:1] if change is not drop_kv_input else ["onnxruntime could not load"]
    assert_one_line_error(cli("run", bundle, "--prompt", PROMPTS[0], "--max-new-tokens", "2"), *shared, code=5)
    assert_one_line_error(cli("bench", bundle, "--runs", "3", "--prompt-tokens", "4", "--new-tokens", "4"), *shared, code=5)


def test_a_graph_onnxruntime_cannot_load_is_exit_5_never_a_bug(bundle, cli):
    def wrong_op(model):  # an ONNX-domain op onnxruntime has no kernel for: loads as protobuf, fails in onnxruntime
        model.graph.node[0].op_type = "NoSuchOperator"

    for graph in ("dense", "cluster_0", "cluster_1"):
        rewrite_graph(bundle, graph, wrong_op)
    for command in (("verify",), ("run", "--prompt", PROMPTS[0]), ("bench", "--runs", "3")):
        assert_one_line_error(cli(command[0], bundle, *command[1:]), "onnxruntime could not load", code=5)


def test_kv_cache_entries_that_disagree_with_the_graphs_are_exit_5(bundle, cli):
    def shrink(manifest):
        for cluster in manifest["clusters"]:
            cluster["kv_cache"] = cluster["kv_cache"][:1]

    edit_manifest(bundle, shrink)
    for command in (("verify",), ("run", "--prompt", PROMPTS[0]), ("inspect",)):
        code = cli(command[0], bundle, *command[1:])
        if command[0] == "inspect":
            assert code[0] == 0, code  # inspect shows what the manifest says; verify and run compare it with the graphs
            continue
        assert_one_line_error(code, "kv_cache", "expected the graph's own KV inputs", code=5)


@pytest.mark.parametrize("args, needles", [
    (["--max-new-tokens", "0"], ["--max-new-tokens", "0"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens", "-1"]),
    (["--threads", "-1"], ["--threads", "-1"]),
    (["--threads", "100000"], ["--threads", "100000"]),
    (["--bogus"], ["--bogus"]),
])
def test_usage_errors_are_one_error_line(built, cli, args, needles):
    assert_one_line_error(cli("run", built, "--prompt", "hi", *args), *needles, "see 'edgecompile run --help'")


@pytest.mark.parametrize("command", [("verify", "--threads", "100000"), ("bench", "--threads", "100000"),
                                     ("build", "x", "--masks", "m", "--router-encoder", "r", "--out", "o", "--threads", "100000")])
def test_thread_counts_are_bounded_by_the_machines_cores(built, cli, command):
    import os

    args = [command[0]] + ([] if command[0] == "build" else [built]) + list(command[1:])
    assert_one_line_error(cli(*args), "--threads", f"<={os.cpu_count()}")


def test_a_prompt_that_is_not_utf8_is_one_line(built, cli):
    assert_one_line_error(cli("run", built, "--prompt", "abc\udcff"), "--prompt", "expected UTF-8 text", "character 3")


def test_a_prompt_of_only_special_tokens_decodes(built, cli):
    code, stdout, stderr = cli("run", built, "--prompt", "</s>", "--max-new-tokens", "3")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["prompt_tokens"] == 2 and 1 <= len(result["token_ids"]) <= 3  # BOS + </s>


def test_decoder_options_on_encoder_bundles_and_back_are_usage_errors(built, cli, tmp_path, st_student, router_encoder):
    from bundles import build_small_bundle

    encoder = build_small_bundle(tmp_path / "encoder", st_student, router_encoder)
    assert_one_line_error(cli("run", encoder, "--text", "hi", "--max-new-tokens", "4"), "--max-new-tokens", "encoder bundle")
    assert_one_line_error(cli("run", encoder, "--text", "abc\udcff"), "--text", "expected UTF-8 text")
    assert_one_line_error(cli("bench", encoder, "--new-tokens", "4"), "--new-tokens", "encoder bundle")
    assert_one_line_error(cli("bench", built, "--sequence", "8"), "--sequence", "decoder bundle")
    assert_one_line_error(cli("bench", built, "--plot", str(tmp_path / "p.png")), "--plot", "decoder bundle")
    assert_one_line_error(cli("compare-routers", built), "compare-routers", "decoder bundle")
    assert_one_line_error(cli("run", built, "--text", "hi"), "decoder bundle", "--prompt")


def test_tied_embeddings_beside_a_different_lm_head_are_refused_naming_the_field(tmp_path, cli):
    from safetensors.torch import load_file, save_file

    llama = make_llama(tmp_path / "llama", seed=13, tied=True)
    tensors = load_file(str(llama / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].flip(0).contiguous()
    save_file(tensors, str(llama / "model.safetensors"), metadata={"format": "pt"})
    router = make_bert(tmp_path / "router", family="st", seed=12, hidden=24, heads=2, intermediate=48)
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((LAYERS, 2))}},
                        np.zeros((1, 24), np.float32))
    assert_one_line_error(cli("build", llama, "--masks", masks, "--router-encoder", router, "--out", tmp_path / "out", "-q"),
                          "config.json", "'tie_word_embeddings'", "lm_head.weight that differs", "found true")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# chat prompts: the bundle's chat template is Jinja, rendered only in transformers' sandbox

ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def chat_built(tmp_path_factory):
    """A decoder whose tokenizer has a ChatML-like template, built with its parity samples as chat turns."""
    from edgecompile.build import BuildRequest, build
    from factories import CHAT_TEMPLATE

    root = tmp_path_factory.mktemp("decoder_chat")
    llama = make_llama(root / "llama", seed=14, chat_template=CHAT_TEMPLATE)
    router = make_bert(root / "router", family="st", seed=12, hidden=24, heads=2, intermediate=48)
    samples = root / "prompts.txt"
    samples.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    masks = write_masks(root / "masks.safetensors", {0: {"blocks": np.ones((LAYERS, 2))},
                                                     1: {"blocks": np.array([[1, 0], [0, 1], [1, 1], [0, 0]])}},
                        (np.random.default_rng(3).standard_normal((2, 24)) * 0.3).astype(np.float32))
    build(BuildRequest(llama, masks, router, root / "bundle", samples=samples, chat_samples=True))
    return root / "bundle", llama, router, masks, samples


def test_run_chat_renders_the_template_and_decodes_the_reference_reply(chat_built, cli):
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    out = chat_built[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"]["chat"] is True and (out / "tokenizer" / "chat_template.jinja").is_file()
    code, stdout, stderr = cli("run", out, "--chat", PROMPTS[1], "--max-new-tokens", "32")
    assert code == 0, stderr
    result = json.loads(stdout)
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert result["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    reference = load_file(str(out / "reference" / "outputs.safetensors"))
    assert result["token_ids"] == reference[f"cluster_{result['cluster_id']}/greedy_tokens/0001"].tolist()
    assert result["decode_tokens_per_second"] > 0 and result["chat"] is True
    code, stdout, stderr = cli("run", out, "--chat", PROMPTS[1], "--system", "Be brief.", "--max-new-tokens", "4")
    assert code == 0 and json.loads(stdout)["prompt_tokens"] > result["prompt_tokens"], stderr
    code, _, stderr = cli("verify", out)
    assert code == 0, stderr


def test_a_chat_template_that_reaches_for_python_internals_is_stopped_by_the_sandbox(chat_built, cli, tmp_path):
    out, llama, router, masks, samples = chat_built
    bundle = copy_bundle(out, tmp_path / "bundle")
    (bundle / "tokenizer" / "chat_template.jinja").write_text(ESCAPE)
    rehash(bundle, "tokenizer/chat_template.jinja")
    assert_one_line_error(cli("run", bundle, "--chat", "hi"), "chat template failed to render", "SecurityError", code=5)
    assert_one_line_error(cli("verify", bundle), "chat template failed to render", "SecurityError", code=5)
    student = tmp_path / "student"
    shutil.copytree(llama, student)
    (student / "chat_template.jinja").write_text(ESCAPE)
    assert_one_line_error(cli("build", student, "--masks", masks, "--router-encoder", router, "--samples", samples,
                              "--chat-samples", "--out", tmp_path / "o", "-q"), "line 1", "chat template failed", "SecurityError")
    assert not (tmp_path / "o").exists()


def test_chat_options_need_a_template_and_a_decoder(built, chat_built, cli, tmp_path, st_student, router_encoder):
    assert_one_line_error(cli("run", built, "--chat", "hi"), "--chat", "chat template", "found none")
    assert_one_line_error(cli("run", chat_built[0], "--prompt", "hi", "--system", "x"), "--system", "goes with --chat")
    assert_one_line_error(cli("run", chat_built[0], "--prompt", "hi", "--chat", "hi"), "--prompt or --chat")
    masks = write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((2, 2))}}, np.zeros((1, 24), np.float32))
    assert_one_line_error(cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--chat-samples",
                              "--out", tmp_path / "o", "-q"), "--chat-samples", "a decoder language model")
