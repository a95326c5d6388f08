"""The parity gate: onnxruntime outputs of every graph vs the PyTorch reference, per target.

Metrics per (graph, output), over all samples (per-token outputs on real tokens only):
- max abs error: max |ort - ref|;
- max rel error: max over samples of max|ort - ref| / max|ref| (scale-free, no blow-up near 0);
- min cosine: min over samples of the cosine similarity of the flattened outputs;
- argmax agreement (logits only) and cluster agreement (router), as fractions of samples.
The end-to-end row takes, per sample, the cluster the ONNX router picked and compares that
cluster's ONNX output with the reference cluster the PyTorch router picked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgecompile.errors import input_error
from edgecompile.reference.evaluate import PER_TOKEN_OUTPUTS, Outputs
from edgecompile.runtime.sessions import create_session
from edgecompile.lowering.targets import Target
from edgecompile.inputs.tokens import Encoded, pad_batch

DYNAMIC_CHUNK = 32  # samples per onnxruntime call on dynamic-shape targets


@dataclass
class Comparison:
    target: str
    graph: str
    output: str
    samples: int
    max_abs_error: float | None
    max_relative_error: float | None
    min_cosine: float | None
    agreement: float | None = None  # argmax (logits) or cluster id (router)
    worst_sample: int = 0
    failures: list[str] = field(default_factory=list)
    near_ties: int = 0  # quantized-activation graphs: disagreements at a near-tie of the contract (is_near_tie)

    @property
    def passed(self) -> bool:
        return not self.failures


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def is_near_tie(got: np.ndarray, ref_values: np.ndarray, ref_ids: np.ndarray, found: int, max_relative_error: float) -> bool:
    """Where a graph with quantized activations picked `found` and the reference its top id `ref_ids[0]`,
    was that a near-tie the 8-bit activation contract cannot order?

    Yes when `found` is among the reference's top ids (values `ref_values`, best first), the graph's
    scores there are within the low-bit tolerance of the reference's, and the reference's margin
    between its choice and `found` is no larger than the two scores' errors together (a one-ulp
    difference upstream can flip an activation code; flips move scores by about that much). A real
    fault gives errors beyond the tolerance, or a choice far down the reference's ranking.
    """
    if found not in ref_ids:
        return False
    errors = np.abs(got[ref_ids].astype(np.float64) - ref_values)
    scale = float(np.abs(ref_values).max()) or 1.0
    if float(errors.max()) / scale > max_relative_error:
        return False
    j = int(np.flatnonzero(ref_ids == found)[0])
    return float(ref_values[0] - ref_values[j]) <= float(errors[0] + errors[j])


CONTRACTS = ("exact", "lowbit", "quantized")  # fp32 rewrites; quantized activations (XTC); block-quantized weights


def tolerances(target: Target, contract: str) -> tuple[float, float]:
    """(max relative error, min cosine) of a contract on this target."""
    tol = target.parity
    if contract == "quantized":
        return tol.quantized_max_relative_error, tol.quantized_min_cosine
    if contract == "lowbit":
        return tol.lowbit_max_relative_error, tol.lowbit_min_cosine
    return tol.max_relative_error, tol.min_cosine


def compare(target: Target, graph: str, output: str, refs: list[np.ndarray], gots: list[np.ndarray],
            lowbit: bool | str = False) -> Comparison:
    """`lowbit`: False / "exact", True / "lowbit" (quantized activations), or "quantized" (block-quantized weights):
    which of the target's tolerances apply, and whether an argmax disagreement may be a near-tie."""
    tol = target.parity
    contract = {False: "exact", True: "lowbit"}.get(lowbit, lowbit) if isinstance(lowbit, bool) else lowbit
    lowbit = contract != "exact"
    max_relative_error, min_cosine = tolerances(target, contract)
    abs_errors, rel_errors, cosines, agree, ties = [], [], [], [], []
    non_finite = sum(int(not np.isfinite(got).all()) for got in gots)
    for ref, got in zip(refs, gots):
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        abs_error = float(np.abs(got64 - ref64).max()) if ref.size else 0.0
        scale = float(np.abs(ref64).max()) if ref.size else 0.0
        abs_errors.append(abs_error)
        rel_errors.append(abs_error / scale if scale > 0 else (0.0 if abs_error == 0 else float("inf")))
        if not np.isfinite(abs_error):
            rel_errors[-1] = float("inf")
        cosines.append(_cosine(ref, got))
        if output == "logits":
            same = bool(np.isfinite(got).all()) and int(np.argmax(ref)) == int(np.argmax(got))
            ids = np.argsort(-ref.reshape(-1), kind="stable")[:8]
            tie = lowbit and not same and bool(np.isfinite(got).all()) and is_near_tie(
                got.reshape(-1), ref.reshape(-1)[ids].astype(np.float64), ids, int(np.argmax(got)), max_relative_error)
            agree.append(same)
            ties.append(tie)
    # NaN never passes: comparisons below are written so that a NaN fails them.
    worst = int(np.nanargmax(rel_errors)) if rel_errors and not np.all(np.isnan(rel_errors)) else 0
    result = Comparison(
        target.name, graph, output, len(refs), float(np.max(abs_errors)) if abs_errors else 0.0,
        float(np.max(rel_errors)) if rel_errors else 0.0, float(np.min(cosines)) if cosines else 1.0,
        float(np.mean(agree)) if agree else None, worst, near_ties=sum(ties),
    )
    if non_finite:
        result.failures.append(f"{non_finite} sample(s) with NaN or Inf outputs")
    if not result.max_relative_error <= max_relative_error:
        result.failures.append(f"max rel error {result.max_relative_error:.3g} > {max_relative_error:g}")
    if not result.min_cosine >= min_cosine:
        result.failures.append(f"min cosine {result.min_cosine:.6f} < {min_cosine:g}")
    agreed_or_tied = float(np.mean([a or b for a, b in zip(agree, ties)])) if agree else None
    if agreed_or_tied is not None and not agreed_or_tied >= tol.min_argmax_agreement:
        result.failures.append(f"argmax agreement {result.agreement:.3f} < {tol.min_argmax_agreement:g}"
                               + (f" ({result.near_ties} near-tie(s) of the low-bit contract not counted)" if result.near_ties else ""))
    return result


