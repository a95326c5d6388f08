"""Which config.json fields transformers itself reads for a family, so a family's rules can tell a field whose
semantics edgecompile must implement (or refuse) from bookkeeping that no model reads.

Tools write fields no config class defines (transformers' own GGUF loader writes `_model_name_or_path` and
`unk_token_id`); transformers stores them and its model never reads them, so neither does the graph: they
are accepted and listed (the manifest's `student.config_fields_ignored`). Some fields no family class
defines are read by transformers' shared code through getattr (caches, masks, loading): those are never
bookkeeping (READ_BY_SHARED_CODE).
"""

from __future__ import annotations

import dataclasses
import inspect
from functools import cache
from typing import Any


# Read by transformers' shared code for any family, whether its config class defines them or not (transformers 5:
# cache_utils, masking_utils, modeling_utils): a Llama config.json with `sliding_window` gets sliding-window KV caches
# in transformers' generate, `is_causal: false` a bidirectional mask.
READ_BY_SHARED_CODE = frozenset({
    "sliding_window", "attention_chunk_size", "layer_types", "kv_sharing_modes", "is_causal", "quantization_config",
    "qk_head_dim", "number_of_conv_states", "fusion_config", "distributed_config", "transformers_weights",
})


@cache
def defined_fields(config_class: type) -> frozenset[str]:
    """Fields `config_class` defines: its constructor's parameters, what a default instance carries (the base
    class's fields included, on both transformers majors) and its dataclass fields (transformers 5)."""
    names = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    names |= set(config_class().to_dict())
    if dataclasses.is_dataclass(config_class):
        names |= {field.name for field in dataclasses.fields(config_class)}
    return frozenset(names)


def undefined_fields(config: dict[str, Any], config_class: type, known: set[str]) -> list[str]:
    """Fields of `config` that neither the family's rules (`known`) nor transformers' `config_class` define."""
    defined = defined_fields(config_class) | READ_BY_SHARED_CODE
    return sorted(key for key in config if key not in known and key not in defined)


@cache
def _default_instance(config_class: str) -> dict[str, Any]:
    import transformers

    return getattr(transformers, config_class)().to_dict()


def class_default(config_class: str, key: str) -> Any:
    """The value transformers' `config_class` (by name) gives `key` when config.json has none."""
    return _default_instance(config_class).get(key)
