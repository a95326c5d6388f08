"""Static placement estimates for EPs that cannot run here: NNAPI, Core ML (two formats), XNNPACK.

Nothing here executes on those EPs (the onnxruntime wheel has only the CPU EP); every report has
`method=ESTIMATED`. The graph examined is the one a basic-level .ort contains: the model is optimized by
an onnxruntime session with exactly `ortformat.convert_to_ort`'s options, then ONNX shape inference runs.
Always give the original .onnx, never an `all`-level optimized one (ONNX shape inference cannot type
`com.microsoft` outputs, so every shape downstream would look dynamic).

* nnapi / coreml-*: the op tables of onnxruntime's mobile usability checker
  (`onnxruntime.tools.mobile_helpers`, the code behind `check_onnx_model_mobile_usability`), its
  fixed-shape rule and its rank limit (5 for Core ML), used through its Python objects since the tool only
  logs. On top, the caveats of those tables that can be checked statically (the tool lists them but never
  applies them), e.g. NNAPI's "Gather indices must be constant unless int32".
* xnnpack: the wheel has no checker; the EP's per-op rules (`xnnpack/detail/node_support_checker.cc` and
  the MatMul/Gemm/Softmax/conv `IsOnnxNodeSupported` functions) are re-implemented below.

Partitions come from the checker's `check_partitioning` (a copy of onnxruntime's
`CreateSupportedPartitionNodeGroups`) fed with our per-node verdicts. It keys dicts by NodeProto and so
sets `onnx.NodeProto.__hash__` for the whole process; we restore the previous value afterwards, under a
lock (only code that itself patches NodeProto concurrently from another thread can observe it).
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from edgecompile.check.placement import ESTIMATED, PlacementReport, UnsupportedNodes

CPU_EP = "CPUExecutionProvider"
CHECKERS: dict[str, str] = {
    "nnapi": "NnapiExecutionProvider",
    "coreml-mlprogram": "CoreMLExecutionProvider",
    "coreml-neuralnetwork": "CoreMLExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}
_TABLES = {  # checker -> (op table file in onnxruntime/tools/mobile_helpers, max rank, display name)
    "nnapi": ("nnapi_supported_ops.md", 999, "NNAPI"),
    "coreml-mlprogram": ("coreml_supported_mlprogram_ops.md", 5, "Core ML MLProgram"),
    "coreml-neuralnetwork": ("coreml_supported_neuralnetwork_ops.md", 5, "Core ML NeuralNetwork"),
}
DYNAMIC_SHAPE = "input has a dynamic shape"
_ONNX_DOMAINS = ("", "ai.onnx")
_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------------------
# graph lookups
# ----------------------------------------------------------------------------------------------------------
class _Graph:
    """Shapes, element types and constness of the values of one graph after shape inference."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.value_info = {v.name: v for v in [*g.input, *g.output, *g.value_info]}
        self.initializers: dict[str, TensorProto] = {t.name: t for t in g.initializer}
        for node in g.node:  # onnxruntime turns Constant nodes into initializers on load
            if node.op_type == "Constant" and node.domain in _ONNX_DOMAINS:
                for a in node.attribute:
                    if a.name == "value":
                        self.initializers[node.output[0]] = a.t
        self.opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}

    def is_const(self, name: str) -> bool:
        return name in self.initializers

    def shape(self, name: str) -> list[int | str | None] | None:
        """Dims (int, symbolic name, or None for unknown); None when even the rank is unknown."""
        if name in self.initializers:
            return list(self.initializers[name].dims)
        v = self.value_info.get(name)
        if v is None or not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim]

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        v = self.value_info.get(name)
        return v.type.tensor_type.elem_type if v is not None and v.type.HasField("tensor_type") else None

    def is_fixed(self, name: str) -> bool:
        """The usability checker's rule: an initializer, or a value whose every dim is a positive integer."""
        from onnxruntime.tools.onnx_model_utils import is_fixed_size_tensor

        if name in self.initializers:
            return True
        v = self.value_info.get(name)
        return v is not None and is_fixed_size_tensor(v)

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# ----------------------------------------------------------------------------------------------------------
# caveats of the usability checker's tables that can be checked statically (reason text, or None)
# ----------------------------------------------------------------------------------------------------------
_Caveat = Callable[[onnx.NodeProto, _Graph], "str | None"]


def _gather_nnapi(n: onnx.NodeProto, g: _Graph) -> str | None:
    if not g.is_const(n.input[1]) and g.elem_type(n.input[1]) != TensorProto.INT32:
        return "Gather indices must be constant unless int32"
    return None


def _axes_const(n: onnx.NodeProto, g: _Graph) -> str | None:
    if len(n.input) > 1 and n.input[1] and not g.is_const(n.input[1]):
        return f"{n.op_type} axes must be constant"
    return None


