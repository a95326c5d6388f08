"""Lower low-bit Linears (weights exactly codes * alpha) to integer kernels on the CPU EP.

Per group of quantized Linears reading the same input with the same activation quantizer (Q/K/V
of a layer), the input is quantized ONCE and one kernel computes all of them:

  dynamic (one scale per token):
    s = ReduceMax(|x|, -1) / 128;  q = QuantizeLinear(x, max(s, FLT_TRUE_MIN), zero point 128, per token)
    y = MatMulIntegerToFloat(q, codes, s, alpha, 128) + bias        [com.microsoft]
  static (one stored scale):
    q = QuantizeLinear(x, s, 128);  y = MatMulIntegerToFloat(q, codes, s, alpha, 128, -, bias)

Activations are uint8 with zero point 128, i.e. exactly clamp(round(x / s), -128, 127) + 128
(measured: the u8 x s8 path is several times faster than s8 x s8 in onnxruntime's CPU kernels).
The integer sum is exact; only the float rescale rounds. Bias stays a separate Add in dynamic
mode because MatMulIntegerToFloat applies a non-scalar a_scale after its bias. Codes are stored
packed (see packing.py) and expanded by a subgraph onnxruntime folds at session creation.

DeepSpeed groups that cut rows give each row one alpha per run of input features: each run gets
its own kernel over its slice of q (same scale), the runs' outputs are added left to right, then
the bias, as the reference `QuantLinear` does. Linears with float activations ("none", W1A32)
keep their MatMul; only their weight becomes the packed codes times alpha, folded back into the
exact float weight at session creation (the file stays small, the outputs are the float export's).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgecompile.passes.sites import LinearSite, StructureError, linear_site
from edgecompile.passes.packing import expand_weight
from edgecompile.passes.provenance import module_of, set_module
from edgecompile.passes.tensors import unique_initializer_name
from edgecompile.reference.lowbit import ACTIVATION_LEVELS, MAX_RUNS_PER_ROW, SCALE_FLOOR, RecoveredCodes, recover_codes

KERNEL = "MatMulIntegerToFloat"
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class ActivationQuant:
    mode: str  # "dynamic" | "static" | "none" (float activations: the weight is packed, the MatMul stays)
    static_scale: float | None = None


def recover_site(site: LinearSite) -> RecoveredCodes:
    """codes [out, in] and alpha [out, runs] of a lowered Linear (runs may be uneven after pruning)."""
    recovered = recover_codes(site.weight_array().T, MAX_RUNS_PER_ROW, uneven=True)
    if recovered is None:
        raise StructureError(f"{site.module}: declared low-bit, but its weight is not exactly codes * alpha per row (or per run)")
    return recovered


class LowerLowBitLinears(ir.passes.InPlacePass):
    """`linears`: graph module path -> activation quantizer of that Linear's input."""

    def __init__(self, linears: dict[str, ActivationQuant]) -> None:
        super().__init__()
        self.linears = linears
        self.lowered: list[dict] = []  # integer kernel groups, for the manifest and the integer check
        self.float_activations: list[dict] = []  # W1A32 Linears: packed weights, float MatMul

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_module: dict[str, list[ir.Node]] = defaultdict(list)
        for node in graph:
            by_module[module_of(node)].append(node)
        groups: dict[tuple, list[tuple[LinearSite, RecoveredCodes]]] = {}
        for module, quant in self.linears.items():
            site = linear_site(module, by_module.get(module, []), bias=None)
            if site is None:
                continue  # removed by pruning
            recovered = recover_site(site)
            if quant.mode == "none":
                self._pack_float_weight(graph, site, recovered)
                continue
            key = (id(site.matmul.inputs[0]), quant.mode, quant.static_scale, recovered.starts)
            groups.setdefault(key, []).append((site, recovered))
        if not groups:
            return ir.passes.PassResult(model, modified=bool(self.float_activations))
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        order = {id(node): i for i, node in enumerate(graph)}
        for members in groups.values():
            members.sort(key=lambda m: order[id(m[0].matmul)])
            self._lower_group(graph, members, self.linears[members[0][0].module])
        return ir.passes.PassResult(model, modified=True)

    def _pack_float_weight(self, graph: ir.Graph, site: LinearSite, recovered: RecoveredCodes) -> None:
        """MatMul(x, W) with W = Cast(packed codes) * alpha: bit for bit the float weight, stored packed."""
        module = site.module
        tape = ir.tape.Tape()
        codes, scheme, packed_bytes = expand_weight(tape, recovered.codes.T, f"{module}.codes")
        alpha_t = recovered.alpha.T.astype(np.float32)  # [runs, out]
        if recovered.runs == 1:
            scale = _const(graph, tape, alpha_t[0], f"{module}.alpha")
        else:  # one alpha row per input feature, gathered from the runs' alphas
            run_of_feature = np.repeat(np.arange(recovered.runs, dtype=np.int64), np.diff(recovered.starts))
            scale = tape.op("Gather", [_const(graph, tape, alpha_t, f"{module}.alpha"),
                                       _const(graph, tape, run_of_feature, f"{module}.run_of_feature")], {"axis": 0})
        weight = tape.op("Mul", [tape.op("Cast", [codes], {"to": ir.DataType.FLOAT}), scale])
        _finish(graph, tape, module, site.matmul)
        site.matmul.replace_input_with(1, weight)
        self.float_activations.append({
            "modules": [module], "in_features": int(recovered.codes.shape[1]), "out_features": [int(recovered.codes.shape[0])],
            "kernel": "MatMul (float activations)", "activation": "none", "alphas_per_row": recovered.runs,
            "packing": scheme.name, "packed_bytes": packed_bytes + recovered.alpha.nbytes, "fp32_bytes": int(recovered.codes.size * 4),
        })

    def _lower_group(self, graph: ir.Graph, members: list[tuple[LinearSite, RecoveredCodes]], quant: ActivationQuant) -> None:
        sites = [site for site, _ in members]
        recovered = [r for _, r in members]
        module = sites[0].module
        tape = ir.tape.Tape()

        def const(array: np.ndarray, hint: str) -> ir.Value:
            return _const(graph, tape, array, f"{module}.{hint}")

        codes = np.concatenate([r.codes.T for r in recovered], axis=1)  # [K, N]
        alpha = np.concatenate([r.alpha for r in recovered], axis=0).astype(np.float32)  # [N, runs]
        biases = [s.bias_array() for s in sites]
        bias = None if all(b is None for b in biases) else np.concatenate(
            [np.zeros(r.codes.shape[0], np.float32) if b is None else b for b, r in zip(biases, recovered)]).astype(np.float32)
        widths = [r.codes.shape[0] for r in recovered]
        runs = recovered[0].run_slices()
        x = sites[0].matmul.inputs[0]

        zero_point = const(np.array(128, np.uint8), "zero_point")
        if quant.mode == "dynamic":
            peak = tape.op("ReduceMax", [tape.op("Abs", [x])], {"axes": [-1], "keepdims": 1})
            scale = tape.op("Div", [peak, const(np.array(ACTIVATION_LEVELS, np.float32), "levels")])
            safe = tape.op("Max", [scale, const(np.array(SCALE_FLOOR, np.float32), "scale_floor")])
            per_token = tape.op("Reshape", [safe, const(np.array([-1], np.int64), "flat")])
            rows = tape.op("Reshape", [x, const(np.array([-1, codes.shape[0]], np.int64), "rows")])
            zero_points = tape.op("Expand", [zero_point, tape.op("Shape", [per_token])])
            codes_value = tape.op("QuantizeLinear", [rows, per_token, zero_points], {"axis": 0})
            q = tape.op("Reshape", [codes_value, tape.op("Shape", [x])])
        else:
            scale = const(np.array(quant.static_scale, np.float32), "act_scale")
            codes_value = q = tape.op("QuantizeLinear", [x, scale, zero_point])
        packed_bytes, schemes = alpha.nbytes, set()
        y = None
        for r, run in enumerate(runs):
            q_run = q if len(runs) == 1 else tape.op(
                "Slice", [q, const(np.array([run.start], np.int64), f"run{r}.start"), const(np.array([run.stop], np.int64), f"run{r}.stop"),
                          const(np.array([-1], np.int64), f"run{r}.axis")])
            weight, scheme, nbytes = expand_weight(tape, codes[run], f"{module}.codes" + (f".run{r}" if len(runs) > 1 else ""))
            packed_bytes, schemes = packed_bytes + nbytes, schemes | {scheme.name}
            inputs = [q_run, weight, scale, const(alpha[:, r], "alpha" + (f".run{r}" if len(runs) > 1 else "")), zero_point]
            if quant.mode == "static" and len(runs) == 1 and bias is not None:
                inputs += [None, const(bias, "bias")]  # acc * (s * alpha) + bias inside the kernel
            part = tape.op("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN)
            y = part if y is None else tape.op("Add", [y, part])  # runs left to right
        if bias is not None and not (quant.mode == "static" and len(runs) == 1):
            y = tape.op("Add", [y, const(bias, "bias")])
        outputs = [y]
        if len(sites) > 1:
            outputs = list(tape.op_multi_out("Split", [y, const(np.array(widths, np.int64), "split")], {"axis": -1}, num_outputs=len(sites)))
        # the first node reading x: its input 0 is what the quantizer sees
        quantizer_entry = next(n for n in tape.nodes if n.inputs and n.inputs[0] is x)
        _finish(graph, tape, module, sites[0].matmul)
        for site, output in zip(sites, outputs):
            if site.output.is_graph_output():
                name, site.output.name = site.output.name, None
                output.name = name  # a graph output keeps its name
            ir.convenience.replace_all_uses_with(site.output, output, replace_graph_outputs=True)
        self.lowered.append({
            "modules": [s.module for s in sites],
            "in_features": int(codes.shape[0]),
            "out_features": widths,
            "kernel": KERNEL,
            "activation": quant.mode,
            "alphas_per_row": len(runs),
            "packing": "+".join(sorted(schemes)),
            "packed_bytes": int(packed_bytes),
            "fp32_bytes": int(codes.size * 4),
            # Nodes the teacher-forced parity check reads its values from (node names are stable; value
            # names and even the input value can change in later steps, e.g. attention fusion).
            "nodes": {"input": quantizer_entry.name, "codes": codes_value.producer().name, "output": y.producer().name},
        })


def _const(graph: ir.Graph, tape: ir.tape.Tape, array: np.ndarray, hint: str) -> ir.Value:
    """A new initializer (registered by `_finish`), named uniquely in the graph and on the tape."""
    taken = {v.name for v in tape.initializers}
    name = unique_initializer_name(graph, hint)
    while name in taken:
        name += "_"
    return tape.initializer(ir.tensor(np.asarray(array, order="C"), name=name), name=name)


def _finish(graph: ir.Graph, tape: ir.tape.Tape, module: str, anchor: ir.Node) -> None:
    """Name the tape's nodes stably, tag their provenance and put them in the graph before `anchor`."""
    for i, node in enumerate(tape.nodes):
        set_module(node, module)
        node.name = f"/{module.replace('.', '/')}/lowbit/{node.op_type}_{i}"
    for value in tape.initializers:
        graph.register_initializer(value)
    graph.insert_before(anchor, tape.nodes)
