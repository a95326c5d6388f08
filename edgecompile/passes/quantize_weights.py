"""Block-wise weight-only quantization: a graph's fp32 Linears -> MatMulNBits, a tied embedding -> GatherBlockQuantized.

Runs after pruning and after the cpu target's decoder steps (packed q/k/v, fused norms), so a cluster
quantizes only what it keeps. What it emits is what onnxruntime-genai's model builder emits for
`-p int4` (checked bit for bit on SmolLM2-135M):

  MatMul(x, W[K, N] fp32)  ->  com.microsoft.MatMulNBits(x, B[N, K/bs, bs*bits/8] uint8, scales[N, K/bs] fp32)
  Gather(E[V, H], ids)     ->  GatherBlockQuantized(Reshape(B of the lm_head, [V, H*bits/8]), ids, the same scales)
                               when E is the lm_head weight (tied embeddings): one table serves both

Quantization is onnxruntime's own routine (`quantize_matmul_{4,8}bits`, what MatMulNBitsQuantizer's
DEFAULT algorithm and the builder call): symmetric round-to-nearest per block of `block_size` along K,
scale = the block's value of largest magnitude / -2^(bits-1), no zero points (implicit 2^(bits-1)).
It is deterministic, so the same fp32 tensor always gives the same bytes and weights.bin's content
dedup keeps block-pruned clusters sharing every quantized matrix.

Binary / ternary Linears (`exact_lowbit`): weights whose every output row is {-alpha, 0, +alpha} become
exact 2-bit codes (code = sign + 2 under the implicit zero point 2, scale = alpha in every block).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgecompile.passes.provenance import module_of, set_module
from edgecompile.passes.tensors import new_initializer, replace_node

MS_DOMAIN = "com.microsoft"


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's symmetric block quantizer: weight [K, N] fp32 -> (packed [N, K/bs, bs*bits/8] uint8, scales [N, K/bs])."""
    from onnxruntime.capi import _pybind_state as ort_c

    weight = np.ascontiguousarray(weight, dtype=np.float32)
    k, n = weight.shape
    blocks = -(-k // block_size)
    if blocks * block_size != k:  # the kernel reads whole blocks: pad K with zeros
        weight = np.ascontiguousarray(np.pad(weight, ((0, blocks * block_size - k), (0, 0))))
    packed = np.zeros((n, blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, (blocks * bits + 7) // 8), np.uint8)  # written by the routine, unused when symmetric
    quantize = {4: ort_c.quantize_matmul_4bits, 8: ort_c.quantize_matmul_8bits}[bits]
    quantize(packed, weight, scales, zero_points, block_size, n, k, True)
    return packed, scales


def dequantize_blockwise(packed: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The weight [K, N] a symmetric MatMulNBits reads: (code - 2^(bits-1)) * scale per block (implicit zero point)."""
    n, blocks, _ = packed.shape
    if bits == 8:
        codes = packed.astype(np.int32)
    else:  # element j of a block: byte j * bits // 8, low bits first
        per_byte = 8 // bits
        shifts = (np.arange(per_byte) * bits).astype(np.uint8)
        codes = ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(n, blocks, -1).astype(np.int32)
    values = (codes - (1 << (bits - 1))).astype(np.float32) * scales[..., None]
    return np.ascontiguousarray(values.reshape(n, -1)[:, :k].T)


def ternary_rows(weight: np.ndarray) -> np.ndarray | None:
    """alpha per output column of weight [K, N] when every column is in {-alpha, 0, +alpha}; else None."""
    alpha = np.abs(weight).max(axis=0)
    return alpha.astype(np.float32) if bool(np.all((weight == 0) | (np.abs(weight) == alpha[None, :]))) else None


def pack_2bit(codes: np.ndarray, block_size: int) -> np.ndarray:
    """codes [K, N] in 0..3 -> MatMulNBits' layout [N, K/bs, bs/4]: element j of a block in byte j // 4, bits 2 * (j % 4)."""
    k, n = codes.shape
    c = codes.T.reshape(n, k // block_size, block_size // 4, 4).astype(np.uint8)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).astype(np.uint8)


@dataclass
class _Quantized:
    packed: ir.Value
    scales: ir.Value
    bits: int
    block_size: int
    k: int
    n: int
    source: np.ndarray  # the fp32 weight [K, N] it replaces


class QuantizeWeights(ir.passes.InPlacePass):
    """Every MatMul with a constant 2-D fp32 weight -> MatMulNBits (`bits` 4 or 8); a tied embedding -> its lm_head's blob.

    `exact_lowbit`: modules (graph provenance) whose weights are binary / ternary become exact 2-bit codes
    with blocks of `lowbit_block_size`; every other weight is quantized to `bits`. `cache` maps a weight
    tensor's identity to its quantized arrays, shared across the graphs of a build (clusters share tensors).
    """

    def __init__(self, bits: int, block_size: int, accuracy_level: int, exact_lowbit: frozenset[str] = frozenset(),
                 lowbit_block_size: int = 64, cache: dict | None = None, lm_head_bits: int | None = None) -> None:
        super().__init__()
        self.bits, self.block_size, self.accuracy_level = bits, block_size, accuracy_level
        self.lm_head_bits = lm_head_bits or bits  # the unembedding's bits (module "lm_head"; a tied embedding reads its blob)
        self.exact_lowbit, self.lowbit_block_size = exact_lowbit, lowbit_block_size
        self.cache = {} if cache is None else cache
        self.only: frozenset[str] | None = None  # quantize these modules only (None: every MatMul with a constant weight)
        self.quantized: list[str] = []  # modules lowered to `bits`
        self.exact_2bit: list[str] = []  # binary / ternary modules lowered to exact 2-bit codes
        self.tied_embedding: str | None = None

    def _arrays(self, weight: ir.Value, exact: bool, bits: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        tensor = weight.const_value
        key = (id(tensor), exact, bits)
        if key not in self.cache:
            array = tensor.numpy()
            alpha = ternary_rows(array) if exact else None
            if alpha is not None:
                k, n = array.shape
                blocks = -(-k // self.lowbit_block_size)
                codes = np.full((blocks * self.lowbit_block_size, n), 2, np.uint8)  # padding rows: code 2 reads 0
                codes[:k] = (np.sign(array) + 2).astype(np.uint8)
                self.cache[key] = (pack_2bit(codes, self.lowbit_block_size), np.repeat(alpha[:, None], blocks, axis=1), 2,
                                   self.lowbit_block_size, tensor)
            else:
                packed, scales = quantize_blockwise(array, bits, self.block_size)
                self.cache[key] = (packed, scales, bits, self.block_size, tensor)
        packed, scales, bits, block, _ = self.cache[key]  # the tensor is kept alive so its id stays its own
        return packed, scales, bits, block

    def _low_bit(self, module: str) -> bool:
        """A binary / ternary Linear of the plan, or q/k/v packed from them (pack_qkv names the pack qkv_proj)."""
        if module.endswith(".qkv_proj"):
            return all(module.removesuffix("qkv_proj") + f"{p}_proj" in self.exact_lowbit for p in "qkv")
        return module in self.exact_lowbit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_source: list[_Quantized] = []
        for node in list(graph):
            weight = node.inputs[1] if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") else None
            if weight is None or weight.const_value is None or weight.const_value.dtype != ir.DataType.FLOAT \
                    or len(weight.const_value.shape) != 2:
                continue
            module = module_of(node)
            if self.only is not None and not self._low_bit(module):
                continue
            packed, scales, bits, block = self._arrays(weight, self._low_bit(module), self.lm_head_bits if module == "lm_head" else self.bits)
            base = weight.name.removesuffix("_t")
            k, n = weight.const_value.shape
            quantized = _Quantized(new_initializer(graph, packed, f"{base}_Q{bits}"), new_initializer(graph, scales, f"{base}_scales"),
                                   bits, block, int(k), int(n), weight.const_value.numpy())
            by_source.append(quantized)
            nbits = ir.node("MatMulNBits", [node.inputs[0], quantized.packed, quantized.scales], domain=MS_DOMAIN,
                            attributes={"K": quantized.k, "N": quantized.n, "bits": bits, "block_size": block,
                                        "accuracy_level": self.accuracy_level},
                            name=f"{node.name}_Q{bits}")
            replace_node(graph, node, nbits, module)
            (self.exact_2bit if bits == 2 else self.quantized).append(module)
        self._tie_embedding(graph, by_source)
        if by_source:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(by_source))

    def _tie_embedding(self, graph: ir.Graph, quantized: list[_Quantized]) -> None:
        """The embedding Gather whose table is the transpose of a quantized MatMul's weight reads that MatMul's blob."""
        for node in list(graph):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.inputs[0].const_value is None:
                continue
            table = node.inputs[0].const_value.numpy()
            if table.ndim != 2 or table.dtype != np.float32 or node.attributes.get_int("axis", 0) != 0:
                continue
            for q in quantized:
                if (q.n, q.k) != table.shape or q.bits not in (4, 8) or not np.array_equal(q.source.T, table):
                    continue
                rows, width = table.shape
                row_bytes = q.packed.const_value.shape[1] * q.packed.const_value.shape[2]
                shape = new_initializer(graph, np.array([rows, row_bytes], np.int64), f"{module_of(node)}.tied_shape")
                reshape = ir.node("Reshape", [q.packed, shape], name=f"{node.name}/Reshape")
                gather = ir.node("GatherBlockQuantized", [reshape.outputs[0], node.inputs[1], q.scales], domain=MS_DOMAIN,
                                 attributes={"bits": q.bits, "block_size": q.block_size, "gather_axis": 0, "quantize_axis": 1},
                                 name=f"{node.name}/GatherBlockQuantized")
                added = [reshape, gather]
                out = gather.outputs[0]
                if row_bytes * 8 // q.bits != width:  # rows padded to whole blocks: cut the padding
                    bounds = [new_initializer(graph, np.array([x], np.int64), f"{module_of(node)}.tied_{i}")
                              for i, x in enumerate((0, width, -1))]
                    cut = ir.node("Slice", [out, *bounds], name=f"{node.name}/Slice")
                    added.append(cut)
                    out = cut.outputs[0]
                for new in added:
                    set_module(new, module_of(node))
                graph.insert_before(node, added)
                out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
                ir.convenience.replace_all_uses_with(node.outputs[0], out)
                graph.remove(node, safe=True)
                self.tied_embedding = module_of(node)
                return


def graph_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """module -> the [K, N] weight each MatMulNBits of `model` reads, dequantized (what a reference must compute with)."""
    weights = {}
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            bits, k = node.attributes.get_int("bits"), node.attributes.get_int("K")
            weights[module_of(node)] = dequantize_blockwise(node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy(), bits, k)
    return weights
