"""onnxruntime sessions for a target: the one place that knows how to reach an execution provider."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from edgecompile.errors import EdgecompileError, EnvironmentProblem, one_line
from edgecompile.targets import Target


def session_options(threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def create_session(path: Path, target: Target, threads: int = 0) -> ort.InferenceSession:
    options = session_options(threads)
    available = ort.get_available_providers()
    if target.provider not in available:
        raise EnvironmentProblem(
            f"target '{target.name}': execution provider {target.provider} is not available in this onnxruntime "
            f"(available: {', '.join(available)})"
        )
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=[(target.provider, target.provider_options)])
    except Exception as exc:
        raise EdgecompileError(f"{path}: onnxruntime could not load it on {target.provider} ({one_line(exc)})") from None
