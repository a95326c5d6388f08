"""Lower low-bit Linears (weights exactly codes * alpha_row) to integer kernels on the CPU EP.

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
from edgecompile.reference.lowbit import ACTIVATION_LEVELS, SCALE_FLOOR, recover_codes

KERNEL = "MatMulIntegerToFloat"
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class ActivationQuant:
    mode: str  # "dynamic" | "static"
    static_scale: float | None = None


class LowerLowBitLinears(ir.passes.InPlacePass):
    """`linears`: graph module path -> activation quantizer of that Linear's input."""

    def __init__(self, linears: dict[str, ActivationQuant]) -> None:
        super().__init__()
        self.linears = linears
        self.lowered: list[dict] = []  # what was done, for the manifest

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_module: dict[str, list[ir.Node]] = defaultdict(list)
        for node in graph:
            by_module[module_of(node)].append(node)
        groups: dict[tuple, list[LinearSite]] = {}
        for module, quant in self.linears.items():
            site = linear_site(module, by_module.get(module, []))
            if site is None:
                continue  # removed by pruning
            key = (id(site.matmul.inputs[0]), quant.mode, quant.static_scale)
            groups.setdefault(key, []).append(site)
        if not groups:
            return ir.passes.PassResult(model, modified=False)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        order = {id(node): i for i, node in enumerate(graph)}
        for sites in groups.values():
            sites.sort(key=lambda s: order[id(s.matmul)])
            self._lower_group(graph, sites, self.linears[sites[0].module])
        return ir.passes.PassResult(model, modified=True)

    def _lower_group(self, graph: ir.Graph, sites: list[LinearSite], quant: ActivationQuant) -> None:
        module = sites[0].module
        names: set[str] = set()

        def const(array: np.ndarray, hint: str) -> ir.Value:
            name = unique_initializer_name(graph, f"{module}.{hint}")
            while name in names:
                name += "_"
            names.add(name)
            return tape.initializer(ir.tensor(np.asarray(array, order="C"), name=name), name=name)

        recovered = []
        for site in sites:
            codes = recover_codes(site.weight_array().T)
            if codes is None:
                raise StructureError(f"{site.module}: declared low-bit, but its weight is not exactly codes * alpha per row")
            recovered.append(codes)
        codes = np.concatenate([r.codes.T for r in recovered], axis=1)  # [K, N]
        alpha = np.concatenate([r.alpha for r in recovered]).astype(np.float32)
        bias = np.concatenate([s.bias_array() for s in sites]).astype(np.float32)
        widths = [r.codes.shape[0] for r in recovered]
        x = sites[0].matmul.inputs[0]

        tape = ir.tape.Tape()
        weight, scheme, packed_bytes = expand_weight(tape, codes, f"{module}.codes")
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
            y = tape.op("MatMulIntegerToFloat", [q, weight, scale, const(alpha, "alpha"), zero_point], domain=MS_DOMAIN)
            y = tape.op("Add", [y, const(bias, "bias")])
        else:
            scale = const(np.array(quant.static_scale, np.float32), "act_scale")
            codes_value = q = tape.op("QuantizeLinear", [x, scale, zero_point])
            y = tape.op(
                "MatMulIntegerToFloat", [q, weight, scale, const(alpha, "alpha"), zero_point, None, const(bias, "bias")],
                domain=MS_DOMAIN,
            )
        outputs = [y]
        if len(sites) > 1:
            outputs = list(tape.op_multi_out("Split", [y, const(np.array(widths, np.int64), "split")], {"axis": -1}, num_outputs=len(sites)))
        for i, node in enumerate(tape.nodes):
            set_module(node, module)
            node.name = f"/{module.replace('.', '/')}/lowbit/{node.op_type}_{i}"
        # the first node reading x: its input 0 is what the quantizer sees
        quantizer_entry = next(n for n in tape.nodes if n.inputs and n.inputs[0] is x)
        for value in tape.initializers:
            graph.register_initializer(value)
        graph.insert_before(sites[0].matmul, tape.nodes)
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
            "packing": scheme.name,
            "packed_bytes": packed_bytes + alpha.nbytes,
            "fp32_bytes": int(codes.size * 4),
            # Nodes the teacher-forced parity check reads its values from (node names are stable; value
            # names and even the input value can change in later steps, e.g. attention fusion).
            "nodes": {"input": quantizer_entry.name, "codes": codes_value.producer().name, "output": y.producer().name},
        })
