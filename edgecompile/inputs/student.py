"""Checkpoint folders as files: a Hugging Face folder (config.json, model.safetensors, tokenizer) or a
sentence-transformers folder (modules.json, its Transformer module's folder, Pooling, Normalize).

What a folder holds is read and checked here; whether its config.json describes a model edgecompile
compiles exactly is its family's rule (families/, which turns a folder into a StudentSpec).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompile.errors import InputError, input_error, one_line

# chat_template.jinja: where transformers 5 saves a chat template (4.x kept it in tokenizer_config.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja")
WEIGHTS_FILE = "model.safetensors"
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens")  # sentence-transformers' that reference/pooling.py implements


@dataclass(frozen=True)
class StudentSpec:
    """A validated checkpoint of a supported family. Nothing heavy is loaded yet."""

    path: Path  # what the user gave
    family: str  # the kind of folder: "bert" | "bert-sequence-classification" | "sentence-transformers" | a decoder family's name
    architecture: str
    transformer_dir: Path  # holds config.json and model.safetensors
    config: dict[str, Any]
    pooling_mode: str | None = None  # sentence-transformers only
    normalize: bool = False
    max_seq_length: int = 512
    has_pooler: bool = False  # BertModel with pooler weights in the checkpoint
    num_labels: int = 0
    ignored_fields: tuple[str, ...] = ()  # config.json fields transformers' config class neither defines nor reads
    task: str = "feature-extraction"  # or "causal-lm" (families/base.py)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def intermediate_size(self) -> int:
        return int(self.config["intermediate_size"])

    @property
    def head_size(self) -> int:
        return int(self.config.get("head_dim") or self.hidden_size // self.num_heads)

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads (grouped-query attention); as many as query heads in BERT."""
        return int(self.config.get("num_key_value_heads") or self.num_heads)

    @property
    def is_decoder(self) -> bool:
        return self.task == "causal-lm"

    @property
    def embedding_dim(self) -> int:
        """Width of the sentence embedding (sentence-transformers) or the hidden state."""
        return self.hidden_size

    def tokenizer_files(self) -> tuple[Path, ...]:
        return tuple(self.transformer_dir / n for n in TOKENIZER_FILES if (self.transformer_dir / n).is_file())

    def check_tokenizer_files_readable(self) -> None:
        """They are copied into the bundle at the very end: an unreadable one must fail now."""
        for path in self.tokenizer_files():
            try:
                path.read_bytes()
            except OSError as exc:
                raise InputError(f"{path}: tokenizer file not readable ({exc.strerror})") from None


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({one_line(exc)})") from None


def check_weights(transformer_dir: Path) -> set[str]:
    """Open model.safetensors' header so a corrupt file fails here with its name; return tensor names."""
    weights = transformer_dir / WEIGHTS_FILE
    if not weights.is_file():
        if (transformer_dir / "model.safetensors.index.json").exists():  # transformers shards above max_shard_size
            raise InputError(f"{weights}: file not found (found model.safetensors.index.json, a sharded checkpoint; edgecompile "
                             "reads one file: save it with save_pretrained(..., max_shard_size=\"50GB\"))")
        hint = " (found pytorch_model.bin; save the checkpoint with safe_serialization=True)" if (
            transformer_dir / "pytorch_model.bin").exists() else ""
        raise InputError(f"{weights}: file not found{hint}")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            return set(handle.keys())
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise InputError(f"{weights}: not a readable safetensors file ({one_line(exc)})") from None


def refuse_unimplemented(path: Path, config: dict[str, Any], fields: tuple[tuple[str, Callable[[Any], bool], str], ...]) -> None:
    for key, accepted, expected in fields:
        if key in config and not accepted(config[key]):
            raise input_error(path, f"'{key}'", expected, _short(config[key]))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# sentence-transformers settings that change what the folder computes and that edgecompile does not
# implement (the text goes through the tokenizer as is, BertModel.forward, then Pooling / Normalize).
# sentence_bert_config.json of the Transformer module: 5.x / 6.x write transformer_task,
# modality_config and module_output_name; older releases max_seq_length and do_lower_case.
_TEXT_FORWARD = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
ST_TRANSFORMER_FIELDS_NOT_IMPLEMENTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("transformer_task", lambda v: v == "feature-extraction", "'feature-extraction'"),
    ("modality_config", lambda v: v == _TEXT_FORWARD, json.dumps(_TEXT_FORWARD)),
    ("module_output_name", lambda v: v == "token_embeddings", "'token_embeddings'"),
    ("do_lower_case", lambda v: not v, "false (texts are not lowercased beyond the tokenizer's own rules)"),
    *((key, lambda v: not v, "none (load-time overrides are not applied)")
      for key in ("config_kwargs", "config_args", "processor_kwargs", "tokenizer_args", "processing_kwargs")),
    *((key, lambda v: v is None, "null (one text encoding for every task)")
      for key in ("query_length", "document_length", "query_expansion")),
)
# config_sentence_transformers.json at the folder's root.
ST_MODEL_FIELDS_NOT_IMPLEMENTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("default_prompt_name", lambda v: v is None, "null (no prompt is prepended to the texts)"),
)


