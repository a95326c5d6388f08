"""Each target declares the oldest onnxruntime its files must load on; steps and files are held to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LAYERS, centroids, gates
from factories import write_masks
from edgecompile.errors import InputError
from edgecompile.lowering.runtime_floor import KNOWN_RUNTIMES, runtime_needed
from edgecompile.lowering.targets import available_targets, load_target, load_target_file

CPU = (Path(__file__).parents[1] / "targets" / "cpu.toml").read_text()
CACHE = Path(os.environ.get("EDGECOMPILE_TEST_CACHE", Path.home() / ".cache" / "edgecompile-tests"))


@pytest.fixture(autouse=True)
def only_shipped_targets(monkeypatch):
    monkeypatch.delenv("EDGECOMPILE_TARGETS_PATH", raising=False)


def test_every_shipped_target_declares_a_known_floor():
    floors = {name: load_target(name).min_onnxruntime for name in available_targets()}
    assert floors["cpu"] == "1.20" and floors["cpu-attention"] == "1.23"
    assert all(floor in KNOWN_RUNTIMES or floor >= "1.24" for floor in floors.values()), floors


def test_a_step_newer_than_the_floor_is_rejected(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(CPU.replace('steps = ["lower_lowbit_integer"', 'steps = ["lower_lowbit_integer", "fuse_attention"'))
    with pytest.raises(InputError, match=r"key 'lowering.steps': expected steps that run on onnxruntime 1.20 .*"
                                         r"found 'fuse_attention', which needs onnxruntime >= 1.23"):
        load_target_file(path)
    path.write_text(path.read_text().replace('min_onnxruntime = "1.20"', 'min_onnxruntime = "1.23"'))
    assert "fuse_attention" in load_target_file(path).steps


@pytest.mark.parametrize("floor", ["1.19", "one", "1.2x"])
def test_a_bad_or_unknown_floor_is_rejected(tmp_path, floor):
    path = tmp_path / "t.toml"
    path.write_text(CPU.replace('min_onnxruntime = "1.20"', f'min_onnxruntime = "{floor}"'))
    with pytest.raises(InputError, match=r"key 'min_onnxruntime'"):
        load_target_file(path)


def test_runtime_needed_follows_the_measured_table():
    assert runtime_needed(17, 8) == "1.20" and runtime_needed(21, 10) == "1.20"
    assert runtime_needed(22, 10) == "1.21" and runtime_needed(23, 11) == "1.23" and runtime_needed(24, 11) is None


@pytest.fixture(scope="module")
def two_target_bundle(tmp_path_factory, st_student, router_encoder) -> Path:
    from edgecompile.build import BuildRequest, build

    clusters = {0: gates(blocks=[[1, 1], [1, 1]]), 1: gates(blocks=[[0, 1], [1, 0]])}
    masks = write_masks(tmp_path_factory.mktemp("masks") / "m.safetensors", clusters, centroids(2))
    out = tmp_path_factory.mktemp("floor") / "bundle"
    build(BuildRequest(st_student, masks, router_encoder, out, targets=["cpu", "cpu-attention"]))
    return out


def test_cpu_attention_fuses_and_records_its_floor(two_target_bundle, cli):
    manifest = json.loads((two_target_bundle / "manifest.json").read_text())
    fused = manifest["targets"]["cpu-attention"]
    assert fused["lowering"]["dense"]["fused_attention"] == LAYERS and fused["lowering"]["cluster_1"]["fused_attention"] == 1
    assert (fused["opset"], fused["files_need_onnxruntime"], fused["min_onnxruntime"]) == (23, "1.23", "1.23")
    code, out, _ = cli("inspect", two_target_bundle)
    assert code == 0 and "needs onnxruntime >= 1.23 (target declares >= 1.23)" in out
    assert "needs onnxruntime >= 1.20 (target declares >= 1.20)" in out


def old_onnxruntime(version: str) -> Path:
    """The newest patch of `version` from PyPI, unpacked once into a cache folder (no venv: PYTHONPATH)."""
    folder = CACHE / f"onnxruntime-{version}"
    if not (folder / "onnxruntime" / "__init__.py").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(folder),
                        f"onnxruntime~={version}.0"], check=True)
    return folder


LOAD_AND_RUN = """
import json, sys, numpy as np, onnxruntime as ort
bundle, target = sys.argv[1], sys.argv[2]
manifest = json.load(open(f"{bundle}/manifest.json"))
ids = np.array([[2, 10, 11, 12, 3]], np.int64)
feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
picked = {}
for name, graph in manifest["targets"][target]["graphs"].items():
    session = ort.InferenceSession(f"{bundle}/{graph['file']}", providers=["CPUExecutionProvider"])
    outputs = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
    picked[name] = [o.tolist() for o in outputs]
print(json.dumps({"version": ort.__version__, "outputs": picked}))
"""


def test_cpu_files_load_on_the_oldest_onnxruntime_they_declare(two_target_bundle):
    import numpy as np

    floor = load_target("cpu").min_onnxruntime
    env = dict(os.environ, PYTHONPATH=str(old_onnxruntime(floor)))
    done = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(two_target_bundle), "cpu"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    old = json.loads(done.stdout)
    assert old["version"].startswith(floor + ".")
    current = json.loads(subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(two_target_bundle), "cpu"],
                                        capture_output=True, text=True, check=True).stdout)
    assert set(old["outputs"]) == {"router", "dense", "cluster_0", "cluster_1"}
    for name, outputs in current["outputs"].items():
        for a, b in zip(outputs, old["outputs"][name]):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5, err_msg=name)
    # and the cpu-attention files really need the newer runtime: 1.20 refuses them
    refused = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(two_target_bundle), "cpu-attention"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "opset" in refused.stderr
