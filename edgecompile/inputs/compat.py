"""Which releases of the Hugging Face libraries are installed, for code that must differ between them.

edgecompile supports transformers 4.57 and 5.x (two CI lanes; docs/development.md). Code that depends
on the major asks here instead of probing attributes, so every difference is findable by one name.
Read from package metadata: asking does not import transformers.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version


def _release(distribution: str) -> tuple[int, ...]:
    """(major, minor, patch) of an installed distribution; () when it is not installed."""
    from packaging.version import Version

    try:
        return Version(version(distribution)).release
    except PackageNotFoundError:
        return ()


@cache
def transformers_release() -> tuple[int, ...]:
    """The installed transformers as (major, minor, patch), e.g. (5, 24, 0)."""
    return _release("transformers")


def transformers_major() -> int:
    """4 or 5: the transformers major this process runs with."""
    release = transformers_release()
    return release[0] if release else 0


@cache
def sentence_transformers_major() -> int:
    """The installed sentence-transformers major (5 or 6), 0 when it is not installed."""
    release = _release("sentence-transformers")
    return release[0] if release else 0
