"""ORT-format (.ort) emission for mobile targets: conversion, a content digest, the reduced-build config.

Choices (measured on onnxruntime 1.32; details in the mobile research notes):

* **Conversion goes through `InferenceSession`**, not `onnxruntime.tools.convert_onnx_models_to_ort`: the
  tool takes the optimization level only from an environment variable, names its outputs itself, writes a
  temp folder next to the *input* model, prints instead of raising, and cannot disable an optimizer. A
  session with `session.save_model_format=ORT` and `optimized_model_filepath` does exactly what the tool
  does, with an explicit output path and a real exception.
* **Basic level by default** (= the tool's "Runtime" style for these graphs): NNAPI, Core ML and XNNPACK
  only claim plain ONNX ops, and the `com.microsoft` fusions of the higher levels split their partitions.
  A basic .ort on the CPU EP is bitwise equal to the .onnx run at basic level (not at the default level).
* **`NchwcTransformer` is always disabled** and `session.qdqisint8allowed=1` is set, as the tool does for
  an ARM target: the NCHWc layout is x86-only and would otherwise be baked into the file.
* **`fold_constants=False` disables `ConstantFolding`**: packed low-bit weights are unpacked by a subgraph
  over initializers, which constant folding would evaluate at conversion time and store unpacked (about
  1.8x larger). The cost: the unpacking ops must be in the reduced build, and unpacking happens on device.
* **External-data input is fine**: onnxruntime resolves `weights.bin` next to the .onnx and the .ort holds
  every initializer inline, so the .ort is self-contained.
* **A .ort is not byte-reproducible** (flatbuffer offsets vary run to run while the decoded content is
  identical), so artifact identity uses `ort_content_digest`, a sha256 of a canonical decoding.
* **The required-operators config** is what `build.sh --minimal_build extended --include_ops_by_config`
  reads (`domain;opset;Op1,Op2`). It is computed with onnxruntime's own `OrtFormatModelProcessor`, for all
  given models at once (ops unioned per domain and since-version), without the tool's absolute-path
  comment lines, so it is byte-reproducible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "layout": ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_SILENT = 4  # onnxruntime log severity "fatal": failures surface as exceptions, nothing goes to stderr


class OrtConversionError(RuntimeError):
    """onnxruntime could not load, optimize or save a model."""


def conversion_session_options(
    level: str = "basic", *, fold_constants: bool = True
) -> tuple[ort.SessionOptions, list[str]]:
    """The session options and disabled optimizers of a conversion (shared with static placement, so the
    graph the placement checker sees is the graph that goes into the .ort)."""
    if level not in LEVELS:
        raise ValueError(f"unknown optimization level {level!r}; known: {', '.join(LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = _SILENT
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    disabled = ["NchwcTransformer"]
    if not fold_constants:
        disabled.append("ConstantFolding")
    return options, disabled


def convert_to_ort(
    onnx_path: Path, ort_path: Path, *, level: str = "basic", fold_constants: bool = True
) -> None:
    """Write `ort_path` (and nothing else) from `onnx_path`, optimized at `level` on the CPU EP.

    Written to a temporary name in the same folder and renamed, so a failure leaves no partial file.
    Raises OrtConversionError naming the model when onnxruntime fails.
    """
    onnx_path, ort_path = Path(onnx_path), Path(ort_path)
    options, disabled = conversion_session_options(level, fold_constants=fold_constants)
    ort_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ort_path.with_name(f".{ort_path.name}.{os.getpid()}.tmp")
    options.optimized_model_filepath = str(tmp)
    options.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
        )
        if not tmp.is_file():
            raise OrtConversionError(f"{onnx_path}: onnxruntime wrote no ORT-format model")
        os.replace(tmp, ort_path)
    except OrtConversionError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        text = " ".join(str(exc).split())
        raise OrtConversionError(f"{onnx_path}: onnxruntime could not convert to ORT format ({text})") from exc
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# reading .ort files (flatbuffer bindings shipped in the onnxruntime wheel)
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_basic_config() -> Iterator[None]:
    """`onnxruntime.tools.ort_format_model` calls logging.basicConfig() at import: make that a no-op."""
    root = logging.getLogger()
    guard = logging.NullHandler()
    add = not root.handlers
    if add:
        root.addHandler(guard)
    try:
        yield
    finally:
        if add:
            root.removeHandler(guard)


def _ort_tools() -> tuple[Any, Any]:
    """(fbs bindings module, OrtFormatModelProcessor). Importing the package appends the bindings' folder
    to sys.path (onnxruntime's own mechanism; the generated code imports `ort_flatbuffers_py`)."""
    with _no_basic_config():
        from onnxruntime.tools.ort_format_model import OrtFormatModelProcessor

        import ort_flatbuffers_py.fbs as fbs
    return fbs, OrtFormatModelProcessor


def _root(path: Path) -> Any:
    fbs, _ = _ort_tools()
    buf = bytearray(Path(path).read_bytes())
    session_cls = fbs.InferenceSession.InferenceSession
    if not session_cls.InferenceSessionBufferHasIdentifier(buf, 0):
        raise ValueError(f"{path}: not an ORT-format model (flatbuffer identifier 'ORTM' missing)")
    return session_cls.GetRootAsInferenceSession(buf, 0)


def _s(value: bytes | None) -> str:
    return value.decode("utf-8") if value is not None else ""


def _vector(obj: Any, name: str) -> list[Any]:
    return [getattr(obj, name)(i) for i in range(getattr(obj, f"{name}Length")())]


def _tensor(t: Any) -> dict[str, Any]:
    raw = b"" if t.RawDataIsNone() else t.RawDataAsNumpy().tobytes()
    digest = hashlib.sha256(raw)
    for s in _vector(t, "StringData"):
        digest.update(len(s).to_bytes(8, "little") + s)
    return {
        "name": _s(t.Name()),
        "doc": _s(t.DocString()),
        "dims": _vector(t, "Dims"),
        "dtype": t.DataType(),
        "nbytes": len(raw),
        "strings": t.StringDataLength(),
        "sha256": digest.hexdigest(),
        "external_offset": t.ExternalDataOffset(),
    }


def _type_info(fbs: Any, t: Any) -> Any:
    if t is None:
        return None
    kinds = fbs.TypeInfoValue.TypeInfoValue
    kind, table = t.ValueType(), t.Value()
    out: dict[str, Any] = {"denotation": _s(t.Denotation()), "kind": kind}
    if table is None:
        return out
    if kind == kinds.tensor_type:
        tt = fbs.TensorTypeAndShape.TensorTypeAndShape()
        tt.Init(table.Bytes, table.Pos)
        shape = tt.Shape()
        dims = None
        if shape is not None:
            dims = []
            for d in _vector(shape, "Dim"):
                v = d.Value()
                dims.append([_s(d.Denotation()), None if v is None else [v.DimType(), v.DimValue(), _s(v.DimParam())]])
        out.update(elem_type=tt.ElemType(), dims=dims)
    elif kind == kinds.sequence_type:
        st = fbs.SequenceType.SequenceType()
        st.Init(table.Bytes, table.Pos)
        out["elem"] = _type_info(fbs, st.ElemType())
    elif kind == kinds.map_type:
        mt = fbs.MapType.MapType()
        mt.Init(table.Bytes, table.Pos)
        out.update(key=mt.KeyType(), value=_type_info(fbs, mt.ValueType()))
    return out


def _attribute(fbs: Any, a: Any) -> list[Any]:
    kinds = fbs.AttributeType.AttributeType
    kind = a.Type()
    value: Any
    if kind == kinds.FLOAT:
        value = a.F()
    elif kind == kinds.INT:
        value = a.I()
    elif kind == kinds.STRING:
        value = _s(a.S())
    elif kind == kinds.TENSOR:
        value = _tensor(a.T())
    elif kind == kinds.GRAPH:
        value = _graph(fbs, a.G())
    elif kind == kinds.FLOATS:
        value = _vector(a, "Floats")
    elif kind == kinds.INTS:
        value = _vector(a, "Ints")
    elif kind == kinds.STRINGS:
        value = [_s(s) for s in _vector(a, "Strings")]
    elif kind == kinds.TENSORS:
        value = [_tensor(t) for t in _vector(a, "Tensors")]
    elif kind == kinds.GRAPHS:
        value = [_graph(fbs, g) for g in _vector(a, "Graphs")]
    else:
        value = None
    return [_s(a.Name()), _s(a.DocString()), kind, value]


def _graph(fbs: Any, g: Any) -> dict[str, Any]:
    nodes = []
    for n in _vector(g, "Nodes"):
        nodes.append({
            "index": n.Index(), "name": _s(n.Name()), "doc": _s(n.DocString()), "domain": _s(n.Domain()),
            "op": _s(n.OpType()), "since": n.SinceVersion(), "type": n.Type(), "ep": _s(n.ExecutionProviderType()),
            "inputs": [_s(x) for x in _vector(n, "Inputs")], "outputs": [_s(x) for x in _vector(n, "Outputs")],
            "input_arg_counts": _vector(n, "InputArgCounts"),
            "implicit_inputs": [_s(x) for x in _vector(n, "ImplicitInputs")],
            "attributes": sorted((_attribute(fbs, a) for a in _vector(n, "Attributes")), key=lambda a: a[0]),
        })
    edges = []
    for e in _vector(g, "NodeEdges"):
        ends = [sorted([x.NodeIndex(), x.SrcArgIndex(), x.DstArgIndex()] for x in _vector(e, kind))
                for kind in ("InputEdges", "OutputEdges")]
        edges.append([e.NodeIndex(), *ends])
    sparse = []
    for sp in _vector(g, "SparseInitializers"):
        values, indices = sp.Values(), sp.Indices()
        sparse.append({"values": values and _tensor(values), "indices": indices and _tensor(indices),
                       "dims": _vector(sp, "Dims")})
    records = []
    runtime_opts = g.RuntimeOptimizations()
    if runtime_opts is not None:
        for entry in _vector(runtime_opts, "Records"):
            items = []
            for r in _vector(entry, "RuntimeOptimizationRecords"):
                nti = r.NodesToOptimizeIndices()
                items.append([_s(r.ActionId()), [_s(x) for x in _vector(r, "ProducedOpIds")], None if nti is None else [
                    _vector(nti, "NodeIndices"), nti.NumInputs(), nti.NumOutputs(), nti.HasVariadicInput(),
                    nti.HasVariadicOutput(), nti.NumVariadicInputs(), nti.NumVariadicOutputs()]])
            records.append([_s(entry.OptimizerName()), items])
    node_args = [[_s(v.Name()), _s(v.DocString()), _type_info(fbs, v.Type())] for v in _vector(g, "NodeArgs")]
    return {
        "inputs": [_s(x) for x in _vector(g, "Inputs")],
        "outputs": [_s(x) for x in _vector(g, "Outputs")],
        "max_node_index": g.MaxNodeIndex(),
        "nodes": sorted(nodes, key=lambda n: n["index"]),
        "edges": sorted(edges),
        "node_args": sorted(node_args, key=lambda v: v[0]),
        "initializers": sorted((_tensor(t) for t in _vector(g, "Initializers")), key=lambda t: t["name"]),
        "sparse_initializers": sorted(sparse, key=lambda s: json.dumps(s, sort_keys=True)),
        "runtime_optimizations": sorted(records, key=lambda r: r[0]),
    }


def _canonical(path: Path) -> dict[str, Any]:
    fbs, _ = _ort_tools()
    session = _root(path)
    model = session.Model()
    if model is None:
        raise ValueError(f"{path}: ORT-format file holds no model")
    resolver = []
    ktsr = session.KernelTypeStrResolver()
    if ktsr is not None:
        for op in _vector(ktsr, "OpKernelTypeStrArgs"):
            args = [[_s(k.KernelTypeStr()), [[a.ArgType(), a.Index()] for a in _vector(k, "Args")]]
                    for k in _vector(op, "KernelTypeStrArgs")]
            resolver.append([_s(op.OpId()), sorted(args, key=lambda x: x[0])])
    return {
        "ort_format_version": _s(session.OrtVersion()),
        "ir_version": model.IrVersion(),
        "opsets": sorted([_s(o.Domain()), o.Version()] for o in _vector(model, "OpsetImport")),
        "producer": [_s(model.ProducerName()), _s(model.ProducerVersion())],
        "domain": _s(model.Domain()),
        "model_version": model.ModelVersion(),
        "doc": [_s(model.DocString()), _s(model.GraphDocString())],
        "metadata": sorted([_s(p.Key()), _s(p.Value())] for p in _vector(model, "MetadataProps")),
        "graph": _graph(fbs, model.Graph()),
        "kernel_type_str_resolver": sorted(resolver, key=lambda r: r[0]),
    }


def ort_content_digest(path: Path) -> str:
    """sha256 (hex) of the decoded content of a .ort: every node, attribute, value type, edge, initializer
    (raw bytes hashed), runtime-optimization record and kernel-type-string entry, with collections that
    have no meaningful order (initializers, node args, edges, resolver entries) sorted by name. Two
    conversions of the same model give the same digest; the file's own sha256 does not."""
    canonical = json.dumps(_canonical(Path(path)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_required_operators_config(ort_paths: list[Path], out: Path) -> None:
    """One reduced-build config (`--include_ops_by_config`) for all `ort_paths`: the union of their ops
    (subgraphs included) per domain and since-version, sorted, with no paths in it."""
    if not ort_paths:
        raise ValueError("write_required_operators_config: no .ort files given")
    _, processor_cls = _ort_tools()
    required: dict[str, dict[int, set[str]]] = {}
    for path in ort_paths:
        _root(Path(path))  # a clear error for a file that is not ORT format
        processor_cls(str(path), required, None).process()
    lines = ["# required operators of the ORT-format models of one edgecompile target (onnxruntime reduced build)"]
    for domain in sorted(required):
        for opset in sorted(required[domain]):
            if required[domain][opset]:
                lines.append(f"{domain};{opset};{','.join(sorted(required[domain][opset]))}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
