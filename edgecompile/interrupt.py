"""Ctrl-C / SIGTERM that cannot be lost, and that never contradicts what is on disk.

The handler raises KeyboardInterrupt for the first signal only: further signals while that unwinds
(removing the staging folder) are recorded, so cleanup is never cut short. An exception raised
while C++ calls back into Python (onnxruntime's logger callback, for one) is swallowed and printed
as "Exception ignored", so the request is also remembered, and every step boundary and the final
commit re-check it.

Inside `deferred()` (the commit's renames) a signal is only recorded and raised at the end of the
block, unless the outcome was settled inside it. (Blocking the signal with pthread_sigmask is not
enough: the kernel hands it to another thread, and Python runs the handler in the main thread anyway.)

Once the outcome is decided (the new bundle is in place, or the command has finished) `settle()`
makes later signals harmless: they are recorded and change neither the files nor the exit code,
and interpreter shutdown (threading._shutdown) cannot print a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_requested = threading.Event()
_settled = threading.Event()
_deferred = threading.Event()


def install() -> None:
    """Route SIGINT and SIGTERM here for one command (the main thread only)."""
    _requested.clear()
    _settled.clear()
    _deferred.clear()
    signal.signal(signal.SIGINT, request)
    signal.signal(signal.SIGTERM, request)


def request(signum: int | None = None, frame: object = None) -> None:
    first = not _requested.is_set()
    _requested.set()
    if first and not _settled.is_set() and not _deferred.is_set():
        raise KeyboardInterrupt


def check() -> None:
    if _requested.is_set() and not _settled.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block no signal cuts short: a request inside it is raised when it ends (if not settled by then)."""
    _deferred.set()
    try:
        yield
    finally:
        _deferred.clear()
    check()


def settle() -> None:
    """The outcome is decided: from now on a signal is only recorded."""
    _settled.set()


def requested() -> bool:
    return _requested.is_set()
