"""Tiny random-weight students, router encoders and masks files, built on disk for tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from edgecompile.inputs.samples import BUILTIN_SAMPLES

WORDS = sorted({w.strip(".,!?:%").lower() for s in BUILTIN_SAMPLES for w in s.split() if w.strip(".,!?:%").isascii()})


def write_tokenizer(directory: Path) -> int:
    """A WordPiece vocab that covers every ASCII text (letters, digits, punctuation as pieces)."""
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + [w for w in WORDS if w and w not in chars]
    vocab = list(dict.fromkeys(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # from_pretrained reads vocab.txt on both majors (transformers 5's constructor ignores vocab_file)
    tokenizer = BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True)
    tokenizer.save_pretrained(str(directory))
    return len(vocab)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """HF init leaves biases at 0 and LayerNorms at 1; perturb everything so bugs cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.add_(noise if "weight" in name and param.dim() == 2 else noise * 2)


def make_bert(
    directory: Path,
    *,
    family: str = "bert",
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    intermediate: int = 64,
    seed: int = 0,
    num_labels: int = 3,
    pooling: str = "mean",
    normalize: bool = True,
    pooler: bool = True,
    fresh_init: bool = False,
) -> Path:
    """family: 'bert' (BertModel), 'seqcls' (BertForSequenceClassification) or 'st' (sentence-transformers).

    `fresh_init`: keep Hugging Face's initialisation untouched (all-zero biases, LayerNorms at 1), as a
    freshly initialised student is saved; the default perturbs every parameter so bugs cannot hide."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(directory)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=128, num_labels=num_labels,
    )
    torch.manual_seed(seed)
    if family == "seqcls":
        model = BertForSequenceClassification(config)
    else:
        model = BertModel(config, add_pooling_layer=pooler and family == "bert")
    if not fresh_init:
        _randomize(model, seed)
    model.save_pretrained(str(directory), safe_serialization=True)
    if family == "st":
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (directory / "modules.json").write_text(json.dumps(modules, indent=2))
        (directory / "1_Pooling").mkdir(exist_ok=True)
        keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
                "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens"}
        pooling_config = {"word_embedding_dimension": hidden, **{k: (mode == pooling) for mode, k in keys.items()}}
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))
        (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return directory


def write_masks(
    path: Path,
    clusters: dict[int, dict[str, np.ndarray]],
    centroids: np.ndarray,
    *,
    metric: str = "l2",
    kind: str | None = None,
    projection: tuple[np.ndarray, np.ndarray] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    tensors = {"router.centroids": np.ascontiguousarray(centroids, dtype=np.float32)}
    if projection is not None:
        tensors["router.projection.weight"] = np.ascontiguousarray(projection[0], dtype=np.float32)
        tensors["router.projection.bias"] = np.ascontiguousarray(projection[1], dtype=np.float32)
    for k, gates in clusters.items():
        for granularity, array in gates.items():
            tensors[f"cluster.{k}.{granularity}"] = np.ascontiguousarray(array, dtype=np.float32)
    meta = {"format": "edgecompile-masks/1", "router.metric": metric}
    if kind:
        meta["mask.kind"] = kind
    if metadata is not None:
        meta = metadata
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def redundancy_clean_like(directory: Path, *, ternary_ffn: bool = False, embeddings: bool = True, groups: int | None = None) -> Path:
    """Rewrite a checkpoint the way DeepSpeed's XTC `redundancy_clean` leaves it: every encoder Linear
    weight replaced by sign(W) * alpha per group as dense floats, with DeepSpeed's own formulas
    (deepspeed/compression/utils.py, BinaryQuantizer: input.reshape(num_groups, -1), alpha =
    norm(p=1) / n per group; TernaryQuantizer: 0.7 * mean threshold). `groups`: DeepSpeed's
    `quantize_groups` for every Linear (default: one per output row); more groups than rows cut rows."""
    from safetensors.torch import load_file, save_file

    path = Path(directory) / "model.safetensors"
    tensors = load_file(str(path))
    for name, weight in tensors.items():
        is_linear = ".layer." in name and name.endswith("dense.weight") or any(
            name.endswith(f"attention.self.{p}.weight") for p in ("query", "key", "value"))
        is_embedding = embeddings and name.endswith("word_embeddings.weight")
        if not (is_linear or is_embedding):
            continue
        flat = weight.reshape(groups if groups and is_linear else weight.shape[0], -1)  # input.reshape(num_groups, -1)
        if ternary_ffn and "intermediate" in name:
            n = flat.shape[1]
            m = flat.norm(p=1, dim=1).div(n)
            thres = (0.7 * m).view(-1, 1)
            pos, neg, mask = flat > thres, flat < -thres, flat.abs() > thres
            alpha = ((mask * flat).abs().sum(dim=1) / mask.sum(dim=1)).view(-1, 1)
            quantized = alpha * pos - alpha * neg
        else:
            m = flat.norm(p=1, dim=1, keepdim=True).div(flat.shape[1])
            quantized = flat.sign().mul(m)
        tensors[name] = quantized.reshape(weight.shape).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return directory


# A ChatML-like template in the form SmolLM2's is (one turn per message, the assistant's header last)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_bpe_tokenizer(directory: Path, vocab_size: int = 320, chat_template: str | None = None) -> int:
    """A byte-level BPE (GPT-2 / Llama-3 style) trained offline on the built-in samples, saved as tokenizer.json
    (with `chat_template`, saved as the installed transformers saves one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(BUILTIN_SAMPLES) * 3, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return len(fast)


# Per decoder family: transformers' config and model classes, and what its tiny test model sets beyond the shared sizes.
DECODER_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),  # q width 128 != hidden 64: head_dim is its own
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 6, "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}),
}