def _sentence_transformers_modules(path: Path) -> list[dict[str, Any]]:
    modules_path = path / "modules.json"
    modules = read_json(modules_path)
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) for m in modules):
        raise input_error(modules_path, "content", "a non-empty list of modules", type(modules).__name__)
    return modules


def _module_kind(module: dict[str, Any]) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _pooling_mode(config_path: Path, config: Any) -> str:
    if not isinstance(config, dict):
        raise input_error(config_path, "content", "a JSON object", type(config).__name__)
    legacy = {
        "pooling_mode_cls_token": "cls",
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_max_tokens": "max",
        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens": "weightedmean",
        "pooling_mode_lasttoken": "lasttoken",
    }
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [mode for key, mode in legacy.items() if config.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise input_error(config_path, "pooling mode", f"exactly one of {', '.join(POOLING_MODES)}", modes or "none")
    return modes[0]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder located: where its config.json and weights are, and its sentence-transformers modules."""

    path: Path  # what the user gave
    transformer_dir: Path  # holds config.json and model.safetensors
    config: dict[str, Any]
    modules: list[dict[str, Any]] | None = None  # modules.json of a sentence-transformers folder

    @property
    def config_path(self) -> Path:
        return self.transformer_dir / "config.json"


def read_checkpoint(path: Path, *, role: str = "student") -> Checkpoint:
    """Locate config.json (through modules.json for a sentence-transformers folder); `role` names the folder in errors."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {role} folder not found")
    if not path.is_dir():
        raise input_error(path, role, "a folder with config.json and model.safetensors", "a file")
    modules = None
    transformer_dir = path
    if (path / "modules.json").is_file():
        modules = _sentence_transformers_modules(path)
        kinds = [_module_kind(m) for m in modules]
        if kinds[0] != "Transformer":
            raise input_error(path / "modules.json", "first module", "a Transformer module", modules[0].get("type"))
        if len(kinds) < 2 or kinds[1] != "Pooling":
            found = modules[1].get("type") if len(kinds) > 1 else "nothing"
            raise input_error(path / "modules.json", "second module", "a Pooling module", found)
        if kinds[2:] not in ([], ["Normalize"]):
            raise input_error(path / "modules.json", "modules after Pooling", "none or Normalize",
                              ", ".join(m.get("type", "?") for m in modules[2:]))
        transformer_dir = path / str(modules[0].get("path", ""))
    config = read_json(transformer_dir / "config.json")
    if not isinstance(config, dict):
        raise input_error(transformer_dir / "config.json", "content", "a JSON object", type(config).__name__)
    return Checkpoint(path, transformer_dir, config, modules)


@dataclass(frozen=True)
class SentenceTransformersSettings:
    pooling_mode: str
    normalize: bool
    max_seq_length: int


def sentence_transformers_settings(checkpoint: Checkpoint) -> SentenceTransformersSettings:
    """Pooling, normalisation and length of a sentence-transformers folder; settings edgecompile does not implement
    are refused naming the file and key."""
    path, modules, config = checkpoint.path, checkpoint.modules or [], checkpoint.config
    pooling_dir = path / str(modules[1].get("path", "1_Pooling"))
    pooling_mode = _pooling_mode(pooling_dir / "config.json", read_json(pooling_dir / "config.json"))
    # sentence-transformers >= 5.x keeps the length in the tokenizer's model_max_length (the build
    # clamps to it); older folders also say max_seq_length here.
    max_seq_length = int(config.get("max_position_embeddings", 512))
    st_config = checkpoint.transformer_dir / "sentence_bert_config.json"
    if st_config.is_file():
        value = read_json(st_config)
        if not isinstance(value, dict):
            raise input_error(st_config, "content", "a JSON object", type(value).__name__)
        refuse_unimplemented(st_config, value, ST_TRANSFORMER_FIELDS_NOT_IMPLEMENTED)
        if isinstance(value.get("max_seq_length"), int):
            max_seq_length = min(max_seq_length, value["max_seq_length"])
    model_config = path / "config_sentence_transformers.json"
    if model_config.is_file():
        value = read_json(model_config)
        if isinstance(value, dict):
            refuse_unimplemented(model_config, value, ST_MODEL_FIELDS_NOT_IMPLEMENTED)
    return SentenceTransformersSettings(pooling_mode, len(modules) > 2, max_seq_length)
