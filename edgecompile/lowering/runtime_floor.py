"""The oldest onnxruntime a target's files must load on, and what a graph actually needs.

A target declares `min_onnxruntime` (apps ship older runtimes than the build machine). A lowering
step that emits a newer opset may only be listed when the target's floor allows it, and after
lowering every graph is checked against the floor from its opset and IR version.

KNOWN_RUNTIMES was measured: a model stamped with each (opset, IR version) was loaded by the
onnxruntime wheel of each release (1.20.1, 1.21.1, 1.22.0, 1.23.0); the row is the newest pair it
accepted. Releases older than 1.20 are not covered, so a floor below it is rejected.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgecompile.errors import input_error

# release -> (newest ai.onnx opset, newest IR version) it loads
KNOWN_RUNTIMES: dict[str, tuple[int, int]] = {"1.20": (21, 10), "1.21": (22, 10), "1.22": (22, 10), "1.23": (23, 11)}
OLDEST_KNOWN = "1.20"
# lowering steps whose output needs a newer runtime than the export (opset 17, IR 8)
STEP_MIN_ONNXRUNTIME: dict[str, str] = {"fuse_attention": "1.23"}  # the ONNX Attention op is opset 23
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")


def parse_version(text: str) -> tuple[int, int, int]:
    match = _VERSION.match(text.strip())
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def check_floor(path: Path, floor: str, steps: tuple[str, ...] | list[str]) -> None:
    """Target-file validation: a well-formed floor we know, and no step that needs a newer runtime."""
    try:
        version = parse_version(floor)
    except ValueError:
        raise input_error(path, "key 'min_onnxruntime'", "a version like \"1.20\"", repr(floor)) from None
    if version < parse_version(OLDEST_KNOWN):
        raise input_error(path, "key 'min_onnxruntime'", f"at least {OLDEST_KNOWN} (the oldest onnxruntime edgecompile checks)", repr(floor))
    for step in steps:
        needs = STEP_MIN_ONNXRUNTIME.get(step)
        if needs and parse_version(needs) > version:
            raise input_error(path, "key 'lowering.steps'", f"steps that run on onnxruntime {floor} (min_onnxruntime)",
                              f"'{step}', which needs onnxruntime >= {needs}")


def runtime_needed(opset: int, ir_version: int) -> str | None:
    """The oldest known release that loads a graph with this ai.onnx opset and IR version (None: none known)."""
    for release, (max_opset, max_ir) in KNOWN_RUNTIMES.items():
        if opset <= max_opset and ir_version <= max_ir:
            return release
    return None


def within_floor(needed: str | None, floor: str) -> bool:
    return needed is not None and parse_version(needed) <= parse_version(floor)
