"""onnxruntime sessions for a target: the one place that knows how to reach an execution provider.

Built-in EPs are requested by name. Plugin EPs (onnxruntime >= 1.24, e.g. the `onnxruntime-qnn`
package) are registered once per process from the library their Python package names, then
selected by device; their provider options may include paths the package computes (the QNN HTP
backend library). Which package and which of its functions: PLUGIN_EPS, a fixed list kept with the
target definitions (lowering/targets.py), keyed by provider name. Neither a target file nor a bundle can name a module to import or a
function to call. A strict session disables CPU fallback, so onnxruntime itself refuses to run a
graph with any node off the target EP.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import onnxruntime as ort

from edgecompile.errors import BundleError, EnvironmentProblem, GraphLoadError, one_line
from edgecompile.lowering.targets import PLUGIN_EPS, PluginEP, Target


_REGISTERED: set[str] = set()


def session_options(threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def _plugin_module(target: Target, plugin: PluginEP) -> Any:
    try:
        return importlib.import_module(plugin.module)
    except ImportError:
        raise EnvironmentProblem(
            f"target '{target.name}': {target.provider} needs the Python package providing '{plugin.module}'; "
            f"install it with: {plugin.install}"
        ) from None


def provider_options(target: Target) -> dict[str, str]:
    options = dict(target.provider_options)
    plugin = PLUGIN_EPS.get(target.provider)
    if plugin is not None:
        module = _plugin_module(target, plugin)
        options.update({key: str(getattr(module, function)()) for key, function in plugin.option_paths})
    return options


def _plugin_devices(target: Target, plugin: PluginEP) -> list[Any]:
    module = _plugin_module(target, plugin)
    if target.provider not in _REGISTERED:
        ort.register_execution_provider_library(target.provider, str(getattr(module, plugin.library)()))
        _REGISTERED.add(target.provider)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == target.provider]
    if not devices:
        raise EnvironmentProblem(f"target '{target.name}': {target.provider} registered but offers no device on this machine")
    return devices


def configure(options: ort.SessionOptions, target: Target, strict: bool) -> list[Any] | None:
    """Attach the target's EP (and the session config its files need) to `options`; returns the `providers` argument
    for InferenceSession."""
    for key, value in target.linear_weights.session_config().items():  # e.g. the lookup-table GEMM of 2-bit MatMulNBits
        options.add_session_config_entry(key, value)
    if not target.runs_here or target.provider == "CPUExecutionProvider":
        return ["CPUExecutionProvider"]
    if strict:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    plugin = PLUGIN_EPS.get(target.provider)
    if plugin is not None:
        options.add_provider_for_devices(_plugin_devices(target, plugin), provider_options(target))
        return None
    available = ort.get_available_providers()
    if target.provider not in available:
        hint = f"; install it with: {target.install}" if target.install else ""
        raise EnvironmentProblem(
            f"target '{target.name}': {target.provider} is not in this onnxruntime (available: {', '.join(available)}){hint}"
        )
    return [(target.provider, provider_options(target)), "CPUExecutionProvider"]


def open_session(path: Path, target: Target, options: ort.SessionOptions, providers: list[Any] | None,
                 model: bytes | None = None) -> ort.InferenceSession:
    """InferenceSession with `configure`d options (on `model` if given: a graph derived in memory from `path`); an
    onnxruntime failure becomes one line naming the file."""
    try:
        return ort.InferenceSession(model if model is not None else str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise GraphLoadError(f"{path}: onnxruntime could not load it on {target.parity_provider} ({one_line(exc)})") from None


def onnxruntime_refused(exc: BaseException) -> bool:
    """True for an error onnxruntime raised running a graph: its own exception types, or the ValueError its Python
    layer raises for inputs a graph does not declare (a bundle whose graphs and manifest disagree)."""
    import os
    import traceback

    if type(exc).__module__ == "onnxruntime.capi.onnxruntime_pybind11_state":
        return True
    frames = traceback.extract_tb(exc.__traceback__) if isinstance(exc, ValueError) else []
    return bool(frames) and f"{os.sep}onnxruntime{os.sep}" in frames[-1].filename


def create_session(path: Path, target: Target, threads: int = 0, strict: bool | None = None,
                   model: bytes | None = None) -> ort.InferenceSession:
    """A session on the target's parity EP; strict (default: the target's strict_placement) disables fallback."""
    options = session_options(threads)
    providers = configure(options, target, target.strict_placement if strict is None else strict)
    return open_session(path, target, options, providers, model)


def bundle_session(bundle: Any, entry: dict[str, Any], graph: str, target: Target, threads: int = 0,
                   without_heads: bool = False) -> ort.InferenceSession:
    """A session on one graph of a bundle, as every reading command opens it: the file the bundle's layout names
    (bundle/layout.py), checked for what it may ask of onnxruntime (bundle/graph_files.py) before onnxruntime
    sees it; a graph onnxruntime cannot load is the bundle's fault (BundleError, exit 5), never a traceback."""
    from edgecompile.bundle.graph_files import check_graph_file

    path = bundle.graph_file(entry, graph)
    check_graph_file(path)
    model = None
    if without_heads:
        from edgecompile.runtime.without_heads import without_extra_heads

        try:
            model = without_extra_heads(path)
        except Exception as exc:  # onnx's parser raises its own types; the file passed check_graph_file
            raise BundleError(f"{path}: could not read it to drop its extra heads ({one_line(exc)}); run `edgecompile verify`") from None
    try:
        return create_session(path, target, threads, model=model)
    except GraphLoadError as exc:
        raise BundleError(f"{exc}; run `edgecompile verify`") from None
