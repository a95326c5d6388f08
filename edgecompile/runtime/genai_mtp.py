"""A decoder folder's multi-token-prediction heads, driven by onnxruntime-genai's own self-speculative generator.

onnxruntime-genai 0.18's `og.MtpGenerator(main_model, mtp_model, params)` (src/mtp_generator.cpp) composes two
genai models: the main decoder, which must return a hidden-state output named by the main config's
`model.mtp.main_hidden_states`, and an MTP head model whose decoder has a `hidden_states` input
(`model.decoder.inputs.hidden_states`). Per round it feeds the head (the main model's hidden row of the last committed
position, the pending token), takes the head's argmax as draft 1, feeds back the head's own `hidden_states_out`
(`model.mtp.outputs.hidden_states`) with that draft for drafts 2..K (K = `max_draft_tokens`), then verifies
[pending, drafts] in one main pass and keeps the prefix the main model's argmax confirms (greedy: tokens identical to
plain decoding).

edgecompile's heads are parallel (each extra head reads the trunk output of the same position), not a chained
module, so the two models are derived as follows, without copying a weight:

main/  <graph>.onnx: the bundle's graph plus one output `hidden_states` [batch, sequence, (n-1) * hidden]: every
       extra head's decoder-layer output (before the shared final norm) at every fed position, head 1 first. The
       layers already run at every position (their KV caches need them), so this costs a Concat. `logits` is
       returned in float16 as `logits_fp16`: genai 0.18's MtpGenerator takes its greedy argmax on CPU through a host
       Cast to float32, which throws "Cast - input and output types are the same" for float32 logits.
       genai_config.json: the bundle's, with decoder.hidden_size = (n-1) * hidden (the width genai allocates for the
       hand-off), decoder.outputs.logits = "logits_fp16" and model.mtp.
head/  mtp_head.onnx: no KV cache and no layer. Inputs input_ids [batch, sequence] and attention_mask
       [batch, total_sequence] (present because genai feeds them; unused), hidden_states [batch, sequence,
       (n-1) * hidden]. Outputs logits [batch, sequence, vocab] = unembedding(final norm(hidden_states[..., :hidden]))
       (head 1's draft) and hidden_states_out = hidden_states[..., hidden:] followed by zeros (so the next chained
       step reads head 2, then head 3, ...). genai_config.json: a 0-layer decoder with the hidden_states input.
Both folders hold a hard link (else a copy) of the bundle's weights.bin: onnxruntime refuses external data reached
through a symbolic link leaving the model's folder.

Use: main = og.Model("OUT/main"); head = og.Model("OUT/head"); params = og.GeneratorParams(main);
params.set_speculative_options(max_draft_tokens=K) with 1 <= K <= n-1; og.MtpGenerator(main, head, params).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

SHARED_FILES = ("weights.bin", "tokenizer.json", "tokenizer_config.json")


def _link(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_genai_mtp_folders(decoder_dir: Path, out: Path, graph: str = "dense") -> tuple[Path, Path]:
    """Write OUT/main and OUT/head (see the module docstring) from a decoder folder whose graph has extra heads."""
    decoder_dir, out = Path(decoder_dir), Path(out)
    config = json.loads((decoder_dir / "genai_config.json").read_text())
    model = onnx.load(str(decoder_dir / f"{graph}.onnx"), load_external_data=False)
    g = model.graph
    extra = sorted(int(o.name.split("_")[1]) for o in g.output if o.name.startswith("logits_"))
    if not extra:
        raise ValueError(f"{decoder_dir / graph}.onnx has no extra heads (no logits_1 output)")
    produced = {name for node in g.node for name in node.output}
    layers = [f"/extra_heads/{j - 1}/mlp_residual/Add/output_0" for j in extra]
    missing = [name for name in layers if name not in produced]
    if missing:
        raise ValueError(f"{decoder_dir / graph}.onnx: no extra-head layer output {missing[0]}")
    hidden = int(config["model"]["decoder"]["hidden_size"])
    vocab = int(config["model"]["vocab_size"])
    width = len(layers) * hidden
    main_dir, head_dir = out / "main", out / "head"
    main_dir.mkdir(parents=True, exist_ok=True)
    head_dir.mkdir(parents=True, exist_ok=True)

    # main: hidden_states at every position, logits in float16
    g.node.append(helper.make_node("Concat", layers, ["hidden_states"], name="/genai_mtp/hidden_states", axis=-1))
    g.node.append(helper.make_node("Cast", ["logits"], ["logits_fp16"], name="/genai_mtp/logits_fp16", to=TensorProto.FLOAT16))
    outputs = [o for o in g.output if o.name != "logits"]
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("logits_fp16", TensorProto.FLOAT16, ["batch_size", "sequence_length", vocab]),
                     *outputs,
                     helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch_size", "sequence_length", width])])
    onnx.save(model, str(main_dir / f"{graph}.onnx"))
    main_config = copy.deepcopy(config)
    decoder = main_config["model"]["decoder"]
    decoder["filename"] = f"{graph}.onnx"
    decoder["hidden_size"] = width
    decoder["outputs"]["logits"] = "logits_fp16"
    main_config["model"]["mtp"] = {"filename": "../head/mtp_head.onnx", "main_hidden_states": "hidden_states",
                                   "outputs": {"logits": "logits", "hidden_states": "hidden_states_out"}}
    (main_dir / "genai_config.json").write_text(json.dumps(main_config, indent=2))

    # head: the shared final norm and unembedding on head 1's rows; the other heads' rows shifted forward
    initializers = {t.name: t for t in g.initializer}
    # the next-token head's unembedding as the graph computes it: MatMul by lm_head.weight_t, or a tied fp32 table read
    # transposed (FusedMatMul transB, share_tied_embedding) or a 4-bit blob (MatMulNBits) with their extra inputs
    lm_head = next((n for n in g.node if "logits" in n.output), None)
    if lm_head is None or lm_head.op_type not in ("MatMul", "FusedMatMul", "MatMulNBits") \
            or not all(name in initializers for name in lm_head.input[1:] if name):
        raise ValueError(f"{decoder_dir / graph}.onnx: logits: expected a MatMul, FusedMatMul or MatMulNBits over initializers, "
                         f"found {lm_head.op_type if lm_head is not None else 'no node'}")
    weights = list(lm_head.input[1:])  # optional inputs keep their place ("" where absent)
    unembedding = helper.make_node(lm_head.op_type, ["normed", *weights], ["logits"], domain=lm_head.domain or None)
    unembedding.attribute.extend(copy.deepcopy(lm_head.attribute))
    epsilon = next(a.f for n in g.node if n.name.startswith("/model/norm/") for a in n.attribute if a.name == "epsilon")
    ints = lambda name, value: helper.make_tensor(name, TensorProto.INT64, [1], [value])  # noqa: E731
    nodes = [
        helper.make_node("Slice", ["hidden_states", "start", "hidden", "axis"], ["head_1"]),
        helper.make_node("SimplifiedLayerNormalization", ["head_1", "model.norm.weight"], ["normed"], axis=-1, epsilon=epsilon, stash_type=1),
        unembedding,
        helper.make_node("Slice", ["hidden_states", "hidden", "end", "axis"], ["later_heads"]),
        helper.make_node("Mul", ["head_1", "zero"], ["zeros"]),
        helper.make_node("Concat", ["later_heads", "zeros"], ["hidden_states_out"], axis=-1),
    ]
    head_graph = helper.make_graph(
        nodes, "genai_mtp_head",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
         helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch_size", "sequence_length", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab]),
         helper.make_tensor_value_info("hidden_states_out", TensorProto.FLOAT, ["batch_size", "sequence_length", width])],
        [copy.deepcopy(initializers["model.norm.weight"]), *(copy.deepcopy(initializers[name]) for name in weights if name),
         ints("start", 0), ints("hidden", hidden), ints("end", width), ints("axis", -1),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    head = helper.make_model(head_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    onnx.save(head, str(head_dir / "mtp_head.onnx"))
    head_config = copy.deepcopy(config)
    decoder = head_config["model"]["decoder"]
    decoder.update(filename="mtp_head.onnx", hidden_size=width, num_hidden_layers=0)
    decoder["inputs"] = {"input_ids": "input_ids", "attention_mask": "attention_mask", "hidden_states": "hidden_states",
                         "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    decoder["outputs"] = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    (head_dir / "genai_config.json").write_text(json.dumps(head_config, indent=2))

    for name in SHARED_FILES:
        if (decoder_dir / name).exists():
            for folder in (main_dir, head_dir):
                _link(decoder_dir / name, folder / name)
    return main_dir, head_dir


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m edgecompile.runtime.genai_mtp DECODER_DIR OUT [GRAPH]")
    print(*write_genai_mtp_folders(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]))