def _gemm_nnapi(n: onnx.NodeProto, g: _Graph) -> str | None:
    if not g.is_const(n.input[1]) and _attr(n, "transB", 0) != 1:
        return "Gemm B must be constant unless transB = 1"
    return None


def _b_const(n: onnx.NodeProto, g: _Graph) -> str | None:
    if not g.is_const(n.input[1]):
        return f"{n.op_type} input B must be constant"
    return None


def _qdq_const(n: onnx.NodeProto, g: _Graph) -> str | None:
    if any(i and not g.is_const(i) for i in n.input[1:]):
        return f"{n.op_type} scales and zero points must be constant"
    return None


def _qlinear_matmul_const(n: onnx.NodeProto, g: _Graph) -> str | None:
    if any(n.input[i] and not g.is_const(n.input[i]) for i in (1, 2, 4, 5, 6, 7) if i < len(n.input)):
        return "QLinearMatMul scales and zero points must be constant"
    return None


def _gather_scalar_indices(n: onnx.NodeProto, g: _Graph) -> str | None:
    return "Gather scalar indices not supported" if g.rank(n.input[1]) == 0 else None


def _slice_const(n: onnx.NodeProto, g: _Graph) -> str | None:
    if any(i and not g.is_const(i) for i in n.input[1:]):
        return "Slice starts/ends/axes/steps must be constant"
    return None


def _shape_no_start_end(n: onnx.NodeProto, g: _Graph) -> str | None:
    if _attr(n, "start", 0) != 0 or _attr(n, "end") is not None:
        return "Shape start/end attributes not supported"
    return None


def _where_float(n: onnx.NodeProto, g: _Graph) -> str | None:
    if g.elem_type(n.input[1]) not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        return "Where X/Y must be float or float16"
    return None


def _pow_fp32(n: onnx.NodeProto, g: _Graph) -> str | None:
    if g.elem_type(n.input[0]) != TensorProto.FLOAT or g.elem_type(n.input[1]) != TensorProto.FLOAT:
        return "Pow inputs must both be float32"
    return None


CAVEATS: dict[str, dict[str, _Caveat]] = {
    "nnapi": {"Gather": _gather_nnapi, "Squeeze": _axes_const, "Unsqueeze": _axes_const, "Gemm": _gemm_nnapi,
              "QuantizeLinear": _qdq_const, "DequantizeLinear": _qdq_const, "QLinearMatMul": _qlinear_matmul_const},
    "coreml-neuralnetwork": {"MatMul": _b_const, "Gemm": _b_const, "Gather": _gather_scalar_indices,
                             "Slice": _slice_const, "Shape": _shape_no_start_end, "Pow": _pow_fp32},
    "coreml-mlprogram": {"Gemm": _b_const, "Slice": _slice_const, "Where": _where_float, "Pow": _pow_fp32},
}


# ----------------------------------------------------------------------------------------------------------
# XNNPACK EP rules, re-implemented from onnxruntime/core/providers/xnnpack (no checker in the wheel)
# ----------------------------------------------------------------------------------------------------------
_XNNPACK_2D_OPS = ("Conv", "ConvTranspose", "QLinearConv", "MaxPool", "AveragePool", "Resize")


def _xnnpack_reason(n: onnx.NodeProto, g: _Graph) -> str | None:
    """None if the XNNPACK EP claims the node, else why not."""
    if n.domain not in _ONNX_DOMAINS:
        return "op not supported by XNNPACK"  # com.microsoft QLinear* pool/softmax variants: not in BERT graphs
    op = n.op_type
    if op == "MatMul":  # math/matmul.cc
        a, b = n.input[0], n.input[1]
        if g.elem_type(a) != TensorProto.FLOAT:
            return "MatMul A must be float32"
        if not g.is_const(b):
            return "MatMul B must be a constant initializer"
        sa, sb = g.shape(a), g.shape(b)
        if sa is None or sb is None:
            return "MatMul input shape unknown"
        if len(sb) > 2 or len(sa) not in (len(sb), len(sb) + 1):
            return "MatMul ranks not supported (A [M,K] or [batch,M,K], B [K,N])"
        if any(d == 0 for d in sb):
            return "MatMul B has a zero dim"
        return None
    if op == "Gemm":  # math/gemm.cc
        if _attr(n, "alpha", 1.0) != 1.0 or _attr(n, "beta", 1.0) != 1.0:
            return "Gemm alpha and beta must be 1"
        a, b = n.input[0], n.input[1]
        c = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if g.elem_type(a) != TensorProto.FLOAT:
            return "Gemm A must be float32"
        if not g.is_const(b) or (c is not None and not g.is_const(c)):
            return "Gemm B and C must be constant initializers"
        sa, sb, sc = g.shape(a), g.shape(b), (g.shape(c) if c else [])
        if sa is None or sb is None or sc is None or max(len(sa), len(sb), len(sc)) >= 3:
            return "Gemm inputs must be known and rank < 3"
        if c and sc and sc[0] not in (sb[0], sb[1]):
            return "Gemm C must match a dim of B"
        return None
    if op == "Softmax":  # math/softmax.cc
        x = n.input[0]
        if g.elem_type(x) not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return "Softmax input must be float or float16"
        s = g.shape(x)
        if not s:
            return "Softmax input shape unknown"
        if g.opset.get("ai.onnx", 13) >= 13:
            if _attr(n, "axis", -1) not in (-1, len(s) - 1):
                return "Softmax axis must be the last dim"
            if not isinstance(s[-1], int) or s[-1] <= 0:
                return "Softmax last dim must be fixed"
        return None
    if op in _XNNPACK_2D_OPS:  # nn/*.cc, tensor/resize.cc: only the 2D and constant-weight rules
        if g.rank(n.input[0]) != 4:
            return f"{op} must be 2D (4-D input)"
        weights = 3 if op == "QLinearConv" else 1
        if op in ("Conv", "ConvTranspose", "QLinearConv") and not g.is_const(n.input[weights]):
            return f"{op} weights must be constant"
        return None
    if op in ("Clip", "Relu"):
        return f"{op} only fused into a preceding XNNPACK Conv/MaxPool/AveragePool"
    return "op not supported by XNNPACK"


