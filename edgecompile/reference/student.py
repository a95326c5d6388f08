"""The student as a torch module with a fixed signature, per family.

`StudentModule.forward(input_ids, attention_mask, token_type_ids)` returns a tuple in the order
of `output_names`. The same forward is exported to ONNX and evaluated as the parity reference.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from edgecompile.errors import InputError, one_line
from edgecompile.inputs.student import StudentSpec
from edgecompile.reference.pooling import l2_normalize, pool

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# StudentModule keeps the Hugging Face model as `.model`, so exported node scopes (and the graph
# module paths the passes use) are "model." + the Hugging Face module name.
GRAPH_PREFIX = "model."


class StudentModule(nn.Module):
    def __init__(self, spec: StudentSpec, model: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        if spec.family == "bert-sequence-classification":
            self.output_names: tuple[str, ...] = ("logits",)
        elif spec.family == "sentence-transformers":
            self.output_names = ("token_embeddings", "sentence_embedding")
        elif spec.has_pooler:
            self.output_names = ("last_hidden_state", "pooler_output")
        else:
            self.output_names = ("last_hidden_state",)

    @property
    def bert(self) -> nn.Module:
        """The BertModel inside, whatever the family."""
        return self.model.bert if self.spec.family == "bert-sequence-classification" else self.model

    @property
    def encoder_path(self) -> str:
        """Dotted module path of the BertEncoder; exported node scopes start with it."""
        return "model.bert.encoder" if self.spec.family == "bert-sequence-classification" else "model.encoder"

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        if self.spec.family == "bert-sequence-classification":
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return (out.logits,)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        hidden = out.last_hidden_state
        if self.spec.family == "sentence-transformers":
            sentence = pool(hidden, attention_mask, self.spec.pooling_mode or "mean")
            if self.spec.normalize:
                sentence = l2_normalize(sentence)
            return hidden, sentence
        if self.spec.has_pooler:
            return hidden, out.pooler_output
        return (hidden,)


def check_no_unexpected_tensors(spec: StudentSpec, model: nn.Module, info: dict) -> None:
    """Every tensor of the checkpoint must be a weight of the model its config.json describes.

    A checkpoint with more layers than its config (or a head the architecture lacks) would
    otherwise compile silently without them. Buffers transformers derives itself (position_ids,
    token_type_ids) are not weights: older checkpoints store them, and loading ignores them. A
    sentence-transformers Transformer is saved with the pooler its forward never uses.
    """
    buffers = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()}
    unused = ("pooler.",) if spec.family == "sentence-transformers" else ()
    unexpected = sorted(k for k in info.get("unexpected_keys", [])
                        if k.rsplit(".", 1)[-1] not in buffers and not k.startswith(unused))
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else "")
        raise InputError(
            f"{spec.transformer_dir / 'model.safetensors'}: tensors: expected only those of {spec.architecture} with "
            f"config.json's {spec.num_layers} layers, found {len(unexpected)} unexpected: {shown}"
        )


def load_student_module(spec: StudentSpec) -> StudentModule:
    """Load weights (eager attention, eval mode). Missing weights are an input error, never random init."""
    import transformers
    from transformers import BertForSequenceClassification, BertModel

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    kwargs = dict(attn_implementation="eager", output_loading_info=True, local_files_only=True)
    try:
        if spec.family == "bert-sequence-classification":
            model, info = BertForSequenceClassification.from_pretrained(str(spec.transformer_dir), **kwargs)
        else:
            model, info = BertModel.from_pretrained(
                str(spec.transformer_dir), add_pooling_layer=spec.has_pooler, **kwargs
            )
    except Exception as exc:
        raise InputError(f"{spec.transformer_dir / 'model.safetensors'}: cannot load into {spec.architecture} ({one_line(exc)})") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    mismatched = info.get("mismatched_keys", [])
    if mismatched:
        name, found, expected = mismatched[0]
        raise InputError(
            f"{spec.transformer_dir / 'model.safetensors'}: tensor {name}: expected shape {list(expected)}, found {list(found)}"
        )
    if missing:
        raise InputError(
            f"{spec.transformer_dir / 'model.safetensors'}: tensor {missing[0]}: expected in the checkpoint, found missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    check_no_unexpected_tensors(spec, model, info)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{spec.transformer_dir / 'model.safetensors'}: tensor {name}: expected finite values, found NaN or Inf")
    model.eval()
    return StudentModule(spec, model).eval()
