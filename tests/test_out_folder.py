"""What `build` may replace or delete at --out: only what is provably its own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bundles import build_small_bundle, copy_bundle, small_masks
from test_bad_inputs import assert_one_line_error

STRICT = (Path(__file__).parents[1] / "targets" / "cpu.toml").read_text().replace(
    "max_relative_error = 1e-4", "max_relative_error = 1e-12")


@pytest.fixture(scope="module")
def built(tmp_path_factory, st_student, router_encoder) -> Path:
    return build_small_bundle(tmp_path_factory.mktemp("out_folder"), st_student, router_encoder)


@pytest.fixture
def build_into(cli, st_student, router_encoder, tmp_path):
    masks = small_masks(tmp_path / "masks.safetensors")

    def run(out: Path, *extra):
        return cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", out, "-q", *extra)

    return run


def test_force_does_not_replace_a_folder_that_only_has_a_manifest(build_into, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "precious.txt").write_text("years of work")
    assert_one_line_error(build_into(out, "--force"), str(out), "not an edgecompile bundle")
    assert (out / "precious.txt").read_text() == "years of work"


def test_force_does_not_replace_a_bundle_holding_a_file_of_yours(build_into, built, tmp_path):
    out = copy_bundle(built, tmp_path / "bundle")
    (out / "notes.txt").write_text("my notes")
    assert_one_line_error(build_into(out, "--force"), str(out), "not an edgecompile bundle", "notes.txt")
    assert (out / "notes.txt").read_text() == "my notes"
    (out / "notes.txt").unlink()
    with open(out / "cpu" / "weights.bin", "r+b") as handle:  # an edited graph is not provably ours either
        handle.write(b"\0")
    assert_one_line_error(build_into(out, "--force"), str(out), "cpu/weights.bin")


def test_force_does_not_replace_a_bundle_holding_a_file_named_like_the_staging_marker(build_into, built, cli, tmp_path):
    """A build removes its marker before committing, so a bundle never holds one: that file is somebody else's."""
    out = copy_bundle(built, tmp_path / "bundle")
    (out / ".edgecompile-staging.json").write_text("my notes")
    assert_one_line_error(build_into(out, "--force"), str(out), ".edgecompile-staging.json", "not listed")
    assert (out / ".edgecompile-staging.json").read_text() == "my notes"
    assert_one_line_error(cli("verify", out), ".edgecompile-staging.json", "not listed", code=5)


def test_force_replaces_a_genuine_bundle_and_leaves_nothing_beside_it(build_into, built, tmp_path):
    out = copy_bundle(built, tmp_path / "bundle")
    code, _, err = build_into(out, "--force")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "masks.safetensors"]


def test_keep_failed_never_deletes_a_failed_folder_it_did_not_make(build_into, tmp_path):
    strict = tmp_path / "strict.toml"
    strict.write_text(STRICT)
    out = tmp_path / "b"
    failed = tmp_path / "b.failed"
    failed.mkdir()
    (failed / "mine.txt").write_text("not edgecompile's")
    assert_one_line_error(build_into(out, "--target", strict, "--keep-failed"), str(failed), "not made by edgecompile")
    assert (failed / "mine.txt").read_text() == "not edgecompile's"
    failed_file = tmp_path / "c.failed"
    failed_file.write_text("a file")
    assert_one_line_error(build_into(tmp_path / "c", "--target", strict, "--keep-failed"), str(failed_file), "not made by edgecompile")
    assert failed_file.read_text() == "a file"


def test_keep_failed_replaces_its_own_earlier_failure(build_into, tmp_path):
    strict = tmp_path / "strict.toml"
    strict.write_text(STRICT)
    out = tmp_path / "b"
    for _ in range(2):
        code, _, err = build_into(out, "--target", strict, "--keep-failed")
        assert code == 3 and "artifacts kept in" in err, err
    assert (tmp_path / "b.failed" / "parity.md").is_file() and not out.exists()
    (tmp_path / "b.failed" / "my-notes.txt").write_text("added by a person")  # now it is no longer only ours
    assert_one_line_error(build_into(out, "--target", strict, "--keep-failed"), "b.failed", "not made by edgecompile")


def test_out_as_a_dangling_symlink_is_refused_before_building(build_into, tmp_path):
    out = tmp_path / "link"
    os.symlink(tmp_path / "nowhere", out)
    line = assert_one_line_error(build_into(out), str(out), "symbolic link")
    assert "nowhere" in line and out.is_symlink() and not (tmp_path / "nowhere").exists()


def test_out_as_a_symlink_to_a_bundle_is_refused_even_with_force(build_into, built, tmp_path):
    real = copy_bundle(built, tmp_path / "real")
    out = tmp_path / "link"
    os.symlink(real, out)
    assert_one_line_error(build_into(out, "--force"), str(out), "symbolic link")
    assert json.loads((real / "manifest.json").read_text())["schema"] == "edgecompile-bundle/1"
