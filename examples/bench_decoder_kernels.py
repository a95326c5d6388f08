"""Which onnxruntime kernel runs a binary (W1) Linear of a decoder: the measurement behind the choice.

One Linear of binary weights (codes ±1 times a per-output-channel alpha, the XTC contract) at the decoder
benchmark's shapes, as one-node graphs timed round-robin on one thread, at decode (M = 1 token) and
prefill (M = 64 tokens):

  fp32 MatMul                            the float model
  W1A8 MatMulIntegerToFloat (per-token)  what edgecompile emits: the exact XTC contract, 8-bit activations
                                         quantized per token (scale max|x| / 128, uint8 around 128), int8 codes
  DynamicQuantizeMatMul (per-tensor A8)  onnxruntime's quantize_dynamic kernel: one scale per tensor
  MatMulNBits 2-bit, accuracy level 4    codes as 2-bit weights with explicit zero points (exact), but
                                         activations quantized to int8 per block of 32 by the kernel
  MatMulNBits 2-bit, accuracy level 0    the same with float activations (exact W1A32)

and each one's error against `x @ W` in float64 (relative to max |x @ W|).

    python examples/bench_decoder_kernels.py [--runs 25]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags

SHAPES = ((512, 1408), (1408, 512), (512, 32000))  # gate/up, down, an lm_head-sized projection (K, N)
BLOCK = 32


def session(nodes: list, initializers: list, k: int, n: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def per_token_w1a8(codes: np.ndarray, alpha: np.ndarray) -> tuple[list, list]:
    """uint8 per-token quantizer (zero point 128) -> MatMulIntegerToFloat over int8 codes, scaled by alpha."""
    const = lambda value, name, dtype=np.float32: numpy_helper.from_array(np.array(value, dtype), name)  # noqa: E731
    # the nodes edgecompile's lowering emits (passes/lower_lowbit_linears.py): x is [M, K] here, so the
    # per-token scale [M, 1] only needs flattening to QuantizeLinear's axis-0 scale [M]
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("ReduceMax", ["a", "flat"], ["m"], keepdims=1),
             helper.make_node("Div", ["m", "c"], ["s0"]), helper.make_node("Max", ["s0", "tiny"], ["s"]),
             helper.make_node("Reshape", ["s", "flat"], ["per_token"]), helper.make_node("Shape", ["per_token"], ["rows"]),
             helper.make_node("Expand", ["zp", "rows"], ["zps"]),
             helper.make_node("QuantizeLinear", ["x", "per_token", "zps"], ["q"], axis=0),
             helper.make_node("MatMulIntegerToFloat", ["q", "W", "s", "alpha", "zp"], ["y"], domain="com.microsoft")]
    initializers = [const([-1], "flat", np.int64), const(128.0, "c"), const(np.finfo(np.float32).smallest_subnormal, "tiny"),
                    const(128, "zp", np.uint8), numpy_helper.from_array(codes, "W"), numpy_helper.from_array(alpha, "alpha")]
    return nodes, initializers


def nbits_2bit(codes: np.ndarray, alpha: np.ndarray, level: int) -> tuple[list, list]:
    """MatMulNBits with 2-bit weights: u = code + 1 in {0, 2}, zero point 1, scale alpha per block."""
    k, n = codes.shape
    blocks = k // BLOCK
    u = (codes.T + 1).astype(np.uint8).reshape(n, blocks, BLOCK)
    packed = np.zeros((n, blocks, BLOCK // 4), np.uint8)
    for i in range(4):
        packed |= (u[:, :, i::4] << (2 * i)).astype(np.uint8)
    zero_points = np.zeros((n, (blocks * 2 + 7) // 8), np.uint8)
    for b in range(blocks):
        zero_points[:, (b * 2) // 8] |= np.uint8(1 << ((b * 2) % 8))
    scales = np.repeat(alpha[:, None], blocks, axis=1).reshape(-1).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=k, N=n, bits=2,
                            block_size=BLOCK, accuracy_level=level)
    return [node], [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S"),
                    numpy_helper.from_array(zero_points.reshape(-1), "Z")]


def kernels(k: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, ort.InferenceSession]]:
    codes = np.where(rng.random((k, n)) > 0.5, 1, -1).astype(np.int8)
    alpha = (rng.random(n) * 0.02 + 0.01).astype(np.float32)
    weight = codes.astype(np.float32) * alpha
    sessions = {"fp32 MatMul": session([helper.make_node("MatMul", ["x", "W"], ["y"])], [numpy_helper.from_array(weight, "W")], k, n),
                "W1A8 MatMulIntegerToFloat, per-token (edgecompile)": session(*per_token_w1a8(codes, alpha), k, n),
                "DynamicQuantizeMatMul, per-tensor A8": session(
                    [helper.make_node("DynamicQuantizeMatMul", ["x", "W", "alpha"], ["y"], domain="com.microsoft")],
                    [numpy_helper.from_array(codes, "W"), numpy_helper.from_array(alpha, "alpha")], k, n),
                "MatMulNBits 2-bit, accuracy level 4 (int8 per block of 32)": session(*nbits_2bit(codes, alpha, 4), k, n),
                "MatMulNBits 2-bit, accuracy level 0 (float activations)": session(*nbits_2bit(codes, alpha, 0), k, n)}
    return weight, sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=25, help="round-robin rounds per shape [default: %(default)s]")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, CPU EP, 1 thread, {args.runs} round-robin rounds, medians; "
          "error = max |y - x @ W| / max |x @ W| (float64 reference)")
    for k, n in SHAPES:
        weight, sessions = kernels(k, n, rng)
        for m in (1, 64):
            x = rng.standard_normal((m, k)).astype(np.float32)
            exact = x.astype(np.float64) @ weight.astype(np.float64)
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for s in sessions.values():
                s.run(None, {"x": x})
            for _ in range(args.runs):
                for name, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, {"x": x})
                    times[name].append(time.perf_counter() - start)
            base = np.median(times["fp32 MatMul"])
            print(f"\nK = {k}, N = {n}, M = {m} ({'decode' if m == 1 else 'prefill'})")
            print("| kernel | p50 ms | speed vs fp32 | error |")
            print("|---|---:|---:|---:|")
            for name, s in sessions.items():
                error = np.abs(s.run(None, {"x": x})[0] - exact).max() / np.abs(exact).max()
                print(f"| {name} | {np.median(times[name]) * 1e3:.3f} | {base / np.median(times[name]):.2f}x | {error:.1e} |")
    print(f"\n{cpu_flags()}")

if __name__ == "__main__":
    main()