# ----------------------------------------------------------------------------------------------------------
# verdicts and partitioning
# ----------------------------------------------------------------------------------------------------------
def _table_reason(checker: str) -> Callable[[onnx.NodeProto, _Graph], str | None]:
    from onnxruntime.tools.mobile_helpers import usability_checker

    table_file, max_rank, display = _TABLES[checker]
    table = usability_checker._SupportedOpsChecker(str(Path(usability_checker.__file__).parent / table_file))
    caveats = CAVEATS[checker]

    def reason(n: onnx.NodeProto, g: _Graph) -> str | None:
        # first failing rule wins: op, rank, caveat, then shape. So the DYNAMIC_SHAPE group holds exactly the
        # nodes that fixing the shapes would place.
        if not table.is_op_supported(n):
            return f"op not supported by {display}"
        ranks = [g.rank(i) for i in n.input if i]
        if n.op_type == "Transpose":
            ranks.append(len(_attr(n, "perm", [])))
        if any(r is not None and r > max_rank for r in ranks):
            return f"rank > {max_rank}"
        check = caveats.get(n.op_type) if n.domain in _ONNX_DOMAINS else None
        violation = check(n, g) if check else None
        if violation:
            return violation
        if not all(g.is_fixed(i) for i in n.input if i):
            return DYNAMIC_SHAPE
        return None

    return reason


@dataclass
class _Verdicts:
    """Duck-types the usability checker's _SupportedOpsChecker; remembers each node's verdict."""

    reason_of: Callable[[onnx.NodeProto, _Graph], str | None]
    graph: _Graph

    def __post_init__(self) -> None:
        self.reasons: dict[int, tuple[onnx.NodeProto, str | None]] = {}

    def is_op_supported(self, node: onnx.NodeProto) -> bool:
        if id(node) not in self.reasons:
            self.reasons[id(node)] = (node, self.reason_of(node, self.graph))
        return self.reasons[id(node)][1] is None

    def get_caveats(self) -> list[str]:
        return []


@contextlib.contextmanager
def _node_hash_restored() -> Iterator[None]:
    """get_producer_consumer_maps sets onnx.NodeProto.__hash__ process-wide; put back what was there."""
    missing = object()
    before = onnx.NodeProto.__dict__.get("__hash__", missing)
    try:
        yield
    finally:
        if before is missing:
            if "__hash__" in onnx.NodeProto.__dict__:
                del onnx.NodeProto.__hash__
        else:
            onnx.NodeProto.__hash__ = before


def _basic_graph(model_path: Path, fold_constants: bool) -> onnx.ModelProto:
    """The basic-optimized graph (what the .ort holds), with ONNX shape inference; weights not loaded."""
    import onnxruntime as ort

    from edgecompile.lowering.ortformat import conversion_session_options

    options, disabled = conversion_session_options("basic", fold_constants=fold_constants)
    with tempfile.TemporaryDirectory(prefix="edgecompile-placement-") as tmp:
        optimized = Path(tmp) / "basic.onnx"
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "basic.bin")
        try:
            ort.InferenceSession(str(model_path), options, providers=[CPU_EP], disabled_optimizers=disabled)
        except Exception as exc:
            raise ValueError(f"{model_path}: onnxruntime cannot load the model ({' '.join(str(exc).split())})") from exc
        model = onnx.load(str(optimized), load_external_data=False)
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception:  # an op without a shape function: keep what can be inferred
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)


