"""Targets are data: shipped files load, bad files are rejected naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecompile.errors import InputError
from edgecompile.lowering.targets import available_targets, load_target, load_target_file

CPU = (Path(__file__).parents[1] / "targets" / "cpu.toml").read_text()


@pytest.fixture(autouse=True)
def only_shipped_targets(monkeypatch):
    monkeypatch.delenv("EDGECOMPILE_TARGETS_PATH", raising=False)


def test_shipped_targets_load():
    assert {"cpu", "qnn-htp", "xnnpack", "nnapi", "coreml"} <= set(available_targets())
    for name in available_targets():
        target = load_target(name)
        assert target.name == name and target.parity.max_relative_error > 0


def test_cpu_target_tolerance_is_1e_4():
    assert load_target("cpu").parity.max_relative_error == 1e-4


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(CPU.replace("[parity]", "[parity]\nmax_rel_error = 1e-3"))
    with pytest.raises(InputError, match=r"key 'parity.max_rel_error': expected one of parity.max_relative_error"):
        load_target_file(path)
    path.write_text("flavour = 'x'\n" + CPU)
    with pytest.raises(InputError, match=r"key 'flavour'"):
        load_target_file(path)


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(CPU.replace("dynamic = true", 'dynamic = "yes"'))
    with pytest.raises(InputError, match=r"key 'shapes.dynamic': expected boolean, found str 'yes'"):
        load_target_file(path)
    path.write_text(CPU.replace("min_cosine = 0.9999", "min_cosine = true"))
    with pytest.raises(InputError, match=r"key 'parity.min_cosine': expected number, found boolean True"):
        load_target_file(path)


def test_missing_required_key(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(CPU.replace("max_relative_error = 1e-4", ""))
    with pytest.raises(InputError, match=r"key 'parity.max_relative_error': expected present, found missing"):
        load_target_file(path)


def test_user_targets_path(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text(CPU.replace('name = "cpu"', 'name = "mine"'))
    monkeypatch.setenv("EDGECOMPILE_TARGETS_PATH", str(tmp_path))
    assert load_target("mine").name == "mine"


def test_targets_command_lists_every_target(cli):
    code, out, _ = cli("targets")
    names = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert code == 0 and sorted(names) == sorted(["coreml", "cpu", "cpu-attention", "cpu-int4", "cpu-int4-lm8", "cpu-lowbit-lut", "nnapi", "qnn-htp",
                                                  "xnnpack"])
    assert "cpu-int4       CPUExecutionProvider         int4 " in out
    assert "not runnable here" in out and "QNNExecutionProvider" in out


def test_target_name_must_be_a_safe_folder_name(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(CPU.replace('name = "cpu"', 'name = "../../escaped"'))
    with pytest.raises(InputError, match=r"key 'name': expected lowercase letters"):
        load_target_file(path)


@pytest.mark.parametrize("bad", ["nan", "inf", "-1.0", "1.5"])
def test_tolerances_must_be_finite_and_in_range(tmp_path, bad):
    path = tmp_path / "t.toml"
    path.write_text(CPU.replace("min_cosine = 0.9999", f"min_cosine = {bad}"))
    with pytest.raises(InputError, match=r"key 'parity.min_cosine': expected a finite number in \[0, 1\]"):
        load_target_file(path)


def test_lowbit_min_cosine_is_a_fraction_like_min_cosine(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(CPU.replace("lowbit_min_cosine = 0.999", "lowbit_min_cosine = 1.5"))
    with pytest.raises(InputError, match=r"key 'parity.lowbit_min_cosine': expected a finite number in \[0, 1\]"):
        load_target_file(path)