def compare_router(target: Target, refs: Outputs, gots: Outputs) -> list[Comparison]:
    distances = compare(target, "router", "distances", refs["distances"], gots["distances"])
    ids_ref = np.array([int(x.reshape(-1)[0]) for x in refs["cluster_id"]])
    ids_got = np.array([int(x.reshape(-1)[0]) for x in gots["cluster_id"]])
    agreement = float(np.mean(ids_ref == ids_got)) if ids_ref.size else 1.0
    worst = int(np.argmax(ids_ref != ids_got)) if agreement < 1 else 0
    ids = Comparison(target.name, "router", "cluster_id", int(ids_ref.size), None, None, None, agreement, worst)
    if not agreement >= target.parity.min_router_agreement:
        mismatched = [int(i) for i in np.flatnonzero(ids_ref != ids_got)]
        ids.failures.append(f"cluster agreement {agreement:.3f} < {target.parity.min_router_agreement:g} (samples {mismatched[:8]})")
    return [distances, ids]


def check_fits(samples: list[Encoded], target: Target, source: str = "samples", lines: tuple[int, ...] | None = None,
               which: str = "") -> None:
    """A fixed-shape target takes at most `sequence` tokens: a longer input is an error, never truncated."""
    if target.dynamic_shapes:
        return
    for i, sample in enumerate(samples):
        if sample.length > target.sequence:
            raise input_error(
                source, f"line {lines[i] if lines else i + 1}{f' ({which} tokens)' if which else ''}",
                f"at most {target.sequence} tokens (target '{target.name}' shapes.sequence; not truncated silently)",
                sample.length,
            )


def batches(samples: list[Encoded], target: Target):
    """Yield (indices, feed) in the shapes the target accepts."""
    if target.dynamic_shapes:
        for start in range(0, len(samples), DYNAMIC_CHUNK):
            chunk = samples[start : start + DYNAMIC_CHUNK]
            yield list(range(start, start + len(chunk))), pad_batch(chunk)
        return
    check_fits(samples, target)
    for start in range(0, len(samples), target.batch):
        chunk = samples[start : start + target.batch]
        rows = chunk + [chunk[-1]] * (target.batch - len(chunk))
        yield list(range(start, start + len(chunk))), pad_batch(rows, target.sequence)


def run_graph(path: Path, target: Target, samples: list[Encoded], threads: int = 0) -> Outputs:
    """Run one graph on every sample; per-sample outputs cut back to the real tokens."""
    session = create_session(path, target, threads)
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    outputs: Outputs = {name: [None] * len(samples) for name in output_names}
    for indices, feed in batches(samples, target):
        results = session.run(output_names, {name: feed[name] for name in input_names})
        for name, value in zip(output_names, results):
            for row, index in enumerate(indices):
                item = value[row]
                if name in PER_TOKEN_OUTPUTS:
                    item = item[: samples[index].length]
                outputs[name][index] = np.array(item)
    return outputs


def end_to_end(target: Target, reference: dict[str, Outputs], onnx: dict[str, Outputs], lowbit: bool = False) -> list[Comparison]:
    picked_ref = [int(x.reshape(-1)[0]) for x in reference["router"]["cluster_id"]]
    picked_onnx = [int(x.reshape(-1)[0]) for x in onnx["router"]["cluster_id"]]
    rows = []
    for output in reference[f"cluster_{picked_ref[0]}"]:
        refs = [reference[f"cluster_{k}"][output][s] for s, k in enumerate(picked_ref)]
        gots = [onnx[f"cluster_{k}"][output][s] for s, k in enumerate(picked_onnx)]
        rows.append(compare(target, "end-to-end", output, refs, gots, lowbit))
    return rows


@dataclass
class TargetParity:
    target: str
    rows: list[Comparison]

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)


