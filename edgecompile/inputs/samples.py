r"""Parity (and calibration) samples: one UTF-8 input per line.

Lines end at "\n" (or "\r\n") only, as editors and `wc -l` count them: a form feed or a Unicode
line separator inside a line is part of that input (str.splitlines would split there and every
later line number in an error message would be wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgecompile.errors import InputError, input_error

# A small, varied default set: short and long, questions, numbers, punctuation, non-ASCII.
BUILTIN_SAMPLES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates by half a point.",
    "I loved this movie, the soundtrack was amazing!",
    "The service was slow and the food arrived cold.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Where is the nearest train station?",
    "Please schedule a meeting with the design team for next Thursday at 3 pm.",
    "Quantum computers use qubits, which can represent both 0 and 1 at the same time.",
    "My phone battery drains in two hours, even when I am not using it.",
    "Paris is the capital of France.",
    "What is the difference between a virus and a bacterium?",
    "The patient reported mild chest pain and shortness of breath after exercise.",
    "Add two cups of flour, one egg and a pinch of salt, then stir until smooth.",
    "Ok",
    "Der Zug nach München fährt um 8 Uhr ab.",
    "Transformers replaced recurrent networks in most natural language processing tasks because "
    "self-attention captures long-range dependencies and parallelises well on modern hardware.",
    "Can you recommend a good book about the history of mathematics?",
    "Error 404: the requested page could not be found.",
    "She scored 27 points in the final game of the season.",
    "The contract terminates automatically if either party fails to pay within thirty days.",
    "Is it going to rain tomorrow in Seattle?",
    "Mix the red and blue paint to get purple.",
    "Our quarterly revenue grew 12% year over year, driven by strong demand in Asia.",
)


@dataclass(frozen=True)
class Samples:
    texts: tuple[str, ...]
    lines: tuple[int, ...]  # 1-based line of each text in its file, for error messages
    source: str  # the file, or "built-in"
    chat: bool = False  # decoders: each text is a user turn of the student's chat template (inputs/tokens.prompt_ids)


def numbered_lines(text: str) -> list[tuple[int, str]]:
    r"""(1-based line number, stripped text) of every non-blank line; lines end at \n or \r\n only."""
    lines = text.split("\n")
    return [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]


def load_samples(path: Path | None, chat: bool = False) -> Samples:
    if path is None:
        return Samples(BUILTIN_SAMPLES, tuple(range(1, len(BUILTIN_SAMPLES) + 1)), "built-in", chat)
    path = Path(path)
    if path.is_dir():
        raise input_error(path, "--samples", "a text file, one input per line", "a folder")
    if not path.exists():
        raise InputError(f"{path}: samples file not found")
    try:  # any readable file: a regular file, /dev/null, a pipe from <(...)
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: samples file not readable ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise input_error(path, f"line {line}", "UTF-8 text", f"invalid byte 0x{raw[exc.start]:02x}") from None
    numbered = numbered_lines(text)
    if not numbered:
        raise input_error(path, "samples", "at least one non-empty line", "none")
    return Samples(tuple(t for _, t in numbered), tuple(n for n, _ in numbered), str(path), chat)
