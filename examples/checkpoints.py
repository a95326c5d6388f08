"""Checkpoints the examples write themselves, through tokenizers, transformers and safetensors directly:
a byte-level BPE tokenizer trained offline, a random-weight Llama, and multi-token-prediction heads added
to or taken from a Llama checkpoint (the contract of docs/decoders.md "Multi-token prediction heads": tensors
`extra_heads.{j}.*` named as a LlamaDecoderLayer's, `n_future_tokens` in config.json)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

SPECIAL = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: bos, eos, pad


def train_bpe_tokenizer(texts: list[str], vocab: int, out: Path | None = None):
    """A byte-level BPE (GPT-2 / Llama-3 style) of `vocab` tokens trained on `texts`, `<s>` prepended to
    every text; a transformers PreTrainedTokenizerFast, saved into `out` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if out is not None:
        fast.save_pretrained(str(out))
    return fast


def random_llama(directory: Path, seed: int = 0, **config) -> Path:
    """A random-weight LlamaForCausalLM (transformers' own initialisation after torch.manual_seed(seed)) with
    the LlamaConfig fields `config`, and a 320-token BPE tokenizer trained on edgecompile's built-in samples
    (ids 0, 1, 2 = bos, eos, pad, as the config says), saved in `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgecompile.inputs.samples import BUILTIN_SAMPLES

    train_bpe_tokenizer(list(BUILTIN_SAMPLES) * 3, 320, directory)
    llama = LlamaConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, **config)
    torch.manual_seed(seed)
    LlamaForCausalLM(llama).save_pretrained(str(directory))
    return directory


def _with_heads(directory: Path, n_future_tokens: int, heads: Callable[[dict, dict], dict]) -> Path:
    """Rewrite a Llama checkpoint with the tensors heads(tensors, config) returns and n_future_tokens in its config."""
    from safetensors.torch import load_file, save_file

    config = json.loads((directory / "config.json").read_text())
    tensors = heads(load_file(str(directory / "model.safetensors")), config)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**config, "n_future_tokens": n_future_tokens}, indent=2))
    return directory


def add_random_mtp_heads(directory: Path, n_future_tokens: int) -> Path:
    """n - 1 extra heads that are fresh LlamaDecoderLayers, initialised as transformers initialises a layer
    from torch's current random state (seed it first): their drafts are almost never right."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def heads(tensors: dict, config: dict) -> dict:
        fresh = LlamaForCausalLM(LlamaConfig(**{**config, "num_hidden_layers": n_future_tokens - 1}))  # n - 1 fresh layers
        for name, value in fresh.state_dict().items():
            if name.startswith("model.layers."):
                j, rest = name[len("model.layers."):].split(".", 1)
                tensors[f"extra_heads.{j}.{rest}"] = value.clone()
        return tensors

    return _with_heads(directory, n_future_tokens, heads)


def add_ceiling_mtp_heads(directory: Path, n_future_tokens: int) -> Path:
    """n - 1 extra heads whose drafts are always right: copies of head 0 (the last layer), every branch's
    output projection zeroed and the unembedding tied to the embedding, so each head predicts the current
    token again (acceptance 1) at the compute of a real model of the shape."""
    import torch

    def heads(tensors: dict, config: dict) -> dict:
        last = f"model.layers.{config['num_hidden_layers'] - 1}."
        for j in range(n_future_tokens - 1):
            for name, value in list(tensors.items()):
                if name.startswith(last):
                    tensors[f"extra_heads.{j}." + name[len(last):]] = value.clone()
        for name in tensors:
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                tensors[name] = torch.zeros_like(tensors[name])
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        return tensors

    return _with_heads(directory, n_future_tokens, heads)


def without_mtp_heads(student: Path, directory: Path) -> Path:
    """A copy of a multi-token-prediction checkpoint without its extra heads: the next-token model."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(student, directory, ignore=shutil.ignore_patterns("model.safetensors", "config.json"))
    tensors = {k: v for k, v in load_file(str(student / "model.safetensors")).items() if not k.startswith("extra_heads.")}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((student / "config.json").read_text())
    config.pop("n_future_tokens")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
