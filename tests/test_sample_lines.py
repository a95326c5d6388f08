"""Samples files: lines are separated by \n (or \r\n) only, as editors and `wc -l` count them."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundles import small_masks
from test_bad_inputs import assert_one_line_error

SHORT_TARGET = (Path(__file__).parents[1] / "targets" / "xnnpack.toml").read_text().replace(
    'name = "xnnpack"', 'name = "short"').replace("sequence = 128", "sequence = 16")


@pytest.fixture
def build_with(cli, st_student, router_encoder, tmp_path):
    masks = small_masks(tmp_path / "masks.safetensors")

    def run(samples: Path, *extra):
        return cli("build", st_student, "--masks", masks, "--router-encoder", router_encoder, "--out", tmp_path / "bundle",
                   "--samples", samples, "-q", *extra)

    return run


def test_form_feed_and_unicode_separators_do_not_shift_line_numbers(build_with, tmp_path):
    target = tmp_path / "short.toml"
    target.write_text(SHORT_TARGET)
    samples = tmp_path / "samples.txt"
    long_line = " ".join(["word"] * 40)
    samples.write_text(f"ok\fok\r\nok\u2028ok\u2029ok\x1cok\n{long_line}\n", encoding="utf-8")
    assert_one_line_error(build_with(samples, "--target", target), "samples.txt: line 3", "at most 16 tokens")


def test_samples_with_form_feeds_build_and_verify(build_with, cli, tmp_path):
    samples = tmp_path / "samples.txt"
    samples.write_text("How do I reset\fmy password?\nWhere is the\u2028nearest train station?\nOk\n", encoding="utf-8")
    code, _, err = build_with(samples)
    assert code == 0, err
    assert (tmp_path / "bundle" / "reference" / "samples.txt").read_text(encoding="utf-8").count("\n") == 3
    code, _, err = cli("verify", tmp_path / "bundle")
    assert code == 0 and "parity passed" in err, err


def test_samples_from_dev_null_are_empty_not_missing(build_with):
    assert_one_line_error(build_with(Path("/dev/null")), "/dev/null", "at least one non-empty line", "none")
