"""Reading a bundle never imports or runs anything named in it, and `verify` checks a bundle against
rules the tool owns (its own targets' tolerances, paths inside the bundle), never against the manifest's word."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from bundles import build_small_bundle, copy_bundle, edit_manifest, rehash
from test_bad_inputs import assert_one_line_error

SHIPPED = Path(__file__).parents[1] / "targets"


@pytest.fixture(autouse=True)
def only_shipped_targets(monkeypatch):
    monkeypatch.delenv("EDGECOMPILE_TARGETS_PATH", raising=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory, st_student, router_encoder) -> Path:
    return build_small_bundle(tmp_path_factory.mktemp("security"), st_student, router_encoder)


@pytest.fixture
def bundle(built, tmp_path) -> Path:
    return copy_bundle(built, tmp_path / "bundle")


READING_COMMANDS = (("verify",), ("run", "--text", "hello there"), ("bench", "--runs", "3", "--warmup", "0", "--sequence", "8"))


def test_a_plugin_named_in_the_manifest_is_never_imported(bundle, tmp_path, monkeypatch, cli):
    """A crafted manifest names an importable module and a function of it as an EP plugin library."""
    ran = tmp_path / "the_plugin_ran"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "ec_probe_plugin.py").write_text(
        f"from pathlib import Path\n\ndef library():\n    Path({str(ran)!r}).write_text('ran')\n    return '/nonexistent.so'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))

    def craft(manifest):
        manifest["targets"]["cpu"]["target"].update(
            provider="ProbeExecutionProvider", runs_here=True, plugin_module="ec_probe_plugin", plugin_library="library",
            plugin_option_paths={"backend_path": "library"})

    edit_manifest(bundle, craft)
    for command in READING_COMMANDS:
        result = cli(command[0], bundle, *command[1:])
        assert not ran.exists(), (command, result)
        assert_one_line_error(result, "targets.cpu.target.provider", "CPUExecutionProvider", "ProbeExecutionProvider", code=5)


def test_a_tokenizer_folder_with_custom_code_is_never_run_even_if_the_user_says_yes(bundle, tmp_path):
    """transformers asks "Do you wish to run the custom code? [y/N]" for a folder whose configs have an auto_map;
    a bundle's tokenizer is data: nothing is asked and nothing runs (the tokenizer loads from its data files, or
    the bundle is refused in one line)."""
    ran = tmp_path / "the_tokenizer_code_ran"
    tokenizer = bundle / "tokenizer"
    (tokenizer / "probe_code.py").write_text(
        f"from pathlib import Path\nPath({str(ran)!r}).write_text('ran')\n\n"
        "from transformers import PretrainedConfig\n\nclass ProbeConfig(PretrainedConfig):\n    model_type = 'probe'\n\n"
        "class ProbeTokenizer:\n    pass\n")
    (tokenizer / "config.json").write_text(json.dumps(
        {"model_type": "probe", "auto_map": {"AutoConfig": "probe_code.ProbeConfig"}}))
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    settings.pop("tokenizer_class", None)  # so transformers looks the tokenizer up through the auto_maps
    settings["auto_map"] = {"AutoTokenizer": ["probe_code.ProbeTokenizer", "probe_code.ProbeTokenizer"]}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    rehash(bundle, "tokenizer/probe_code.py", "tokenizer/config.json", "tokenizer/tokenizer_config.json")
    for command in READING_COMMANDS[:2]:  # verify, run (one tokenizer loader serves every command)
        result = subprocess.run([sys.executable, "-m", "edgecompile", command[0], str(bundle), *command[1:]], input="y\ny\n",
                                capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert not ran.exists(), (command, result.stderr)
        assert "[y/N]" not in result.stdout + result.stderr, result.stderr
        assert result.returncode in (0, 5), result.stderr
        if result.returncode:
            assert_one_line_error((result.returncode, result.stdout, result.stderr), "tokenizer", code=5)


def test_plugin_keys_of_a_target_file_are_rejected(cli, tmp_path, st_student, router_encoder):
    """EP plugins come from edgecompile's fixed list, keyed by provider name; a target file cannot name code."""
    evil = tmp_path / "evil.toml"
    evil.write_text((SHIPPED / "cpu.toml").read_text().replace(
        '[provider]\nname = "CPUExecutionProvider"',
        '[provider]\nname = "QNNExecutionProvider"\nplugin_module = "os"\nplugin_library = "abort"'))
    result = cli("build", st_student, "--masks", tmp_path / "unused.safetensors", "--router-encoder", router_encoder,
                 "--out", tmp_path / "b", "--target", evil, "-q")
    assert_one_line_error(result, "evil.toml", "provider.plugin_module", "QNNExecutionProvider")


