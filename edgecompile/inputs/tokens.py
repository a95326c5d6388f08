"""Tokenizing samples once, and padding them into the batches a graph accepts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecompile.errors import InputError, one_line


@dataclass(frozen=True)
class Encoded:
    """One sample's token ids, unpadded."""

    input_ids: np.ndarray  # int64 [S]
    token_type_ids: np.ndarray  # int64 [S]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def load_tokenizer(directory: Path):
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    try:
        # trust_remote_code=False: a folder's auto_map (a bundle's, or a student's) never runs its code, and
        # transformers does not stop to ask "Do you wish to run the custom code? [y/N]" either
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"{directory}: cannot load the tokenizer ({one_line(exc)})") from None


def encode(tokenizer, texts: tuple[str, ...] | list[str], max_length: int) -> list[Encoded]:
    out = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_token_type_ids=True)
        out.append(Encoded(np.asarray(enc["input_ids"], np.int64), np.asarray(enc["token_type_ids"], np.int64)))
    return out


def pad_batch(samples: list[Encoded], length: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pad to `length` (default: the longest sample) with an attention mask."""
    width = length or max(s.length for s in samples)
    ids = np.full((len(samples), width), pad_id, np.int64)
    types = np.zeros((len(samples), width), np.int64)
    mask = np.zeros((len(samples), width), np.int64)
    for row, s in enumerate(samples):
        ids[row, : s.length] = s.input_ids
        types[row, : s.length] = s.token_type_ids
        mask[row, : s.length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def prompt_ids(tokenizer, text: str, *, chat: bool = False, system: str | None = None, source: str = "--prompt") -> list[int]:
    """A decoder prompt's token ids: `text` as the tokenizer encodes it (its special tokens included), or with
    `chat`, as one user turn (after `system`, if given) of the tokenizer's chat template, ready for the reply.

    The template is Jinja from the model's folder: transformers renders it in its immutable sandbox (no attribute
    of Python internals, no imports, no file access); a template that the sandbox stops, or that fails, is one
    InputError naming `source`, never a traceback.
    """
    if not chat:
        return list(tokenizer(text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{source}: expected a tokenizer with a chat template (tokenizer_config.json or "
                         "chat_template.jinja), found none; give the text as a plain prompt instead")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": text}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2 SecurityError (the sandbox), TemplateError, or the template's raise_exception
        raise InputError(f"{source}: the tokenizer's chat template failed to render ({type(exc).__name__}: "
                         f"{one_line(exc)})") from None
    # the template writes the special tokens itself (as transformers tokenizes a rendered chat)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
