"""What a cluster keeps, its parameter count and MACs per token.

MACs per token are counted for one sequence of `sequence` tokens and divided by `sequence`:
weight projections (Q/K/V, attention output, FFN) per token, attention scores and context
(2 * sequence * kept_heads * head_size per layer per token), plus pooler / classifier once per
sequence. `linear_macs_from_graph` counts the projections actually present in a graph, so tests
can check the rewrite against this structural count. Heads a checkpoint already lacks (saved after
`prune_heads`) are never counted as kept, whatever their gate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from edgecompile.inputs.masks import ClusterMasks
from edgecompile.inputs.student import StudentSpec
from edgecompile.numerics import kept_units


def kept_structure(spec: StudentSpec, masks: ClusterMasks) -> dict[str, Any]:
    """Per layer: blocks on, heads kept (original ids), neurons kept, soft gates; and the totals."""
    from edgecompile.families.bert import heads_present

    present = heads_present(spec.num_layers, spec.num_heads, spec.config.get("pruned_heads"))
    layers = []
    for i in range(spec.num_layers):
        attention_on = masks.blocks[i, 0] != 0
        ffn_on = masks.blocks[i, 1] != 0
        head_gates = masks.heads[i][present[i]]
        heads = [int(h) for h in present[i][kept_units(head_gates)]] if attention_on else []
        neurons = len(kept_units(masks.neurons[i])) if ffn_on else 0
        soft = {
            "attention_scale": float(masks.blocks[i, 0]) if attention_on and masks.blocks[i, 0] != 1 else None,
            "ffn_scale": float(masks.blocks[i, 1]) if ffn_on and masks.blocks[i, 1] != 1 else None,
            "soft_heads": int(np.count_nonzero((head_gates != 0) & (head_gates != 1))) if attention_on else 0,
            "soft_neurons": int(np.count_nonzero((masks.neurons[i] != 0) & (masks.neurons[i] != 1))) if ffn_on else 0,
        }
        layers.append(
            {
                "layer": i,
                # A branch "kept" with zero heads / neurons reduces to its output bias.
                "attention": bool(attention_on),
                "ffn": bool(ffn_on),
                "heads": heads,
                "neurons": neurons,
                **{k: v for k, v in soft.items() if v},
            }
        )
    return {
        "layers": layers,
        "attention_blocks_kept": sum(layer["attention"] for layer in layers),
        "ffn_blocks_kept": sum(layer["ffn"] for layer in layers),
        "heads_kept": sum(len(layer["heads"]) for layer in layers),
        "neurons_kept": sum(layer["neurons"] for layer in layers),
        "layers_without_compute": [layer["layer"] for layer in layers if not layer["heads"] and not layer["neurons"]],
    }


def macs_per_token(spec: StudentSpec, kept: dict[str, Any], sequence: int = 128) -> dict[str, int]:
    h, d = spec.hidden_size, spec.head_size
    linear = attention = 0
    for layer in kept["layers"]:
        width = len(layer["heads"]) * d
        linear += 4 * h * width + 2 * h * layer["neurons"]
        attention += 2 * sequence * width
    per_sequence = 0
    if spec.family == "bert-sequence-classification":
        per_sequence = h * h + h * spec.num_labels
    elif spec.has_pooler:
        per_sequence = h * h
    total = linear + attention + per_sequence // sequence
    return {"sequence": sequence, "linear": linear, "attention": attention, "total": total}


def linear_macs_from_graph(model: ir.Model) -> int:
    """Sum of K*N over MatMuls whose weight is a rank-2 initializer (per-token projections)."""
    total = 0
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].is_initializer():
            shape = node.inputs[1].const_value.shape
            if len(shape) == 2:
                total += int(shape[0]) * int(shape[1])
    return total


def parameter_count(model: ir.Model) -> int:
    """Float values stored in the graph's initializers (weights, biases, norms, embeddings)."""
    count = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            count += int(np.prod(tensor.shape.numpy(), dtype=np.int64))
    return count