def test_a_user_target_named_like_a_shipped_one_is_refused(cli, tmp_path, monkeypatch, st_student, router_encoder):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "cpu.toml").write_text((SHIPPED / "cpu.toml").read_text().replace("max_relative_error = 1e-4", "max_relative_error = 0.5"))
    monkeypatch.setenv("EDGECOMPILE_TARGETS_PATH", str(mine))
    result = cli("build", st_student, "--masks", tmp_path / "unused.safetensors", "--router-encoder", router_encoder,
                 "--out", tmp_path / "b", "--target", "cpu", "-q")
    assert_one_line_error(result, str(mine / "cpu.toml"), "shipped target 'cpu'")
    assert not (tmp_path / "b").exists()


def test_a_target_file_named_like_a_shipped_target_may_not_loosen_it(cli, tmp_path, st_student, router_encoder):
    """verify judges a bundle by the target named in it: a looser copy of cpu.toml would build a bundle that never verifies."""
    copy = tmp_path / "mine.toml"
    copy.write_text((SHIPPED / "cpu.toml").read_text().replace("max_relative_error = 1e-4", "max_relative_error = 0.5"))
    result = cli("build", st_student, "--masks", tmp_path / "unused.safetensors", "--router-encoder", router_encoder,
                 "--out", tmp_path / "b", "--target", copy, "-q")
    assert_one_line_error(result, str(copy), "parity.max_relative_error", "at most 0.0001", "found 0.5", "rename this target")
    assert not (tmp_path / "b").exists()


def _perturb_reference(bundle: Path, factor: float) -> None:
    """Reference outputs a little off: the bundle's graphs no longer match them."""
    path = bundle / "reference" / "outputs.safetensors"
    tensors = {k: (v * factor if v.dtype.kind == "f" else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    rehash(bundle, "reference/outputs.safetensors")


def test_verify_does_not_take_loosened_tolerances_from_the_manifest(bundle, cli):
    _perturb_reference(bundle, 1.01)
    code, out, err = cli("verify", bundle)
    assert code == 3 and "FAIL" in err  # the tool's cpu tolerances catch it

    def loosen(manifest):
        manifest["targets"]["cpu"]["target"]["parity"].update(
            max_relative_error=1e30, min_cosine=0.0, lowbit_max_relative_error=1e30, lowbit_min_cosine=0.0)

    edit_manifest(bundle, loosen)
    assert_one_line_error(cli("verify", bundle), "targets.cpu.target.parity.max_relative_error", "at most 0.0001", "1e+30", code=5)


TOLERANCES = ("max_relative_error", "min_cosine", "min_argmax_agreement", "min_router_agreement",
              "lowbit_max_relative_error", "lowbit_min_cosine")


@pytest.mark.parametrize("key", TOLERANCES)
def test_verify_refuses_each_tolerance_loosened_alone(bundle, cli, key):
    """Every recorded tolerance, the lowbit_* ones included, may only be at least as strict as the tool's."""
    tool = json.loads((bundle / "manifest.json").read_text())["targets"]["cpu"]["target"]["parity"][key]
    loose = 0.0 if "min_" in key else 1e30
    edit_manifest(bundle, lambda m: m["targets"]["cpu"]["target"]["parity"].update({key: loose}))
    assert_one_line_error(cli("verify", bundle), f"targets.cpu.target.parity.{key}",
                          f"at {'least' if 'min_' in key else 'most'} {tool:g}", f"found {loose:g}", code=5)


@pytest.mark.parametrize("key", TOLERANCES)
def test_verify_accepts_each_tolerance_made_stricter(bundle, cli, key):
    tool = json.loads((bundle / "manifest.json").read_text())["targets"]["cpu"]["target"]["parity"][key]
    strict = tool + (1 - tool) / 2 if "min_" in key else tool / 2
    edit_manifest(bundle, lambda m: m["targets"]["cpu"]["target"]["parity"].update({key: strict}))
    code, out, err = cli("verify", bundle)
    assert code == 0 and "parity passed" in err, err


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("max_relative_error", -1.0, ">= 0"), ("lowbit_max_relative_error", float("nan"), ">= 0"),
    ("min_cosine", 2.0, "in [0, 1]"), ("lowbit_min_cosine", 1.5, "in [0, 1]"), ("min_cosine", "0.5", "in [0, 1]"),
])
def test_verify_refuses_tolerances_no_target_could_have(bundle, cli, key, value, expected):
    """A negative error bound or a cosine above 1 cannot come from a target: exit 5, not a parity failure (3)."""
    edit_manifest(bundle, lambda m: m["targets"]["cpu"]["target"]["parity"].update({key: value}))
    assert_one_line_error(cli("verify", bundle), f"targets.cpu.target.parity.{key}", expected, code=5)