def check_target(
    target: Target,
    graph_paths: dict[str, Path],
    reference: dict[str, Outputs],
    student_samples: list[Encoded],
    router_samples: list[Encoded],
    threads: int = 0,
    progress=None,
    lowbit_graphs: frozenset[str] = frozenset(),
) -> TargetParity:
    """`lowbit_graphs`: graphs with quantized activations, compared end to end with the lowbit tolerances."""
    onnx: dict[str, Outputs] = {}
    rows: list[Comparison] = []
    for graph, path in graph_paths.items():
        if progress:
            progress(graph)
        samples = router_samples if graph == "router" else student_samples
        onnx[graph] = run_graph(path, target, samples, threads)
        if graph == "router":
            rows += compare_router(target, reference["router"], onnx["router"])
        else:
            lowbit = graph in lowbit_graphs
            rows += [compare(target, graph, out, reference[graph][out], onnx[graph][out], lowbit) for out in reference[graph]]
    rows += end_to_end(target, reference, onnx, bool(lowbit_graphs))
    return TargetParity(target.name, rows)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def parity_table(results: list[TargetParity]) -> str:
    """Markdown table (also readable as plain text on a terminal)."""
    lines = [
        "| target | graph | output | samples | max abs err | max rel err | min cosine | agreement | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        for r in result.rows:
            status = ("ok" + (f" ({r.near_ties} low-bit near-tie{'s' if r.near_ties > 1 else ''})" if r.near_ties else "")
                      if r.passed else "FAIL: " + "; ".join(r.failures))
            lines.append(
                f"| {r.target} | {r.graph} | {r.output} | {r.samples} | {_fmt(r.max_abs_error)} | "
                f"{_fmt(r.max_relative_error)} | {_fmt(r.min_cosine, 7)} | {_fmt(r.agreement)} | {status} |"
            )
    return "\n".join(lines)


def parity_json(results: list[TargetParity], tolerances: dict[str, Target]) -> dict:
    def rounded(row: Comparison) -> dict:
        data = asdict(row)
        for key, digits in (("max_abs_error", 3), ("max_relative_error", 3), ("min_cosine", 7)):
            if data[key] is not None:
                data[key] = float(f"{data[key]:.{digits}g}")
        data["passed"] = row.passed
        return data

    return {
        "passed": all(r.passed for r in results),
        "targets": {
            r.target: {
                "passed": r.passed,
                "tolerances": asdict(tolerances[r.target].parity),
                "rows": [rounded(row) for row in r.rows],
            }
            for r in results
        },
    }


def placement_markdown(target: str, executed_on: str, placements: dict[str, dict]) -> list[str]:
    """The placement section of one target: nodes per EP, partitions, what did not go to the EP and why."""
    first = next(iter(placements.values()), None)
    if first is None:
        return []
    lines = [f"### Placement on '{target}' ({first['ep']})", "", f"Parity executed on: {executed_on}.",
             f"Placement method: {first['method']}.", "",
             "| graph | nodes on EP | partitions | not on the EP (op x count: reason) |", "|---|---:|---:|---|"]
    for graph, p in placements.items():
        off = "; ".join(f"{u['op_type']} x{len(u['nodes'])}: {u['reason']}" for u in p["unsupported"]) or "none"
        lines.append(f"| {graph} | {p['nodes_by_ep'].get(p['ep'], 0)}/{p['total_nodes']} | {p['partitions']} | {off} |")
    notes = sorted({note for p in placements.values() for note in p.get("notes", [])})
    dynamic = sorted({name for p in placements.values() for name in p.get("dynamic_inputs", [])})
    if dynamic:
        lines.append(f"\nDynamic-shape inputs: {', '.join(dynamic)}.")
    lines += [f"- {note}" for note in notes]
    return lines + [""]


def parity_markdown(table: str, targets, entries: dict[str, dict] | None = None) -> str:
    lines = ["# Parity report", "", "Every graph vs the PyTorch reference (masks and quantizers applied in eager mode), per target.", ""]
    for t in targets:
        p = t.parity
        lines.append(
            f"- **{t.name}** ({t.provider}, {t.precision}): max rel error ≤ {p.max_relative_error:g}, "
            f"min cosine ≥ {p.min_cosine:g}, argmax agreement ≥ {p.min_argmax_agreement:g}, "
            f"router agreement ≥ {p.min_router_agreement:g}; graphs with quantized activations end to end: "
            f"max rel error ≤ {p.lowbit_max_relative_error:g}, min cosine ≥ {p.lowbit_min_cosine:g}"
            + ("" if t.runs_here else f". **{t.provider} cannot run on the build machine: these numbers come from "
               f"running the shipped files on the CPU EP, not on {t.provider} itself.**")
        )
    lines += [
        "", table, "",
        "max rel error = max over samples of max|onnx - ref| / max|ref|; per-token outputs on real tokens only.",
        "Rows 'integer Linear groups (same input)': every low-bit Linear fed the input onnxruntime saw; "
        "agreement = share of identical activation codes (must be 1).", "",
    ]
    for name, entry in (entries or {}).items():
        lines += placement_markdown(name, entry["parity_executed_on"], entry.get("placement", {}))
    return "\n".join(lines)
