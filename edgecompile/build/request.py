"""What a build is asked (BuildRequest), what it checked before any heavy work (ValidatedInputs), what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecompile.inputs.masks import MaskSet
from edgecompile.inputs.router import RouterSpec
from edgecompile.inputs.samples import Samples
from edgecompile.inputs.student import StudentSpec
from edgecompile.lowering.targets import Target


@dataclass
class BuildRequest:
    student: Path
    masks: Path
    router_encoder: Path
    out: Path
    targets: list[str] = field(default_factory=lambda: ["cpu"])
    samples: Path | None = None
    force: bool = False
    threads: int = 0
    keep_failed: bool = False  # on a parity / placement miss, keep the staging folder as <out>.failed
    router_layers: int | None = None  # use only the router encoder's first n layers
    chat_samples: bool = False  # decoders: each sample is a user turn of the student's chat template
    weights: str | None = None  # "fp32" | "int8" | "int4": every target's [weights] format, instead of its own


@dataclass
class BuildResult:
    out: Path
    passed: bool
    table: str
    manifest: dict[str, Any]
    timings: dict[str, float]


@dataclass(frozen=True)
class ValidatedInputs:
    student: StudentSpec
    router: RouterSpec
    masks: MaskSet
    samples: Samples
    targets: tuple[Target, ...]
    lowbit_sidecar: tuple[Path, dict[str, Any]] | None = None
    router_checked: bool = False  # the masks file named its router and it matched