def test_verify_accepts_only_paths_inside_the_bundle(bundle, tmp_path, cli):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((bundle / "cpu" / "cluster_0.onnx").read_bytes())
    cases = {
        "absolute": lambda m: m["files"].update({"/etc/hostname": {"sha256": "0" * 64}}),
        "dotdot": lambda m: m["targets"]["cpu"]["graphs"]["cluster_0"].update(file="../outside.onnx"),
        "tokenizer": lambda m: m["student"].update(tokenizer="/etc"),
    }
    for label, change in cases.items():
        copy = copy_bundle(bundle, tmp_path / label)
        edit_manifest(copy, change)
        if label == "absolute":
            rehash(copy, "/etc/hostname")
        if label == "dotdot":
            edit_manifest(copy, lambda m: m["files"].update({"../outside.onnx": m["files"]["cpu/cluster_0.onnx"]}))
        for command in READING_COMMANDS:
            assert_one_line_error(cli(command[0], copy, *command[1:]), "outside the bundle", code=5)


def test_verify_refuses_a_file_that_is_a_symlink_out_of_the_bundle(bundle, cli):
    (bundle / "parity.md").unlink()
    (bundle / "parity.md").symlink_to("/etc/hostname")
    rehash(bundle, "parity.md")
    assert_one_line_error(cli("verify", bundle), "parity.md", "symbolic link", code=5)


def test_verify_with_replaced_samples_is_one_line(bundle, cli):
    (bundle / "reference" / "samples.txt").write_text("only one sample now\n")
    rehash(bundle, "reference/samples.txt")
    assert_one_line_error(cli("verify", bundle), "reference/samples.txt", "1 sample", "24", code=5)
    (bundle / "reference" / "samples.txt").write_bytes(b"caf\xe9\n")
    rehash(bundle, "reference/samples.txt")
    assert_one_line_error(cli("verify", bundle), "reference/samples.txt", "UTF-8", code=5)


def test_verify_with_a_reference_that_does_not_match_the_graphs_is_one_line(bundle, cli):
    path = bundle / "reference" / "outputs.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("cluster_1/")}
    save_file(tensors, str(path))
    rehash(bundle, "reference/outputs.safetensors")
    assert_one_line_error(cli("verify", bundle), "reference/outputs.safetensors", "cluster_1", code=5)


def test_manifest_without_parity_is_one_line_for_every_command(bundle, cli):
    edit_manifest(bundle, lambda m: m.pop("parity"))
    for command in (("inspect",),) + READING_COMMANDS:
        assert_one_line_error(cli(command[0], bundle, *command[1:]), "parity", code=5)


def test_an_untampered_bundle_still_verifies(bundle, cli):
    code, out, err = cli("verify", bundle)
    assert code == 0 and "parity passed" in err, err
    assert json.loads((bundle / "manifest.json").read_text())["schema"] == "edgecompile-bundle/1"


