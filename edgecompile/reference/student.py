"""The student as a torch module with a fixed signature, per family.

`StudentModule.forward(input_ids, attention_mask, token_type_ids)` returns a tuple in the order
of `output_names`. The same forward is exported to ONNX and evaluated as the parity reference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from edgecompile.errors import InputError, one_line
from edgecompile.inputs.compat import transformers_major
from edgecompile.inputs.student import StudentSpec
from edgecompile.reference.pooling import l2_normalize, pool

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# StudentModule keeps the Hugging Face model as `.model`, so exported node scopes (and the graph
# module paths the passes use) are "model." + the Hugging Face module name.
GRAPH_PREFIX = "model."


def bert_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [B, S] 0/1 padding mask as BertModel should receive it, the same on both transformers majors.

    4.57 turns it into the additive [B, 1, 1, S] mask `(1 - m) * finfo.min` itself. 5 would build a
    [B, 1, S, S] one through masking_utils (Range / And / Where / Gather in the export) but takes a
    prepared 4D mask as is, so it gets 4.57's: the same values, hence bitwise the same outputs (a
    test checks that against 5's own path), and one compact graph on both majors.
    """
    if transformers_major() < 5:
        return attention_mask
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


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
        model_mask = bert_attention_mask(attention_mask, self.bert.dtype)
        # return_dict: a config saying return_dict=false or torchscript=true would make outputs tuples
        out = self.model(input_ids=input_ids, attention_mask=model_mask, token_type_ids=token_type_ids, return_dict=True)
        if self.spec.family == "bert-sequence-classification":
            return (out.logits,)
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


def _load_kwargs() -> dict:
    """from_pretrained options meaning the same on transformers 4.57 and 5: eager attention (the
    exported arithmetic), fp32 (5 defaults to the checkpoint's dtype), no download, and the loading
    report back instead of 5's raise-on-mismatch, so a bad tensor is named in one line."""
    return dict(
        attn_implementation="eager", dtype=torch.float32, output_loading_info=True, local_files_only=True,
        ignore_mismatched_sizes=True,
    )


def _checkpoint_shape(weights: Path, name: str) -> list[int] | str:
    """A tensor's shape as stored (the name with or without the base model's `bert.` prefix)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        names = set(handle.keys())
        for candidate in (name, f"bert.{name}", name.removeprefix("bert.")):
            if candidate in names:
                return list(handle.get_slice(candidate).get_shape())
    return "another shape"


def _loading_report(info: dict, model: nn.Module, weights: Path) -> tuple[list[str], list[tuple[str, object, list[int]]]]:
    """Missing keys and (name, checkpoint shape, model shape) mismatches, sorted. transformers 5 reports
    sets of (name, checkpoint shape, model shape); 4.57 lists only the names."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids"))
    model_shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    mismatched = []
    for entry in info.get("mismatched_keys", ()):
        if isinstance(entry, str):
            mismatched.append((entry, _checkpoint_shape(weights, entry), model_shapes.get(entry, [])))
        else:
            name, found, expected = entry
            mismatched.append((str(name), list(found), list(expected)))
    return missing, sorted(mismatched, key=lambda m: m[0])


def load_student_module(spec: StudentSpec) -> StudentModule:
    """Load weights (eager attention, fp32, eval mode). Missing weights are an input error, never random init."""
    import transformers
    from transformers import BertForSequenceClassification, BertModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # transformers 5 draws one per load on stderr
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from edgecompile.families.bert import load_pruned_attention, loading_config

    weights = spec.transformer_dir / "model.safetensors"
    kwargs = dict(_load_kwargs(), **loading_config(spec.transformer_dir, spec.config))  # a prune_heads checkpoint: full width first
    try:
        if spec.family == "bert-sequence-classification":
            model, info = BertForSequenceClassification.from_pretrained(str(spec.transformer_dir), **kwargs)
        else:
            model, info = BertModel.from_pretrained(str(spec.transformer_dir), add_pooling_layer=spec.has_pooler, **kwargs)
    except Exception as exc:
        raise InputError(f"{weights}: cannot load into {spec.architecture} ({one_line(exc)})") from None
    bert = model.bert if spec.family == "bert-sequence-classification" else model
    narrowed = load_pruned_attention(model, bert, weights, spec.config.get("pruned_heads"))
    missing, mismatched = _loading_report(info, model, weights)
    mismatched = [m for m in mismatched if m[0] not in narrowed]
    if mismatched:
        name, found, expected = mismatched[0]
        raise InputError(f"{weights}: tensor {name}: expected shape {expected}, found {found}")
    if missing:
        raise InputError(
            f"{weights}: tensor {missing[0]}: expected in the checkpoint, found missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    check_no_unexpected_tensors(spec, model, info)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{weights}: tensor {name}: expected finite values, found NaN or Inf")
    model.eval()
    return StudentModule(spec, model).eval()
