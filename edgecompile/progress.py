"""Progress lines on stderr for long steps, with elapsed times a person can read."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from edgecompile import interrupt


class Progress:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()

    def note(self, message: str) -> None:
        if not self.quiet:
            print(f"    {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        interrupt.check()
        if not self.quiet:
            print(f"==> {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
            interrupt.check()
        finally:
            elapsed = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            if not self.quiet:
                print(f"    done in {elapsed:.1f} s", file=sys.stderr, flush=True)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.started