def _keys(obj, path=()):
    """Every key path of the manifest, lists followed into their first element."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj[:1]) if isinstance(obj, list) else ()
    for key, value in items:
        yield path + (key,)
        yield from _keys(value, path + (key,))


def test_inspect_of_a_manifest_missing_any_key_is_one_line_or_a_summary(built, tmp_path, cli):
    """Whatever key a damaged manifest lacks, `inspect` prints a summary or one line (exit 5), never a traceback."""
    manifest = json.loads((built / "manifest.json").read_text())
    bundle = copy_bundle(built, tmp_path / "bundle")
    paths = [p for p in _keys(manifest) if isinstance(p[-1], str) and "files" not in p[:1]]
    assert len(paths) > 100
    for path in paths:
        damaged = json.loads(json.dumps(manifest))
        parent = damaged
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        (bundle / "manifest.json").write_text(json.dumps(damaged))
        code, _, err = cli("inspect", bundle)
        assert code in (0, 5) and "Traceback" not in err, (path, code, err)
        if code == 5:
            assert_one_line_error((code, "", err), "manifest.json", code=5)


@pytest.mark.parametrize(("change", "needles", "commands"), [
    (lambda m: m.pop("tool"), ("manifest.json", "'tool'", "missing"), ("inspect",)),
    (lambda m: m["student"].update(layers=None), ("manifest.json", "inspect",), ("inspect",)),
    (lambda m: m["router"].update(tokenization="x"), ("router.tokenization", "expected a dict", "'x'"), ("run", "verify")),
    (lambda m: m["router"]["tokenization"].update(truncate_characters="9"), ("router.tokenization.truncate_characters", "'9'"),
     ("run", "verify")),
    (lambda m: m["student"].update(max_seq_length=-1), ("student.max_seq_length", "a positive integer", "-1"), ("run", "verify")),
    (lambda m: m["targets"]["cpu"]["graphs"].pop("router"), ("targets.cpu.graphs", "'router'"), ("run",)),
    (lambda m: m["targets"]["cpu"].update(lowbit_graphs=-1), ("targets.cpu.lowbit_graphs", "-1"), ("verify", "inspect")),
    (lambda m: m["router"].update(macs_per_token="x"), ("router.macs_per_token.total", "None"), ("bench",)),
    (lambda m: m["clusters"][0].update(graph="x"), ("clusters", "cluster_<id>", "'x'"), ("bench",)),
], ids=["no tool", "layers null", "tokenization a string", "truncate a string", "negative length", "no router graph",
        "lowbit_graphs a number", "router MACs a string", "cluster graph renamed"])
def test_manifest_values_of_the_wrong_form_are_one_line(bundle, cli, change, needles, commands):
    edit_manifest(bundle, change)
    for command in commands:
        args = next((c[1:] for c in READING_COMMANDS if c[0] == command), ())
        assert_one_line_error(cli(command, bundle, *args), *needles, code=5)


def test_graphs_that_do_not_take_what_the_manifest_describes_are_one_line(bundle, tmp_path, cli):
    """onnxruntime refusing a bundle's inputs while reading it is the bundle's inconsistency (exit 5), not a crash."""
    decoder = copy_bundle(bundle, tmp_path / "called_a_decoder")
    edit_manifest(decoder, lambda m: m["student"].update(task="causal-lm"))  # an encoder's graphs, read as a decoder's
    for command in (("run", "--prompt", "hello"), ("bench", "--runs", "3", "--warmup", "0", "--prompt-tokens", "4", "--new-tokens", "4")):
        # a decoder's graphs live in its onnxruntime-genai folder: the layout tells before any graph is fed
        assert_one_line_error(cli(command[0], decoder, *command[1:]), "targets.cpu.graphs", "expected 'cpu/decoder/", code=5)

    for graph in ("cluster_0", "cluster_1"):  # every cluster's file holds the router's graph, whose inputs are fewer,
        shutil.copyfile(bundle / "cpu" / "router.onnx", bundle / "cpu" / f"{graph}.onnx")  # fed what the dense graph takes
        rehash(bundle, f"cpu/{graph}.onnx")
    assert_one_line_error(cli("bench", bundle, "--runs", "3", "--warmup", "0", "--sequence", "8"), str(bundle),
                          "do not take the inputs", "token_type_ids", code=5)


@pytest.mark.parametrize(("change", "needles"), [
    (lambda m: (m["router"].pop("encoder"), m["router"].pop("name")), ("router.name", "None")),
    (lambda m: m["router"].update(clusters="x"), ("router.clusters", "a positive integer", "'x'")),
    (lambda m: m["router"].update(clusters=1), ("router.clusters", "cluster ids its router graph picks", "found 1")),
    (lambda m: m["router"].update(macs_per_token="x"), ("router.macs_per_token, bytes", "'x'")),
    (lambda m: m["router"]["macs_per_token"].update(total="x"), ("router.macs_per_token.total", "'x'")),
], ids=["no name", "clusters a string", "fewer clusters than picked", "MACs a string", "total a string"])
def test_compare_routers_with_a_damaged_router_description_is_one_line(bundle, cli, change, needles):
    edit_manifest(bundle, change)
    assert_one_line_error(cli("compare-routers", bundle, "--runs", "3"), "manifest.json", *needles, code=5)
