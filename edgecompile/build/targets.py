"""Stage per target: one target's folder in the bundle: lower, write, report placement, convert, check parity.

Order matters: placement is read from the .onnx files as written (an estimate needs the original
graph, not an optimized copy); a strict target fails before parity if any node is off its EP;
ORT-format targets then replace their .onnx files by self-contained .ort files, and parity runs
on exactly what ships.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from edgecompile.check.parity import TargetParity, batches, check_target
from edgecompile.check.placement import PlacementReport
from edgecompile.errors import PlacementError
from edgecompile.inputs.tokens import Encoded
from edgecompile.lowering.steps import GraphLowBit
from edgecompile.lowering.targets import Target, target_to_dict
from edgecompile.progress import Progress

REQUIRED_OPERATORS = "required_operators.config"


@dataclass
class TargetOutcome:
    entry: dict[str, Any]  # the manifest's targets[name]
    parity: TargetParity
    graph_bytes: dict[str, int]


@dataclass
class GraphSet:
    """What every target of a build lowers and checks: the target-independent graphs (router, dense, clusters),
    the PyTorch reference outputs and the encoded samples they were computed on."""

    graphs: dict[str, ir.Model]
    reference: dict[str, Any]
    student_samples: list[Encoded]
    router_samples: list[Encoded]
    lowbit: GraphLowBit = field(default_factory=GraphLowBit)
    threads: int = 0


# (target, lowered graphs, integer-lowered groups per graph) -> parity rows of the integer kernels
IntegerCheck = Callable[[Target, dict[str, Any], dict[str, list]], list]


def calibration_feeds(target: Target, graphs: GraphSet) -> dict[str, list]:
    if "quantize_qdq" not in target.steps:
        return {}
    return {
        "student": [feed for _, feed in batches(graphs.student_samples, target)],
        "router": [feed for _, feed in batches(graphs.router_samples, target)],
    }


def placement_of(path: Path, target: Target, graph: str) -> PlacementReport:
    if target.placement_checker == "session":
        from edgecompile.check.placement_session import session_placement

        return session_placement(path, target, graph)
    from edgecompile.check.placement_static import static_placement

    return static_placement(path, target.placement_checker, graph)


def placement_failure(target: Target, reports: list[PlacementReport]) -> PlacementError:
    lines = [f"placement failed on '{target.name}': nodes off {target.provider} with fallback disabled (placement.strict)"]
    for report in reports:
        for group in report.unsupported:
            shown = ", ".join(group.nodes[:4]) + (f" (+{len(group.nodes) - 4} more)" if len(group.nodes) > 4 else "")
            lines.append(f"  {report.graph}: {group.op_type} x{len(group.nodes)} [{shown}]: {group.reason}")
    return PlacementError("\n".join(lines))


def build_target(target: Target, root: Path, job: GraphSet, progress: Progress, integer_check: IntegerCheck | None = None) -> TargetOutcome:
    """An encoder target's folder under `root`, its parity checked on exactly the files written."""
    from edgecompile.bundle.layout import epcontext_file, graph_file
    from edgecompile.bundle.store import WEIGHTS, graph_signature, write_graphs
    from edgecompile.lowering.steps import lower_for_target

    folder = root / target.name
    with progress.step(f"lowering graphs for target '{target.name}' ({', '.join(target.steps) or 'no steps'})"):
        lowered, lowering = lower_for_target(
            job.graphs, target, job.lowbit, calibration_feeds(target, job),
            progress=progress.note if "quantize_qdq" in target.steps else None,
        )
    runtime = check_runtime_floor(target, lowered)
    # graphs whose Linears were lowered to integer kernels (their activations are quantized)
    lowbit_groups = {n: r["lowbit"]["linear_groups"] for n, r in lowering.items() if r.get("lowbit", {}).get("linear_groups")}
    integer_rows = integer_check(target, lowered, lowbit_groups) if integer_check else []
    with progress.step(f"writing graphs for target '{target.name}'"):
        needs = write_graphs(folder, [(f"{n}.onnx", m) for n, m in lowered.items()], target.shared_weights and target.format == "onnx")
        graph_bytes = {name.removesuffix(".onnx"): size for name, size in needs.items()}
    with progress.step(f"placement on '{target.name}' ({target.placement_checker})"):
        placements = [placement_of(folder / f"{name}.onnx", target, name) for name in lowered]
        for p in placements:
            progress.note(f"{p.graph}: {p.on_target}/{p.total_nodes} nodes on {p.ep}, {p.partitions} partition(s)")
        if target.strict_placement and not all(p.fully_placed for p in placements):
            raise placement_failure(target, [p for p in placements if not p.fully_placed])
    epcontext: dict[str, str] = {}
    if target.epcontext:
        from edgecompile.runtime.epcontext import check_same_outputs, compile_epcontext

        with progress.step(f"compiling EPContext models for '{target.name}'"):
            for name in lowered:
                source, cached = folder / f"{name}.onnx", root / epcontext_file(target.name, name)
                compile_epcontext(source, cached, target)
                samples = job.router_samples if name == "router" else job.student_samples
                check_same_outputs(source, cached, target, next(batches(samples[:1], target))[1])
                epcontext[name] = epcontext_file(target.name, name)
    extension = "onnx"
    digests: dict[str, str] = {}
    if target.format == "ort":
        from edgecompile.lowering.ortformat import convert_to_ort, ort_content_digest, write_required_operators_config

        with progress.step(f"converting '{target.name}' graphs to ORT format"):
            for name in lowered:
                convert_to_ort(folder / f"{name}.onnx", folder / f"{name}.ort", level=target.ort_level)
                (folder / f"{name}.onnx").unlink()
                graph_bytes[name] = (folder / f"{name}.ort").stat().st_size
                digests[name] = ort_content_digest(folder / f"{name}.ort")
            (folder / WEIGHTS).unlink(missing_ok=True)
            write_required_operators_config([folder / f"{n}.ort" for n in lowered], folder / REQUIRED_OPERATORS)
            extension = "ort"
    lowbit_graphs = sorted(lowbit_groups)
    with progress.step(f"parity on '{target.name}' ({target.parity_provider})"):
        paths = {name: root / graph_file(target.name, name, decoder=False, extension=extension) for name in lowered}
        result = check_target(
            target, paths, job.reference, job.student_samples, job.router_samples, job.threads,
            progress=lambda graph: progress.note(f"running {graph}"), lowbit_graphs=frozenset(lowbit_graphs),
        )
        result.rows += integer_rows
    executed = (f"{target.provider}, executed on this machine" if target.runs_here else
                f"CPUExecutionProvider: {target.provider} cannot run here; the {extension} files were run on the CPU EP "
                "and placement is a static estimate")
    entry = {
        "provider": target.provider,
        "parity_executed_on": executed,
        "precision": target.precision,
        "dynamic_shapes": target.dynamic_shapes,
        **({} if target.dynamic_shapes else {"batch": target.batch, "sequence": target.sequence}),
        "format": target.format,
        **runtime,
        "shared_weights": target.shared_weights and target.format == "onnx",
        "definition": target.source.name,
        "target": target_to_dict(target),
        "graphs": {
            name: {"file": graph_file(target.name, name, decoder=False, extension=extension), **graph_signature(model),
                   **({"content_digest": digests[name]} if name in digests else {}),
                   **({"epcontext": epcontext[name]} if name in epcontext else {})}
            for name, model in lowered.items()
        },
        "placement": {p.graph: p.to_dict() for p in placements},
        # graphs with quantized activations: end to end under the target's lowbit_* tolerances
        "lowbit_graphs": lowbit_graphs,
        "lowering": {name: public_report(report) for name, report in lowering.items()},
        **({"required_operators": f"{target.name}/{REQUIRED_OPERATORS}"} if target.format == "ort" else {}),
    }
    return TargetOutcome(entry, result, graph_bytes)


