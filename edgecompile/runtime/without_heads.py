"""The same model without its multi-token-prediction heads: the baseline speculative decoding must beat.

A graph with extra heads also runs their layers (for their KV cache) and their unembedding on every plain
greedy step, so greedy decoding of that graph is slower than greedy decoding of the model as it was before
heads were added. That model is the graph cut back to what `logits` needs: the nodes `logits` depends on,
the KV inputs and outputs of the layers it runs, and nothing of the heads (the extra heads' layers, their
KV cache, `draft_count`). Derived in memory from the bundle's own file (nothing written), so the
comparison runs on exactly the shipped trunk and head 0.
"""

from __future__ import annotations

from pathlib import Path

import onnx


def without_extra_heads(path: Path) -> bytes:
    """The serialized graph at `path` (external data loaded from beside it) keeping only what `logits` needs."""
    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    needed: set[int] = set()
    reached: set[str] = set()
    stack = ["logits"]
    while stack:
        name = stack.pop()
        if name in reached:
            continue
        reached.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(i for i in node.input if i)
    # a layer that logits needs also returns its KV cache: keep those outputs (they feed the next step's past)
    outputs = [o for o in graph.output if o.name == "logits" or (o.name in producer and id(producer[o.name]) in needed)]
    reached.update(o.name for o in outputs)
    nodes = [n for n in graph.node if id(n) in needed]
    inputs = [i for i in graph.input if i.name in reached]
    initializers = [t for t in graph.initializer if t.name in reached]
    value_info = [v for v in graph.value_info if v.name in reached]
    for field, kept in ((graph.node, nodes), (graph.input, inputs), (graph.output, outputs),
                        (graph.initializer, initializers), (graph.value_info, value_info)):
        copies = [type(item)() for item in kept]
        for copy, item in zip(copies, kept):
            copy.CopyFrom(item)
        del field[:]
        field.extend(copies)
    return model.SerializeToString()