def make_decoder(
    directory: Path,
    family: str = "llama",
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    tied: bool = False,
    rope: dict | None = None,
    max_positions: int = 256,
    fresh_init: bool = False,
    config_overrides: dict | None = None,
    chat_template: str | None = None,
) -> Path:
    """A tiny random-weight causal LM of a decoder family (grouped-query attention) with a BPE tokenizer, saved by
    transformers, its config made by transformers' own config class for the family."""
    import transformers

    config_class, model_class, extra = DECODER_FAMILIES[family]
    directory = Path(directory)
    vocab_size = write_bpe_tokenizer(directory, chat_template=chat_template)
    if family != "llama":  # as real checkpoints pad theirs; transformers' Qwen2 tokenizer class adds <|endoftext|> here
        vocab_size += 16
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=tied, **extra,
    )
    if "layer_types" in kwargs:
        kwargs["layer_types"] = (kwargs["layer_types"] * layers)[:layers]
    if rope is not None:
        if int(transformers.__version__.split(".")[0]) >= 5:
            kwargs["rope_parameters"] = rope
        else:
            kwargs["rope_theta"] = rope.get("rope_theta", 10000.0)
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            kwargs["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    kwargs.update(config_overrides or {})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    if not fresh_init:
        _randomize(model, seed)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def make_llama(directory: Path, **kwargs) -> Path:
    """A tiny random-weight LlamaForCausalLM (grouped-query attention) with a BPE tokenizer, saved by transformers."""
    return make_decoder(directory, "llama", **kwargs)


def make_model2vec(directory: Path, source: Path, quantize_to: str = "float32") -> Path:
    """A static-embedding router distilled by model2vec itself from a (tiny) sentence-transformers folder."""
    import logging

    from model2vec.distill import distill

    logging.getLogger("model2vec").setLevel(logging.ERROR)
    distill(str(source), pca_dims=None, quantize_to=quantize_to).save_pretrained(str(directory))
    return Path(directory)


def add_mtp_heads(directory: Path, n_future_tokens: int, *, copies: bool = False, predict_well: bool = False, seed: int = 0) -> Path:
    """Turn a make_llama checkpoint into the multi-token-prediction contract: `extra_heads.{j}.*` tensors
    (LlamaDecoderLayer names) and `n_future_tokens` in config.json.

    copies: extra heads are copies of head 0 (layer L-1); otherwise head 0 plus noise.
    predict_well: every branch's output projection zeroed and the unembedding tied to the embedding, so
    each head predicts the current token again; with copies, every draft is right (acceptance 1).
    """
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    tensors = load_file(str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    last = f"model.layers.{config['num_hidden_layers'] - 1}."
    generator = torch.Generator().manual_seed(seed)
    for j in range(n_future_tokens - 1):
        for name, value in list(tensors.items()):
            if name.startswith(last):
                noise = 0 if copies else torch.randn(value.shape, generator=generator) * 0.05
                tensors[f"extra_heads.{j}." + name[len(last):]] = value.clone() + noise
    if predict_well:
        for name in tensors:
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                tensors[name] = torch.zeros_like(tensors[name])
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config["n_future_tokens"] = n_future_tokens
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
