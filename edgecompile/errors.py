"""Errors a user can act on. Each carries the process exit code scripts rely on.

Exit codes (documented in docs/bundles.md, "Promises"):
  0 success; 1 internal error (a bug: traceback shown); 2 bad input or usage;
  3 parity failed; 4 missing optional dependency or unusable environment;
  5 bundle verification failed (hash mismatch, missing file); 130 interrupted.
"""

from __future__ import annotations

from pathlib import Path


class EdgecompileError(Exception):
    """Base class: the message is one line a person can act on."""

    exit_code = 1


class InputError(EdgecompileError):
    exit_code = 2


class ParityError(EdgecompileError):
    exit_code = 3


class PlacementError(ParityError):
    """Nodes off the target EP on a target that forbids fallback (same exit code as a parity miss)."""


class EnvironmentProblem(EdgecompileError):
    exit_code = 4


class BundleError(EdgecompileError):
    exit_code = 5


class GraphLoadError(EdgecompileError):
    """A runtime refused to load a graph: a bug when `build` just wrote it (exit 1); a reading command turns it
    into a BundleError (the bundle's graph, not the tool, is at fault)."""


def one_line(text: object) -> str:
    """Collapse an exception text (often multi-line) into one readable line."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    line = " ".join(parts)
    return line if len(line) <= 300 else line[:297] + "..."


def input_error(file: Path | str, what: str, expected: object, found: object) -> InputError:
    """The standard shape of a bad-input message: file, what, expected, found."""
    return InputError(f"{file}: {what}: expected {expected}, found {found}")


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC / EDQUOT, from Python (OSError) or from a native writer (safetensors' Rust, onnxruntime)."""
    import errno

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(exc) for s in ("No space left on device", "Disk quota exceeded", "StorageFull")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
