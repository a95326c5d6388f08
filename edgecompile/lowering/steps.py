"""Per-target lowering: target-independent graphs in, the graphs a target's files hold out.

A target lists its steps by name (`[lowering] steps = [...]` in its TOML); STEPS maps each name
to a function (model, context) -> model. Nothing here branches on a target's name. The inputs are
never modified: every target works on clones sharing the export's tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from edgecompile.inputs.lowbit import LowBitPlan
from edgecompile.passes.lower_lowbit_linears import ActivationQuant


@dataclass(frozen=True)
class GraphLowBit:
    """The low-bit plan in graph terms (module provenance paths)."""

    linears: dict[str, ActivationQuant] = field(default_factory=dict)
    embedding: str | None = None

    @property
    def empty(self) -> bool:
        return not self.linears and self.embedding is None

    @classmethod
    def from_plan(cls, plan: LowBitPlan, prefix: str) -> "GraphLowBit":
        """`prefix`: what the graph's module paths put before the Hugging Face names (the family's graph_prefix)."""
        return cls(
            {prefix + p.module: ActivationQuant(p.activation, p.static_scale) for p in plan.linears},
            None if plan.embedding is None else prefix + plan.embedding.module,
        )


@dataclass
class LoweringContext:
    target: Any  # targets.Target
    graph: str  # "router", "dense", "cluster_<k>"
    lowbit: GraphLowBit
    calibration: list[dict[str, np.ndarray]]  # target-shaped feeds for this graph
    report: dict[str, Any] = field(default_factory=dict)  # what the steps did, for the manifest
    shared: dict[str, Any] = field(default_factory=dict)  # state the graphs of one target share (quantized tensors)

    @property
    def is_student(self) -> bool:
        return self.graph != "router"


def lower_lowbit_integer(model: ir.Model, ctx: LoweringContext) -> ir.Model:
    """Binary / ternary Linears -> QuantizeLinear + MatMulIntegerToFloat; packed word embeddings."""
    from edgecompile.passes.lower_lowbit_embedding import LowerLowBitEmbedding
    from edgecompile.passes.lower_lowbit_linears import LowerLowBitLinears

    if not ctx.is_student or ctx.lowbit.empty:
        return model
    if ctx.target.linear_weights.lowbit_kernel == "nbits":  # the Linears go to exact 2-bit MatMulNBits (quantize_weights)
        return model
    linears = LowerLowBitLinears(ctx.lowbit.linears)
    passes: list[ir.passes.PassBase] = [linears]
    embedding = LowerLowBitEmbedding(ctx.lowbit.embedding) if ctx.lowbit.embedding else None
    if embedding:
        passes.append(embedding)
    ir.passes.PassManager(passes + [RemoveUnusedNodesPass(), RemoveUnusedOpsetsPass(), NameFixPass()])(model)
    lowered = linears.lowered + linears.float_activations
    packed = sum(g["packed_bytes"] for g in lowered)
    fp32 = sum(g["fp32_bytes"] for g in lowered)
    ctx.report["lowbit"] = {
        "linear_groups": linears.lowered,  # integer kernels (quantized activations)
        **({"float_activation_linears": linears.float_activations} if linears.float_activations else {}),
        "linear_weight_bytes": {"packed": packed, "fp32": fp32, "ratio": round(fp32 / packed, 2) if packed else None},
        "word_embeddings": embedding.lowered if embedding else None,
    }
    return model


def lowbit_weights_to_dequantize(model: ir.Model, ctx: LoweringContext) -> ir.Model:
    """Binary / ternary weights as exact int8 codes behind DequantizeLinear (QDQ targets)."""
    from edgecompile.passes.lowbit_weights_to_dequantize import CODE_SCALE, LowBitWeightsToDequantize

    if not ctx.is_student or ctx.lowbit.empty:
        return model
    converter = LowBitWeightsToDequantize(list(ctx.lowbit.linears))
    ir.passes.PassManager([converter, RemoveUnusedNodesPass()])(model)
    ctx.report["lowbit"] = {
        "exact_codes_as": f"int8 codes x {CODE_SCALE} with per-channel scale alpha / {CODE_SCALE}",
        "modules": converter.converted,
        **({"word_embeddings": "quantized by the QDQ recipe, not exact codes (HTP could not finalize the exact form)"}
           if ctx.lowbit.embedding else {}),
    }
    return model


def fuse_attention(model: ir.Model, ctx: LoweringContext) -> ir.Model:
    """Eager attention cores -> the ONNX Attention op (opset 23); measured 7-10% faster on the CPU EP."""
    from edgecompile.passes.fuse_attention import FuseAttention

    fuse = FuseAttention()
    ir.passes.PassManager([fuse, RemoveUnusedNodesPass()])(model)
    ctx.report["fused_attention"] = fuse.fused
    return model


def pack_qkv(model: ir.Model, ctx: LoweringContext) -> ir.Model:
    """Decoders: q/k/v projections -> one MatMul feeding GroupQueryAttention packed (as onnxruntime-genai's builder)."""
    from edgecompile.passes.pack_qkv import PackQkv

    pack = PackQkv()
    ir.passes.PassManager([pack, RemoveUnusedNodesPass()])(model)
    if pack.packed:
        ctx.report["packed_qkv"] = len(pack.packed)
    return model


def fuse_skip_norm(model: ir.Model, ctx: LoweringContext) -> ir.Model:
    """Decoders: residual Add + RMSNorm -> SkipSimplifiedLayerNormalization (onnxruntime leaves this pair unfused)."""
    from edgecompile.passes.fuse_skip_norm import FuseSkipNorm

    fuse = FuseSkipNorm()
    ir.passes.PassManager([fuse, RemoveUnusedNodesPass()])(model)
    if fuse.fused:
        ctx.report["fused_skip_norm"] = fuse.fused
    return model


def quantize_weights(model: ir.Model, ctx: LoweringContext) -> ir.Model:
    """Decoders: Linear weights block-quantized (MatMulNBits) after pruning, as the target's [weights] table says;
    binary / ternary Linears as exact 2-bit codes with `lowbit_kernel = "nbits"`. A no-op for fp32 targets."""
    from edgecompile.passes.quantize_weights import QuantizeWeights

    weights = ctx.target.linear_weights
    exact = frozenset(ctx.lowbit.linears) if weights.lowbit_kernel == "nbits" else frozenset()
    if not ctx.is_student or not (weights.bits or exact):
        return model
    quantize = QuantizeWeights(weights.bits or 4, weights.block_size, weights.accuracy_level, exact, weights.lowbit_block_size,
                               ctx.shared.setdefault("quantized", {}), weights.lm_head_bits)
    if weights.bits is None:  # only the low-bit Linears: every other MatMul stays fp32
        quantize.only = exact  # (membership is quantize._low_bit's, packed q/k/v included)
    ir.passes.PassManager([quantize, RemoveUnusedNodesPass()])(model)
    ctx.report["weights"] = {
        "format": weights.format if weights.bits else "fp32", "kernel": "MatMulNBits", "block_size": weights.block_size,
        "accuracy_level": weights.accuracy_level, "symmetric": True, "quantizer": "onnxruntime quantize_matmul_nbits (RTN)",
        "quantized": len(quantize.quantized), "exact_2bit": len(quantize.exact_2bit),
        **({"lut_gemm": True} if weights.lut_gemm else {}), "tied_embedding": quantize.tied_embedding,
        **({"lm_head_format": weights.lm_head_format} if weights.bits and weights.lm_head_bits != weights.bits else {}),
    }
    return model


def share_tied_embedding(model: ir.Model, ctx: LoweringContext) -> ir.Model:
    """Decoders with tied fp32 embeddings: the table stored once, the lm_head a FusedMatMul (transB) reading it."""
    from edgecompile.passes.share_tied_embedding import ShareTiedEmbedding

    if not ctx.is_student:
        return model
    share = ShareTiedEmbedding()
    ir.passes.PassManager([share, RemoveUnusedNodesPass()])(model)
    if share.shared:
        ctx.report["tied_embedding_shared"] = share.shared
    return model


def fix_shapes(model: ir.Model, ctx: LoweringContext) -> ir.Model:
    from edgecompile.passes.fix_shapes import FixBatchAndSequence

    FixBatchAndSequence(ctx.target.batch, ctx.target.sequence)(model)
    ctx.report["shapes"] = [ctx.target.batch, ctx.target.sequence]
    return model


def qnn_preprocess(model: ir.Model, ctx: LoweringContext) -> ir.Model:
    from edgecompile.lowering.qdq import qnn_preprocess as run

    return run(model)


def clamp_attention_mask(model: ir.Model, ctx: LoweringContext) -> ir.Model:
    from edgecompile.passes.clamp_huge_constants import ClampHugeConstants

    clamp = ClampHugeConstants()
    clamp(model)
    ctx.report["clamped_constants"] = len(clamp.replaced)
    return model


def quantize_qdq(model: ir.Model, ctx: LoweringContext) -> ir.Model:
    from edgecompile.lowering.qdq import quantize_static_qdq

    t = ctx.target
    model = quantize_static_qdq(model, ctx.calibration, t.activations, t.weights, t.matmul_weights)
    ctx.report["qdq"] = {"activations": t.activations, "weights": t.weights, "matmul_weights": t.matmul_weights,
                         "calibration": f"{t.calibration} over {len(ctx.calibration)} samples"}
    return model


STEPS: dict[str, Callable[[ir.Model, LoweringContext], ir.Model]] = {
    "lower_lowbit_integer": lower_lowbit_integer,
    "fuse_attention": fuse_attention,
    "pack_qkv": pack_qkv,
    "fuse_skip_norm": fuse_skip_norm,
    "quantize_weights": quantize_weights,
    "share_tied_embedding": share_tied_embedding,
    "lowbit_weights_to_dequantize": lowbit_weights_to_dequantize,
    "fix_shapes": fix_shapes,
    "qnn_preprocess": qnn_preprocess,
    "clamp_attention_mask": clamp_attention_mask,
    "quantize_qdq": quantize_qdq,
}


def lower_for_target(
    graphs: dict[str, ir.Model],
    target: Any,
    lowbit: GraphLowBit | None = None,
    calibration: dict[str, list[dict[str, np.ndarray]]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, ir.Model], dict[str, dict[str, Any]]]:
    """Returns the graphs to write and, per graph, what the steps did.

    `calibration`: target-shaped feeds keyed "student" / "router" (needed by quantize_qdq).
    """
    lowered, reports = {}, {}
    shared: dict[str, Any] = {}
    for name, graph in graphs.items():
        ctx = LoweringContext(target, name, lowbit or GraphLowBit(), (calibration or {}).get("router" if name == "router" else "student", []),
                              shared=shared)
        model = graph.clone()
        for step in target.steps:
            if progress:
                progress(f"{name}: {step}")
            model = STEPS[step](model, ctx)
        lowered[name] = model
        reports[name] = ctx.report
    return lowered, reports