def check_runtime_floor(target: Target, lowered: dict[str, Any]) -> dict[str, Any]:
    """Every lowered graph must load on the target's declared oldest onnxruntime (its opset and IR version)."""
    from edgecompile.errors import input_error
    from edgecompile.lowering.runtime_floor import runtime_needed, within_floor

    opset = max(int(m.opset_imports.get("", 0)) for m in lowered.values())
    ir_version = max(int(m.ir_version) for m in lowered.values())
    needed = runtime_needed(opset, ir_version)
    if not within_floor(needed, target.min_onnxruntime):
        raise input_error(target.source, "key 'min_onnxruntime'", f"a runtime that loads opset {opset}, IR version {ir_version} "
                          f"(onnxruntime >= {needed or 'newer than any known'})", repr(target.min_onnxruntime))
    return {"min_onnxruntime": target.min_onnxruntime, "opset": opset, "ir_version": ir_version,
            "files_need_onnxruntime": needed}


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """A lowering report without the internal value names the parity check uses."""
    report = dict(report)
    if "lowbit" in report and "linear_groups" in report["lowbit"]:
        lowbit = dict(report["lowbit"])
        lowbit["linear_groups"] = [{k: v for k, v in g.items() if k != "nodes"} for g in lowbit["linear_groups"]]
        report["lowbit"] = lowbit
    return report
