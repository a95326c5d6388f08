"""What `edgecompile bench` times and how: one value for the encoder and the decoder benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchSettings:
    threads: int = 1
    runs: int = 50  # timed rounds (decoder bundles: generations per graph)
    warmup: int = 5
    seed: int = 0  # the random token ids of the graphs' timing
    samples: Path | None = None  # real texts: routed timing (encoders), acceptance of drafts (decoders); default the build's
    # encoder bundles
    batch: int | None = None  # None: 1, or a fixed-shape target's own
    sequence: int | None = None  # None: 128 (at most max_seq_length), or a fixed-shape target's own
    graphs: tuple[str, ...] | None = None  # None: every graph of the target
    routed: bool = True
    # decoder bundles
    prompt_tokens: int = 64
    new_tokens: int = 64
