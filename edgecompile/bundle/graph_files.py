"""What a bundle's .onnx file may ask of the runtime that opens it, checked before any runtime does.

edgecompile writes graphs whose external data is the `weights.bin` beside them and whose operators
onnxruntime implements itself. A hash-consistent file that asks for anything else (data from another
path, a byte range past the end of weights.bin, an operator domain only a custom-op library serves)
is not one edgecompile wrote: it is refused in one line (BundleError, exit 5) instead of being handed
to onnxruntime, which would fail with a traceback or read what the file points at.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from edgecompile.bundle.layout import WEIGHTS
from edgecompile.errors import BundleError, one_line

# operator domains onnxruntime's own kernels serve (ONNX, its contrib ops, ONNX-ML); no library is loaded for them
DOMAINS = ("", "ai.onnx", "com.microsoft", "ai.onnx.ml")


def _graphs(graph) -> Iterator:
    """A graph and every subgraph of its nodes' attributes (If / Loop / Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _graphs(sub)


def _tensors(graph) -> Iterator:
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            yield from ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)


def check_graph_file(path: Path) -> list[tuple[str, list[int | str]]]:
    """Refuse a graph file edgecompile would not have written; returns its inputs (name, shape) for callers to compare."""
    import onnx

    if path.suffix != ".onnx":  # .ort files are self-contained flatbuffers: no external data to point elsewhere
        return []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError: a damaged file
        raise BundleError(f"{path}: not a readable ONNX file ({one_line(exc)}); run `edgecompile verify`") from None
    weights = path.parent / WEIGHTS
    size = weights.stat().st_size if weights.is_file() and not weights.is_symlink() else None
    graphs = list(_graphs(model.graph)) + [function for function in model.functions]
    for opset in model.opset_import:
        if opset.domain not in DOMAINS:
            raise BundleError(f"{path}: opset import: expected operator domains {', '.join(repr(d) for d in DOMAINS)}, "
                              f"found {opset.domain!r} (served only by a custom-op library, which edgecompile never loads)")
    for graph in graphs:
        for node in graph.node:
            if node.domain not in DOMAINS:
                raise BundleError(f"{path}: node {node.name!r}: expected an operator domain among "
                                  f"{', '.join(repr(d) for d in DOMAINS)}, found {node.domain!r} (served only by a "
                                  "custom-op library, which edgecompile never loads)"[:400])
        for tensor in _tensors(graph) if not isinstance(graph, onnx.FunctionProto) else ():
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            if info.get("location") != WEIGHTS:
                raise BundleError(f"{path}: tensor {tensor.name!r}: external data: expected {WEIGHTS!r} beside the graph, "
                                  f"found {info.get('location')!r}"[:400])
            try:
                end = int(info.get("offset", 0)) + int(info["length"])
            except (KeyError, ValueError):
                raise BundleError(f"{path}: tensor {tensor.name!r}: external data: expected an integer offset and length, "
                                  f"found {info}"[:400]) from None
            if size is None or end > size:
                raise BundleError(f"{path}: tensor {tensor.name!r}: external data: expected bytes within {weights.name} "
                                  f"({'missing' if size is None else f'{size} bytes'}), found a range ending at {end}")

    def shape(value) -> list[int | str]:
        dims = value.type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]

    return [(value.name, shape(value)) for value in model.graph.input]
