"""Replace each eager self-attention core by the ONNX Attention op (opset 23).

Matched (as the exporter writes BERT's eager attention; q, k, v are [B, S, D]):
    qh = Transpose(Reshape(q, [B, S, -1, h]), [0,2,1,3])    kh = Transpose(Reshape(k, ...), [0,2,3,1])
    p  = Softmax(Add(Div(MatMul(qh, kh), c), mask))          vh = Transpose(Reshape(v, ...), [0,2,1,3])
    (transformers 5 scales with Mul(MatMul(qh, kh), 1 / c) instead of the Div)
    context = Reshape(Transpose(MatMul(p, vh), [0,2,1,3]), [B, S, -1])
Replaced by:
    context = Attention(q, k, v, mask4, q_num_heads = kv_num_heads = D / h, scale = 1 / c)
with mask4 the exported additive mask expanded once per graph to [B, 1, S, S] (onnxruntime's CPU
kernel needs the query dimension). Measured on the build machine: bitwise-identical outputs and
~0.7 ms (7-10%) less per MiniLM inference, fp32 or low-bit, because the kernel reads and writes
[B, S, D] directly and adds the mask inside its loop. The model moves to opset 23; the only op
this graph family uses whose signature changed since opset 17 is Reduce* (`axes` became an input).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompile.passes.provenance import module_of, set_module
from edgecompile.passes.tensors import new_initializer

OPSET = 23
_REDUCE_WITH_AXES_INPUT = ("ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2",
                           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


class NotAttention(LookupError):
    pass


def _producer(value: ir.Value | None, op_type: str) -> ir.Node:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain != "":
        raise NotAttention(f"expected {op_type}")
    return node


def _perm(node: ir.Node) -> list[int]:
    return list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else []


def _only_user(value: ir.Value, op_type: str) -> ir.Node:
    users = [use.node for use in value.uses()]
    if len(users) != 1 or users[0].op_type != op_type:
        raise NotAttention(f"expected one {op_type} user")
    return users[0]


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


class _Core:
    def __init__(self, softmax: ir.Node) -> None:
        if "axis" in softmax.attributes and softmax.attributes["axis"].as_int() not in (-1, 3):
            raise NotAttention("softmax axis")
        add = _producer(softmax.inputs[0], "Add")
        self.mask = add.inputs[1]
        scores, self.scale = _scaled_scores(add.inputs[0])
        tq, tk = _producer(scores.inputs[0], "Transpose"), _producer(scores.inputs[1], "Transpose")
        if _perm(tq) != [0, 2, 1, 3] or _perm(tk) != [0, 2, 3, 1]:
            raise NotAttention("q / k layout")
        context = _only_user(softmax.outputs[0], "MatMul")
        tv = _producer(context.inputs[1], "Transpose")
        if _perm(tv) != [0, 2, 1, 3]:
            raise NotAttention("v layout")
        merge = _only_user(context.outputs[0], "Transpose")
        if _perm(merge) != [0, 2, 1, 3]:
            raise NotAttention("context layout")
        self.output_reshape = _only_user(merge.outputs[0], "Reshape")
        rq, rk, rv = (_producer(t.inputs[0], "Reshape") for t in (tq, tk, tv))
        self.q, self.k, self.v = rq.inputs[0], rk.inputs[0], rv.inputs[0]
        self.head_size = self._head_size(rq)
        width = _width(self.q)
        if width % self.head_size:
            raise NotAttention("width not a multiple of the head size")
        self.heads = width // self.head_size
        self.module = module_of(softmax)

    @staticmethod
    def _head_size(reshape: ir.Node) -> int:
        shape = _constant(reshape.inputs[1])
        if shape is None:
            last = _constant(_producer(reshape.inputs[1], "Concat").inputs[-1])
            shape = last
        if shape is None or int(shape.reshape(-1)[-1]) <= 0:
            raise NotAttention("head size")
        return int(shape.reshape(-1)[-1])


def _scaled_scores(value: ir.Value | None) -> tuple[ir.Node, float]:
    """Div(MatMul, sqrt(h)) as transformers 4 writes the scaling, or Mul(MatMul, h ** -0.5) as 5 does."""
    node = value.producer() if value is not None else None
    if node is None or node.domain != "" or node.op_type not in ("Div", "Mul"):
        raise NotAttention("expected Div or Mul")
    factor = _constant(node.inputs[1])
    if factor is None or factor.size != 1:
        raise NotAttention("scale")
    factor = np.float32(factor.reshape(-1)[0])
    return _producer(node.inputs[0], "MatMul"), float(np.float32(1.0) / factor if node.op_type == "Div" else factor)


def _width(value: ir.Value) -> int:
    """Feature width D of q: the bias of the projection that produced it (Add), or its Split size."""
    node = value.producer()
    if node is not None and node.op_type == "Split":
        sizes = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if sizes is None:
            raise NotAttention("split sizes")
        return int(sizes[list(node.outputs).index(value)])
    if node is not None and node.op_type == "Add":
        for candidate in node.inputs:
            if candidate is not None and candidate.const_value is not None and candidate.const_value.dtype == ir.DataType.FLOAT \
                    and len(candidate.const_value.shape) == 1:
                return int(candidate.const_value.shape[0])
    raise NotAttention("projection width")


def upgrade_reduce_axes(model: ir.Model) -> None:
    """opset 18 turned Reduce*'s `axes` attribute into an input (onnxscript's converter leaves it)."""
    for node in model.graph:
        if node.domain == "" and node.op_type in _REDUCE_WITH_AXES_INPUT and "axes" in node.attributes:
            axes = new_initializer(model.graph, np.array(node.attributes["axes"].as_ints(), np.int64), f"{node.name or 'reduce'}.axes")
            del node.attributes["axes"]
            node.resize_inputs(2)
            node.replace_input_with(1, axes)


class FuseAttention(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.fused = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        cores = []
        for node in graph:
            if node.op_type == "Softmax" and node.domain == "":
                try:
                    cores.append(_Core(node))
                except NotAttention:
                    continue
        if not cores:
            return ir.passes.PassResult(model, modified=False)
        upgrade_reduce_axes(model)
        model.opset_imports[""] = OPSET
        model.ir_version = max(model.ir_version or 0, 10)
        expanded: dict[int, ir.Value] = {}
        for core in cores:
            if id(core.mask) not in expanded:
                anchor = [use.node for use in core.mask.uses()][0]
                tape = ir.tape.Tape()
                shape = tape.op("Shape", [core.mask])  # [B, 1, 1, T]
                batch = tape.op("Slice", [shape, new_initializer(graph, np.array([0], np.int64), "attention.mask.start"),
                                          new_initializer(graph, np.array([1], np.int64), "attention.mask.one")])
                length = tape.op("Slice", [shape, new_initializer(graph, np.array([3], np.int64), "attention.mask.last"),
                                           new_initializer(graph, np.array([4], np.int64), "attention.mask.end")])
                full = tape.op("Concat", [batch, new_initializer(graph, np.array([1], np.int64), "attention.mask.heads"),
                                          length, length], {"axis": 0})
                expanded[id(core.mask)] = tape.op("Expand", [core.mask, full])
                for i, node in enumerate(tape.nodes):
                    node.name = f"/attention_mask/{node.op_type}_{i}"
                graph.insert_before(anchor, tape.nodes)
            attention = ir.node(
                "Attention", [core.q, core.k, core.v, expanded[id(core.mask)]],
                {"q_num_heads": core.heads, "kv_num_heads": core.heads, "scale": core.scale},
                name=f"/{core.module.replace('.', '/')}/Attention",
            )
            set_module(attention, core.module)
            graph.insert_before(core.output_reshape, attention)
            ir.convenience.replace_all_uses_with(core.output_reshape.outputs[0], attention.outputs[0])
            self.fused += 1
        return ir.passes.PassResult(model, modified=True)