def _notes(checker: str, supported_ops: set[str], unsupported_ops: set[str], dynamic: list[str]) -> list[str]:
    notes = [
        "Static estimate: nothing was executed on the EP. Graph: onnxruntime basic-level optimized (what the "
        ".ort for this target holds) with ONNX shape inference.",
    ]
    if checker == "nnapi":
        notes += [
            "NNAPI EP needs Android 8.1 (API 27) or later; Android 9 (API 28) or later is recommended. NNAPI is "
            "deprecated by Google as of Android 15.",
            "Per-op minimum NNAPI feature levels are not checked (e.g. Gather and Pad need Android 10 / API 29, "
            "Elu Android 11 / API 30).",
            "NNAPI takes no node with a dynamic input shape: fix the shapes (onnxruntime.tools."
            "make_dynamic_shape_fixed) before judging placement.",
        ]
        if "Gather" in supported_ops:
            notes.append("Placed Gather nodes need NNAPI feature level 3 (Android 10, API 29).")
    elif checker.startswith("coreml"):
        if checker == "coreml-mlprogram":
            notes.append("Core ML provider option ModelFormat=MLProgram needs Core ML 5 (iOS 15 / macOS 12) or later.")
            if "Gather" in unsupported_ops:
                notes.append("The MLProgram op table in the onnxruntime wheel lacks Gather, but the Core ML EP "
                             "source builds Gather for MLProgram: Gather placement is likely under-reported.")
        else:
            notes.append("NeuralNetwork is the Core ML EP's default model format but the older one: MLProgram "
                         "(ModelFormat=MLProgram) supports more ops (LayerNormalization, Erf, ...).")
        if dynamic:
            notes.append("The Core ML EP can run dynamic shapes (RequireStaticInputShapes=0, at a performance "
                         "cost); like onnxruntime's checker, this estimate counts them as unsupported.")
    else:
        notes += [
            "XNNPACK rules were re-implemented from the onnxruntime source (xnnpack/detail/node_support_checker.cc, "
            "math/matmul.cc, math/gemm.cc, math/softmax.cc); the onnxruntime wheel has no XNNPACK checker. Not "
            "yet pinned to the rel-1.32.0 sources.",
            "XNNPACK claims single nodes run as CPU kernels: partitions are runs of adjacent claimed nodes, with "
            "no device copies between them. Give XNNPACK the threads (intra_op_num_threads) and run onnxruntime's "
            "own pool with 1 thread.",
        ]
    return notes


def static_placement(model_path: Path, checker: str, graph: str, *, fold_constants: bool = True) -> PlacementReport:
    """Estimate where the nodes of `model_path` would run with `checker`'s EP (see the module docstring).

    `graph` names the graph in the report. `fold_constants` must match the conversion (`convert_to_ort`)
    so the graph checked is the graph shipped. Every unsupported node is listed once, under the first
    failing rule: op, rank, caveat, then dynamic shape. Prints nothing and leaves logging alone.
    """
    if checker not in CHECKERS:
        raise ValueError(f"unknown placement checker {checker!r}; known: {', '.join(CHECKERS)}")
    from onnxruntime.tools.mobile_helpers import usability_checker

    model = _basic_graph(Path(model_path), fold_constants)
    g = _Graph(model)
    verdicts = _Verdicts(_xnnpack_reason if checker == "xnnpack" else _table_reason(checker), g)
    with _LOCK, _node_hash_restored():
        # our verdicts already include the shape and rank rules, so the checker only groups
        info = usability_checker.check_partitioning(model.graph, verdicts, require_fixed_input_sizes=False)
        total, on_target, partitions = info.num_nodes, info.num_supported_nodes, info.num_partitions
    groups: dict[tuple[str, str], list[str]] = {}
    supported_ops: set[str] = set()
    unsupported_ops: set[str] = set()
    for node, reason in verdicts.reasons.values():
        if reason is None:
            supported_ops.add(node.op_type)
        else:
            unsupported_ops.add(node.op_type)
            groups.setdefault((node.op_type, reason), []).append(node.name)
    ep = CHECKERS[checker]
    dynamic = [i.name for i in model.graph.input if not g.is_fixed(i.name)]
    return PlacementReport(
        graph=graph,
        ep=ep,
        method=ESTIMATED,
        total_nodes=total,
        nodes_by_ep={ep: on_target, CPU_EP: total - on_target},
        partitions=partitions,
        unsupported=[UnsupportedNodes(op, reason, sorted(names)) for (op, reason), names in sorted(groups.items())],
        dynamic_inputs=dynamic,
        notes=_notes(checker, supported_ops, unsupported_ops, dynamic),
    )
