"""`run` and `bench` as an app developer uses them: nothing cut silently, nothing overwritten in a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundles import build_small_bundle
from test_bad_inputs import assert_one_line_error


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, st_student, router_encoder) -> Path:
    return build_small_bundle(tmp_path_factory.mktemp("read_commands"), st_student, router_encoder)


def test_bench_json_refuses_to_write_inside_a_bundle(cli, bundle):
    before = (bundle / "manifest.json").read_bytes()
    for target in (bundle / "manifest.json", bundle / "cpu" / "bench.json"):
        result = cli("bench", bundle, "--runs", "3", "--warmup", "0", "--sequence", "8", "--json", target)
        assert_one_line_error(result, str(target), "inside the bundle")
    assert (bundle / "manifest.json").read_bytes() == before and not (bundle / "cpu" / "bench.json").exists()


def test_bench_never_writes_into_a_bundle_through_a_symbolic_link(cli, bundle, tmp_path):
    """The plot is saved through a link at its path: a link into a bundle (given, or beside --json) is refused."""
    before = (bundle / "parity.md").read_bytes()
    (tmp_path / "plot.png").symlink_to(bundle / "parity.md")
    (tmp_path / "report.png").symlink_to(bundle / "parity.md")
    for options in (("--plot", tmp_path / "plot.png"), ("--json", tmp_path / "report.json")):
        result = cli("bench", bundle, "--runs", "3", "--warmup", "0", "--sequence", "8", *options)
        assert_one_line_error(result, str(tmp_path), "inside the bundle")
    assert (bundle / "parity.md").read_bytes() == before and not (tmp_path / "report.json").exists()


def test_bench_json_writes_beside_the_bundle(cli, bundle, tmp_path):
    code, _, err = cli("bench", bundle, "--runs", "3", "--warmup", "0", "--sequence", "8", "--json", tmp_path / "bench.json")
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())  # {"metadata", "graphs", "routed"}
    assert {row["graph"] for row in report["graphs"]} >= {"router", "dense"} and report["metadata"]["target"] == "cpu"


def test_run_says_when_it_cuts_a_long_text(cli, bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    student_max, router_max = manifest["student"]["max_seq_length"], manifest["router"]["max_seq_length"]
    code, out, err = cli("run", bundle, "--text", " ".join(["station"] * 10_000))
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == student_max
    assert result["truncated"] == {"student": {"input_tokens": 10_002, "kept": student_max},
                                   "router": {"input_tokens": 10_002, "kept": router_max}}
    assert err.startswith("warning: --text is 10002 tokens") and f"first {student_max}" in err and err.count("\n") == 1


def test_run_of_a_short_text_cuts_nothing(cli, bundle):
    code, out, err = cli("run", bundle, "--text", "Where is the nearest train station?")
    assert code == 0 and err == "" and json.loads(out)["truncated"] == {}
