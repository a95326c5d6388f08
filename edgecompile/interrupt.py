"""Ctrl-C / SIGTERM that cannot be lost.

The signal handler raises KeyboardInterrupt, but an exception raised while C++ calls back into
Python (onnxruntime's logger callback, for one) is swallowed and printed as "Exception ignored".
So the request is also remembered, and every step boundary and the final commit re-check it.
"""

from __future__ import annotations

import threading

_requested = threading.Event()


def request(signum: int | None = None, frame: object = None) -> None:
    _requested.set()
    raise KeyboardInterrupt


def check() -> None:
    if _requested.is_set():
        raise KeyboardInterrupt
