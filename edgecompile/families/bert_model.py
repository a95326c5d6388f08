"""The BERT family's reference model: the student as a torch module with a fixed signature, and checkpoints
saved after transformers' `prune_heads`.

`StudentModule.forward(input_ids, attention_mask, token_type_ids)` returns a tuple in the order
of `output_names`. The same forward is exported to ONNX and evaluated as the parity reference.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgecompile.errors import InputError, input_error, one_line
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


# --- checkpoints saved after transformers' `prune_heads` ----------------------------------------
#
# transformers 4.x's `model.prune_heads({layer: [heads]})` slices those heads out of the layer's
# Q/K/V (output features) and attention output projection (input features) and records them in
# config.json as `pruned_heads` (layer -> heads, numbered among the original num_attention_heads;
# pruning again adds to the lists). transformers 5 no longer reads that key, so both majors load
# such a checkpoint the same way (load_student_module above): built from a config without it
# (`loading_config`), then `load_pruned_attention` gives the pruned layers the checkpoint's widths
# and tensors.


def parse_pruned_heads(raw: Mapping[Any, Sequence[int]] | None) -> dict[int, tuple[int, ...]]:
    """config's `pruned_heads` (JSON keys are strings) -> {layer: sorted original head ids}; validated first."""
    return {int(layer): tuple(sorted({int(h) for h in heads})) for layer, heads in (raw or {}).items() if heads}


def heads_present(num_layers: int, num_heads: int, pruned: Mapping[Any, Sequence[int]] | None) -> tuple[np.ndarray, ...]:
    """Per layer, the original ids of the heads the checkpoint holds, in the order its tensors hold them."""
    gone = parse_pruned_heads(pruned)
    return tuple(np.setdiff1d(np.arange(num_heads), gone.get(i, ())).astype(np.int64) for i in range(num_layers))


def check_pruned_heads(config_path: Path, config: Mapping[str, Any]) -> None:
    """`pruned_heads` must name layers and heads the config has, and leave every layer a head."""
    raw = config.get("pruned_heads")
    if raw is None or raw == {}:
        return
    what = "'pruned_heads'"
    if not isinstance(raw, dict):
        raise input_error(config_path, what, "an object {layer: [head, ...]}", type(raw).__name__)
    layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    for key, value in raw.items():
        layer = int(key) if isinstance(key, str) and key.isdigit() else None
        if layer is None or layer >= layers:
            raise input_error(config_path, f"{what} key {key!r}", f"a layer index 0..{layers - 1}", repr(key))
        if not isinstance(value, list) or any(isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < heads for h in value):
            raise input_error(config_path, f"{what}[{key!r}]", f"a list of head indices 0..{heads - 1}", repr(value)[:80])
        if len(set(value)) == heads:
            raise input_error(config_path, f"{what}[{key!r}]", f"at least one of the layer's {heads} heads left "
                              "(an attention without heads cannot run, in transformers either)", f"all {heads} pruned")


def loading_config(transformer_dir: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for a checkpoint saved after prune_heads: its config without
    `pruned_heads`, so every layer is built full width on both majors (4.x would prune at construction)."""
    if not parse_pruned_heads(config.get("pruned_heads")):
        return {}
    from transformers import BertConfig

    loaded = BertConfig.from_pretrained(str(transformer_dir), local_files_only=True)
    loaded.pruned_heads = {}
    return {"config": loaded}


def load_pruned_attention(model: nn.Module, bert: nn.Module, weights: Path, pruned_heads: Mapping[Any, Sequence[int]] | None) -> set[str]:
    """Give each layer in `pruned_heads` the checkpoint's narrower self-attention.

    The model was built with every layer at num_attention_heads (`loading_config`), so those layers'
    Q/K/V and attention output projection are full width (transformers reports them mismatched):
    each is replaced by a Linear of the checkpoint's shape holding the checkpoint's tensors, with the
    head bookkeeping transformers 4 keeps, and the config records `pruned_heads` again. Returns the
    names (as in `model.state_dict()`) now loaded. A tensor whose shape does not follow from
    `pruned_heads` is an error naming it.
    """
    from safetensors import safe_open

    pruned = parse_pruned_heads(pruned_heads)
    if not pruned:
        return set()
    config = bert.config
    size = config.hidden_size // config.num_attention_heads
    prefix = next(name + "." for name, module in model.named_modules() if module is bert) if model is not bert else ""
    loaded: set[str] = set()
    with safe_open(str(weights), framework="pt") as handle:
        stored = set(handle.keys())

        def checkpoint_tensor(name: str, shape: tuple[int, ...], why: str) -> torch.Tensor:
            key = next((k for k in (name, "bert." + name, name.removeprefix("bert.")) if k in stored), None)
            if key is None:
                raise input_error(weights, f"tensor {name}", "in the checkpoint", "missing")
            found = tuple(handle.get_slice(key).get_shape())
            if found != shape:
                raise input_error(weights, f"tensor {key}", f"shape {list(shape)} ({why})", list(found))
            loaded.add(name)
            return handle.get_tensor(key)

        for layer, gone in pruned.items():
            attention = bert.encoder.layer[layer].attention
            heads = config.num_attention_heads - len(gone)
            width, hidden = heads * size, config.hidden_size
            why = f"config.json's pruned_heads leaves {heads} of {config.num_attention_heads} heads in layer {layer}"
            path = f"{prefix}encoder.layer.{layer}.attention"
            with torch.no_grad():
                for name in ("query", "key", "value"):
                    linear = nn.Linear(hidden, width)
                    linear.weight.copy_(checkpoint_tensor(f"{path}.self.{name}.weight", (width, hidden), why))
                    linear.bias.copy_(checkpoint_tensor(f"{path}.self.{name}.bias", (width,), why))
                    setattr(attention.self, name, linear)
                output = nn.Linear(width, hidden)
                output.weight.copy_(checkpoint_tensor(f"{path}.output.dense.weight", (hidden, width), why))
                output.bias.copy_(attention.output.dense.bias)  # hidden wide: transformers loaded it as usual
                attention.output.dense = output
            attention.self.num_attention_heads = heads  # transformers 4's forward reshapes with these
            attention.self.all_head_size = width
            attention.pruned_heads = set(gone)
    config.pruned_heads = {layer: list(heads) for layer, heads in pruned.items()}
    return loaded
