"""Low-bit codes at rest: packed bytes plus a lookup table, expanded by a constant-foldable subgraph.

Schemes (LSB first, element i of a flat array in byte i // per_byte, field i % per_byte):
- `bin1`: 1 bit per code, bit 1 -> +1, bit 0 -> -1 (codes without zeros);
- `tern2`: 2 bits per code, field 0 -> 0, 1 -> +1, 2 -> -1 (ternary, or binary with exact zeros).

For a weight, `Cast(packed) -> Gather(LUT) -> Reshape [-> Slice] -> Reshape` has only constant
inputs, so onnxruntime folds it once at session creation (never use DequantizeLinear here: ORT
deliberately does not fold it) and the kernel sees a plain int8 initializer. The file keeps the
packed bytes. For embeddings, rows are packed separately so a gathered row decodes on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int
    values: tuple[int, ...]  # code of each field value

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    def lut(self, dtype: type = np.int8) -> np.ndarray:
        """[256, per_byte]: the codes a byte decodes to."""
        byte = np.arange(256, dtype=np.int64)[:, None]
        fields = (byte >> (np.arange(self.per_byte) * self.bits)) & ((1 << self.bits) - 1)
        table = np.array(self.values + (0,) * (2**self.bits - len(self.values)), dtype=np.int64)
        return table[fields].astype(dtype)


BIN1 = Scheme("bin1", 1, (-1, 1))
TERN2 = Scheme("tern2", 2, (0, 1, -1))


def choose_scheme(codes: np.ndarray) -> Scheme:
    return BIN1 if not np.any(codes == 0) else TERN2


def pack(codes: np.ndarray, scheme: Scheme) -> np.ndarray:
    """Flat codes in {-1, 0, 1} -> uint8 bytes (last byte zero-padded)."""
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    field_of = np.zeros(3, np.int64)  # indexed by code + 1
    for index, code in enumerate(scheme.values):
        field_of[code + 1] = index
    fields = field_of[flat + 1]
    pad = -flat.size % scheme.per_byte
    fields = np.concatenate([fields, np.zeros(pad, np.int64)]).reshape(-1, scheme.per_byte)
    packed = (fields << (np.arange(scheme.per_byte) * scheme.bits)).sum(axis=1)
    return packed.astype(np.uint8)


def unpack(packed: np.ndarray, scheme: Scheme, count: int) -> np.ndarray:
    return scheme.lut()[packed.astype(np.int64)].reshape(-1)[:count]


def pack_rows(codes: np.ndarray, scheme: Scheme) -> np.ndarray:
    """[rows, width] codes -> [rows, ceil(width / per_byte)] bytes, each row on its own bytes."""
    return np.stack([pack(row, scheme) for row in codes]) if len(codes) else np.zeros((0, 0), np.uint8)


def _const(tape: ir.tape.Tape, array: np.ndarray, name: str) -> ir.Value:
    return tape.initializer(ir.tensor(np.asarray(array, order="C"), name=name), name=name)


def expand_weight(tape: ir.tape.Tape, codes: np.ndarray, name: str) -> tuple[ir.Value, Scheme, int]:
    """Emit the packed codes [K, N] and the subgraph that rebuilds them as int8; returns (value, scheme, packed bytes)."""
    scheme = choose_scheme(codes)
    packed = pack(codes, scheme)
    count = int(codes.size)
    indices = tape.op("Cast", [_const(tape, packed, f"{name}.packed")], {"to": ir.DataType.INT32})
    fields = tape.op("Gather", [_const(tape, scheme.lut(), f"{name}.lut_{scheme.name}"), indices], {"axis": 0})
    flat = tape.op("Reshape", [fields, _const(tape, np.array([-1], np.int64), f"{name}.flat_shape")])
    if packed.size * scheme.per_byte != count:
        flat = tape.op("Slice", [flat, _const(tape, np.array([0], np.int64), f"{name}.start"),
                                 _const(tape, np.array([count], np.int64), f"{name}.stop")])
    weight = tape.op("Reshape", [flat, _const(tape, np.array(codes.shape, np.int64), f"{name}.shape")])
    return weight, scheme, int(packed.size)


def decode_rows(tape: ir.tape.Tape, codes: np.ndarray, alpha: np.ndarray, ids: ir.Value, name: str) -> tuple[ir.Value, Scheme, int]:
    """Embedding lookup of codes * alpha (row-packed), decoded per gathered token: [B, S, width] float32."""
    scheme = choose_scheme(codes)
    packed = pack_rows(codes, scheme)
    width = codes.shape[1]
    rows = tape.op("Gather", [_const(tape, packed, f"{name}.packed"), ids], {"axis": 0})
    indices = tape.op("Cast", [rows], {"to": ir.DataType.INT32})
    fields = tape.op("Gather", [_const(tape, scheme.lut(np.float32), f"{name}.lut_{scheme.name}"), indices], {"axis": 0})
    decoded = tape.op("Reshape", [fields, _const(tape, np.array([0, 0, -1], np.int64), f"{name}.row_shape")])
    if packed.shape[1] * scheme.per_byte != width:
        decoded = tape.op("Slice", [decoded, _const(tape, np.array([0], np.int64), f"{name}.start"),
                                    _const(tape, np.array([width], np.int64), f"{name}.stop"),
                                    _const(tape, np.array([-1], np.int64), f"{name}.axis")])
    scale = tape.op("Gather", [_const(tape, alpha.reshape(-1, 1).astype(np.float32), f"{name}.alpha"), ids], {"axis": 0})
    return tape.op("Mul", [decoded, scale]), scheme, int(packed.size + alpha.size * 4)
