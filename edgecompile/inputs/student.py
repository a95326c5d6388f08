"""Student and router-encoder checkpoints: Hugging Face BERT folders and sentence-transformers folders."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompile.errors import InputError, input_error, one_line

SUPPORTED_ARCHITECTURES = ("BertModel", "BertForSequenceClassification")
SUPPORTED_DESCRIPTION = (
    "BertModel, BertForSequenceClassification, a sentence-transformers folder whose first module is a BERT, "
    "or LlamaForCausalLM"
)
DECODER_FAMILIES = ("llama",)  # model_type values compiled as decoder language models (families/llama.py)
# chat_template.jinja: where transformers 5 saves a chat template (4.x kept it in tokenizer_config.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja")
WEIGHTS_FILE = "model.safetensors"
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens")  # sentence-transformers' that reference/pooling.py implements


@dataclass(frozen=True)
class StudentSpec:
    """A validated checkpoint of a supported family. Nothing heavy is loaded yet."""

    path: Path  # what the user gave
    family: str  # "bert" | "bert-sequence-classification" | "sentence-transformers"
    architecture: str
    transformer_dir: Path  # holds config.json and model.safetensors
    config: dict[str, Any]
    pooling_mode: str | None = None  # sentence-transformers only
    normalize: bool = False
    max_seq_length: int = 512
    has_pooler: bool = False  # BertModel with pooler weights in the checkpoint
    num_labels: int = 0
    ignored_fields: tuple[str, ...] = ()  # config.json fields transformers' config class neither defines nor reads

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
        return self.family in DECODER_FAMILIES

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


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({one_line(exc)})") from None


def _check_weights(transformer_dir: Path) -> set[str]:
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


def _check_bert_config(config_path: Path, config: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(config, dict):
        raise input_error(config_path, "content", "a JSON object", type(config).__name__)
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if model_type != "bert":
        name = architecture or "unknown architecture"
        raise InputError(
            f"{config_path}: model family '{model_type}' ({name}) is not supported; supported: {SUPPORTED_DESCRIPTION}"
        )
    if architecture is None:
        architecture = "BertModel"
    if architecture not in allowed:
        raise InputError(
            f"{config_path}: architecture '{architecture}' is not supported; supported: {SUPPORTED_DESCRIPTION}"
        )
    positive = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                "max_position_embeddings", "type_vocab_size")
    for key in positive:
        value = config.get(key)
        if key in ("type_vocab_size", "max_position_embeddings", "vocab_size") and value is None:
            continue  # transformers' defaults apply
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise input_error(config_path, f"'{key}'", "a positive integer", repr(value))
    for key in ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise input_error(config_path, f"'{key}'", "a number", repr(value))
    if "hidden_act" in config and config["hidden_act"] not in ("gelu", "relu", "gelu_new", "gelu_python", "silu", "swish", "tanh"):
        raise input_error(config_path, "'hidden_act'", "a transformers activation name (e.g. 'gelu')", repr(config["hidden_act"]))
    if config["hidden_size"] % config["num_attention_heads"]:
        raise input_error(
            config_path, "'hidden_size' / 'num_attention_heads'", "an integer head size",
            f"{config['hidden_size']} / {config['num_attention_heads']}",
        )
    _refuse_unimplemented(config_path, config, BERT_FIELDS_NOT_IMPLEMENTED)
    from edgecompile.families.bert import check_pruned_heads

    check_pruned_heads(config_path, config)  # implemented on both majors (families/bert.py), checked there
    return architecture


# Fields a BERT config may carry (saved by transformers 4.x or 5.x) that change the model but that the
# BERT export and passes do not implement: each is refused by name rather than compiled into a
# different model. (transformers 5 drops relative positions altogether; 4.57 would load them, so both
# lanes refuse them here. `pruned_heads`, which 5 drops too, is implemented.) Entries: key,
# accepted(value), what is accepted.
BERT_FIELDS_NOT_IMPLEMENTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("position_embedding_type", lambda v: v in (None, "absolute"), "'absolute'"),
    ("is_decoder", lambda v: not v, "an encoder (false)"),
    ("add_cross_attention", lambda v: not v, "no cross-attention (false)"),
    ("chunk_size_feed_forward", lambda v: not v, "0 (the FFN is exported unchunked)"),
    ("quantization_config", lambda v: v is None, "none (a float checkpoint)"),
)


def _refuse_unimplemented(path: Path, config: dict[str, Any], fields: tuple[tuple[str, Callable[[Any], bool], str], ...]) -> None:
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
    modules = _read_json(modules_path)
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


def load_student(path: Path, *, role: str = "student") -> StudentSpec:
    """Validate a checkpoint folder and say which family it is. `role` names it in errors."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {role} folder not found")
    if not path.is_dir():
        raise input_error(path, role, "a folder with config.json and model.safetensors", "a file")
    if (path / "modules.json").is_file():
        return _load_sentence_transformers(path)
    config_path = path / "config.json"
    config = _read_json(config_path)
    if isinstance(config, dict) and config.get("model_type") in DECODER_FAMILIES:
        from edgecompile.families.llama import check_config

        architecture, ignored = check_config(config_path, config)
        _check_weights(path)
        return StudentSpec(path, config["model_type"], architecture, path, config,
                           max_seq_length=int(config.get("max_position_embeddings", 2048)), ignored_fields=tuple(ignored))
    architecture = _check_bert_config(config_path, config, SUPPORTED_ARCHITECTURES)
    names = _check_weights(path)
    if architecture == "BertForSequenceClassification":
        labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
        return StudentSpec(
            path, "bert-sequence-classification", architecture, path, config,
            max_seq_length=int(config.get("max_position_embeddings", 512)), num_labels=labels,
        )
    has_pooler = any(n.endswith("pooler.dense.weight") for n in names)
    return StudentSpec(
        path, "bert", architecture, path, config,
        max_seq_length=int(config.get("max_position_embeddings", 512)), has_pooler=has_pooler,
    )


