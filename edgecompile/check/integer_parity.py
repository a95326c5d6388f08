"""Teacher-forced exactness of low-bit Linears: same input, same integers.

End to end, a quantized graph and its PyTorch reference can legitimately drift: a one-ulp float
difference upstream (LayerNorm, softmax, GELU) can move x / s across a rounding boundary and flip
an activation code, and flips compound through the layers. So the integer kernels are proven
separately: for every lowered Linear group, the input onnxruntime actually fed to the quantizer
is captured and given to the reference `QuantLinear`; the activation codes must be identical and
the outputs must agree within the target's strict `max_relative_error` (only float rescaling may
differ). Pruned clusters are handled by scattering the kept input features back to full width
(removed features are exactly 0 in the reference, as its gates make them) and slicing the outputs.
A checkpoint saved after `prune_heads` holds only `heads_present[layer]` (original head ids): the
reference Linears have that width too, so a head mask is read at those ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from edgecompile.inputs.masks import ClusterMasks
from edgecompile.numerics import kept_units
from edgecompile.check.parity import Comparison, batches
from edgecompile.passes.branch_edits import unit_features
from edgecompile.reference.lowbit import QuantLinear, activation_scale, quantize_activation
from edgecompile.runtime.sessions import session_options
from edgecompile.lowering.targets import Target
from edgecompile.inputs.tokens import Encoded

_ROLE = re.compile(r"\.layer\.(\d+)\.(attention\.self\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)$")


def _projection(module: str, masks: ClusterMasks | None, head_size: int,
                heads_present: Sequence[np.ndarray] | None) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """(kept input features, kept output features, output scale) of one Linear in a cluster."""
    match = _ROLE.search(module)
    if masks is None or match is None:
        return None, None, 1.0
    layer, role = int(match.group(1)), match.group(2)
    head_gates = masks.heads[layer] if heads_present is None else masks.heads[layer][heads_present[layer]]
    heads = unit_features(kept_units(head_gates), head_size)
    neurons = kept_units(masks.neurons[layer])
    if role.startswith("attention.self"):
        return None, heads, 1.0
    if role == "attention.output.dense":
        return heads, None, float(masks.blocks[layer, 0])
    if role == "intermediate.dense":
        return None, neurons, 1.0
    return neurons, None, float(masks.blocks[layer, 1])


@dataclass(frozen=True)
class IntegerReference:
    """What every graph's integer check compares with: the reference's quantized Linears and the samples."""

    linears: dict[str, QuantLinear]  # Hugging Face module name -> the reference's QuantLinear
    head_size: int
    samples: list[Encoded]
    threads: int = 0
    heads_present: Sequence[np.ndarray] | None = None  # per layer, the original head ids the checkpoint holds
    prefix: str = ""  # what graph module paths put before the Hugging Face names (the family's graph_prefix)


def check_integer_linears(target: Target, graph_name: str, model: ir.Model, groups: list[dict[str, Any]],
                          masks: ClusterMasks | None, reference: IntegerReference) -> Comparison:
    """One parity row: the graph's integer Linear groups fed exactly what onnxruntime fed them, against the reference."""
    head_size, samples, threads, heads_present = reference.head_size, reference.samples, reference.threads, reference.heads_present
    debug = model.clone()
    nodes = {n.name: n for n in debug.graph}
    values: dict[str, ir.Value] = {}  # (group index, role) -> value, read off the stable node names

    def value_of(group: dict[str, Any], role: str) -> ir.Value:
        node = nodes[group["nodes"][role]]
        return node.inputs[0] if role == "input" else node.outputs[0]

    wanted: list[str] = []
    for i, group in enumerate(groups):
        for role in ("input", "codes", "output"):
            value = value_of(group, role)
            values[f"{i}.{role}"] = value
            if value.name not in wanted:  # Q/K/V with different quantizers share one input value
                wanted.append(value.name)
                if value not in debug.graph.outputs:
                    debug.graph.outputs.append(value)
    session = ort.InferenceSession(ir.to_proto(debug).SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    captured: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    for _, feed in batches(samples, target):
        results = dict(zip(names, session.run(names, {k: feed[k] for k in inputs})))
        for name in wanted:
            captured[name].append(results[name])

    mismatched = total = 0
    worst_abs = worst_rel = 0.0
    with torch.no_grad():
        for i, group in enumerate(groups):
            quant_names = [m.removeprefix(reference.prefix) for m in group["modules"]]
            x_name, codes_name, y_name = (values[f"{i}.{role}"].name for role in ("input", "codes", "output"))
            for batch in range(len(captured[x_name])):
                x = captured[x_name][batch]
                codes = captured[codes_name][batch].astype(np.int32).reshape(x.shape) - 128
                y_onnx = captured[y_name][batch]
                expected_codes, outputs = None, []
                for module, name in zip(group["modules"], quant_names):
                    linear = reference.linears[name]
                    kept_in, kept_out, out_scale = _projection(module, masks, head_size, heads_present)
                    full = np.zeros(x.shape[:-1] + (linear.in_features,), np.float32)
                    if kept_in is None:
                        full[...] = x
                    else:
                        full[..., kept_in] = x
                    xt = torch.from_numpy(full)
                    if expected_codes is None:
                        q = quantize_activation(xt, activation_scale(xt, linear.mode, linear.static_scale)).numpy()
                        expected_codes = q if kept_in is None else q[..., kept_in]
                    y = linear(xt).numpy()
                    y = y if kept_out is None else y[..., kept_out]
                    outputs.append(y * np.float32(out_scale) if out_scale != 1.0 else y)
                y_ref = np.concatenate(outputs, axis=-1)
                mismatched += int(np.count_nonzero(expected_codes.astype(np.int32) != codes))
                total += int(codes.size)
                error = float(np.abs(y_onnx.astype(np.float64) - y_ref).max()) if y_ref.size else 0.0
                scale = float(np.abs(y_ref).max()) if y_ref.size else 0.0
                relative = error / scale if scale > 0 else (0.0 if error == 0 else float("inf"))
                if not np.isfinite(error):  # NaN must fail, and max() would silently keep the old value
                    error = relative = float("inf")
                worst_abs = max(worst_abs, error)
                worst_rel = max(worst_rel, relative)
    agreement = 1.0 - mismatched / total if total else 1.0
    row = Comparison(target.name, graph_name, f"{len(groups)} integer Linear groups (same input)", len(samples),
                     worst_abs, worst_rel, None, agreement)
    if mismatched:
        row.failures.append(f"{mismatched} of {total} activation codes differ")
    if not worst_rel <= target.parity.max_relative_error:
        row.failures.append(f"max rel error {worst_rel:.3g} > {target.parity.max_relative_error:g}")
    return row
