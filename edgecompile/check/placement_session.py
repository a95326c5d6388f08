"""Placement from a real onnxruntime session on the target's EP (targets that run here).

The session runs with CPU fallback enabled so every node lands somewhere; onnxruntime records
which EP got which node (`session.record_ep_graph_assignment_info`), and the EP's VERBOSE log
says why it refused a node (the QNN EP's `LogNodeSupport` "REASON :" lines, and the backend's
"backendValidateOpConfig() failed ... error code N" lines), captured with a logger callback.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

from edgecompile.check.placement import EXECUTED, PlacementReport, UnsupportedNodes
from edgecompile.runtime.sessions import configure, open_session, session_options
from edgecompile.lowering.targets import Target

_LOG_LOCK = threading.Lock()  # the logger callback is process-wide


def _parse_reasons(messages: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    reasons, details = {}, {}
    for message in messages:
        if "Validation FAILED" in message:
            reason = message.split("REASON :", 1)[1].strip() if "REASON :" in message else message.strip()
            for line in message.splitlines():
                if "Node name:" in line:
                    reasons[line.split("Node name:", 1)[1].split("Node index:")[0].strip()] = " ".join(reason.split())
        elif "backendValidateOpConfig" in message and "`" in message:
            details[message.split("`")[1]] = " ".join(message.split())
    return reasons, details


def _assigned_session(path: Path, target: Target, verbose_log: list[str] | None) -> ort.InferenceSession:
    """A fallback-enabled session recording node assignment; with `verbose_log`, EP messages are collected."""
    options = session_options()
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    providers = configure(options, target, strict=False)
    if verbose_log is None:
        return open_session(path, target, options, providers)

    def collect(severity: int, category: str, logid: str, location: str, message: str) -> None:
        if "LogNodeSupport" in location or "Validation FAILED" in message or "backendValidateOpConfig" in message:
            verbose_log.append(message)

    with _LOG_LOCK:
        ort.set_default_logger_callback(collect, 0)
        options.log_severity_level = 0
        try:
            return open_session(path, target, options, providers)
        finally:
            ort.set_default_logger_callback(None)
            ort.set_default_logger_severity(3)


def session_placement(path: Path, target: Target, graph: str) -> PlacementReport:
    session = _assigned_session(path, target, None)
    messages: list[str] = []
    if any(s.ep_name != target.provider for s in session.get_provider_graph_assignment_info()):
        session = _assigned_session(path, target, messages)  # again, verbose, only to learn why

    by_ep: dict[str, int] = defaultdict(int)
    partitions: dict[str, int] = defaultdict(int)
    off_target: list[tuple[str, str]] = []
    for subgraph in session.get_provider_graph_assignment_info():
        partitions[subgraph.ep_name] += 1
        for node in subgraph.get_nodes():
            by_ep[subgraph.ep_name] += 1
            if subgraph.ep_name != target.provider:
                off_target.append((node.name, node.op_type))
    reasons, details = _parse_reasons(messages)
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, op_type in off_target:
        reason = reasons.get(name, "not claimed by the EP (no reason logged)")
        if name in details:
            reason += f" [{details[name]}]"
        grouped[(op_type, reason)].append(name)
    unsupported = [UnsupportedNodes(op, reason, sorted(nodes)) for (op, reason), nodes in sorted(grouped.items())]
    own_partitions = 1 if target.provider == "CPUExecutionProvider" and by_ep else partitions.get(target.provider, 0)
    return PlacementReport(graph, target.provider, EXECUTED, sum(by_ep.values()), dict(sorted(by_ep.items())),
                           own_partitions, unsupported)