def _load_sentence_transformers(path: Path) -> StudentSpec:
    modules = _sentence_transformers_modules(path)
    kinds = [_module_kind(m) for m in modules]
    if kinds[0] != "Transformer":
        raise input_error(path / "modules.json", "first module", "a Transformer module", modules[0].get("type"))
    if len(kinds) < 2 or kinds[1] != "Pooling":
        found = modules[1].get("type") if len(kinds) > 1 else "nothing"
        raise input_error(path / "modules.json", "second module", "a Pooling module", found)
    rest = kinds[2:]
    if rest not in ([], ["Normalize"]):
        raise input_error(
            path / "modules.json", "modules after Pooling", "none or Normalize", ", ".join(m.get("type", "?") for m in modules[2:])
        )
    transformer_dir = path / str(modules[0].get("path", ""))
    config_path = transformer_dir / "config.json"
    config = _read_json(config_path)
    architecture = _check_bert_config(config_path, config, ("BertModel",))
    _check_weights(transformer_dir)
    pooling_dir = path / str(modules[1].get("path", "1_Pooling"))
    pooling_mode = _pooling_mode(pooling_dir / "config.json", _read_json(pooling_dir / "config.json"))
    # sentence-transformers >= 5.x keeps the length in the tokenizer's model_max_length (the build
    # clamps to it); older folders also say max_seq_length here.
    max_seq_length = int(config.get("max_position_embeddings", 512))
    st_config = transformer_dir / "sentence_bert_config.json"
    if st_config.is_file():
        value = _read_json(st_config)
        if not isinstance(value, dict):
            raise input_error(st_config, "content", "a JSON object", type(value).__name__)
        _refuse_unimplemented(st_config, value, ST_TRANSFORMER_FIELDS_NOT_IMPLEMENTED)
        if isinstance(value.get("max_seq_length"), int):
            max_seq_length = min(max_seq_length, value["max_seq_length"])
    model_config = path / "config_sentence_transformers.json"
    if model_config.is_file():
        value = _read_json(model_config)
        if isinstance(value, dict):
            _refuse_unimplemented(model_config, value, ST_MODEL_FIELDS_NOT_IMPLEMENTED)
    return StudentSpec(
        path, "sentence-transformers", architecture, transformer_dir, config,
        pooling_mode=pooling_mode, normalize=bool(rest), max_seq_length=max_seq_length,
    )
