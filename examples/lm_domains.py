"""Four text domains that differ in kind, built offline from files on the machine (and the model itself).

- code:  Python source of the standard library of the interpreter running this (CPython 3.11.7 here; PSF
         License): top-level blocks of `Lib/*.py` separated by blank lines. Held out: sha256(file name) mod 5 == 0
         (whole files, so no held-out text shares a file with a calibration text).
- prose: technical prose, examples/data/stdlib_docstrings.jsonl (edgecompile's checked-in corpus; its own
         split, sha256(text) mod 5 == 0), texts of at least 120 characters.
- legal: license texts: /usr/share/common-licenses/* (Debian base-files) and every LICENSE* / COPYING* /
         LICENCE* file of the project's virtual environment (site-packages); paragraphs of >= 200 characters,
         whitespace-normalised, deduplicated; held out: sha256(paragraph) mod 5 == 0.
- chat:  SmolLM2-135M-Instruct's OWN greedy answers (64 new tokens at most, cut at <|im_end|>) to templated
         chat prompts (`chat_prompts()`, rendered by its chat template with its default system prompt); the
         scored text is the user turn + the answer in ChatML (the system block dropped); the router reads the
         user message. Held out: sha256(prompt) mod 5 == 0.

Per domain the texts are ordered by sha256 and the first N of each split are used, so a run is
deterministic and independent of file-system order. `build_domains` caches everything (chat answers
included) in one JSONL whose sha256 the report prints.
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

DOCSTRINGS = Path(__file__).resolve().parent / "data" / "stdlib_docstrings.jsonl"
COMMON_LICENSES = Path("/usr/share/common-licenses")
DOMAINS = ("code", "prose", "legal", "chat")


@dataclass(frozen=True)
class Text:
    domain: str
    source: str       # file / object / prompt id it came from
    text: str         # what the LM is scored on
    route: str        # what the router reads (the text, or the user message for chat)
    held_out: bool


def h(s: str) -> int:
    return int(hashlib.sha256(s.encode("utf-8")).hexdigest(), 16)


def code_texts() -> list[Text]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    out, seen = [], set()
    for path in sorted(lib.glob("*.py")):
        try:
            src = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        held = h(path.name) % 5 == 0
        for block in re.split(r"\n\s*\n(?=\S)", src):  # blank line followed by a top-level statement
            block = block.strip("\n")
            if len(block) < 300 or block.lstrip().startswith(("#", '"""', "'''")) or block in seen:
                continue
            if not re.match(r"(def |class |async def |@)", block):
                continue
            seen.add(block)
            out.append(Text("code", f"{path.name}", block, block, held))
    return out


def prose_texts() -> list[Text]:
    out = []
    for line in DOCSTRINGS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if len(row["text"]) >= 120:
            out.append(Text("prose", row["source"], row["text"], row["text"], row["split"] == "held_out"))
    return out


def license_files(site_packages: Path) -> list[Path]:
    files = sorted(p for p in COMMON_LICENSES.glob("*") if p.is_file() and not p.is_symlink())
    pattern = re.compile(r"^(LICEN[CS]E|COPYING)", re.IGNORECASE)
    files += sorted(p for p in site_packages.rglob("*") if p.is_file() and pattern.match(p.name) and p.stat().st_size >= 1000)
    return files


def legal_texts(site_packages: Path) -> list[Text]:
    out, seen = [], set()
    for path in license_files(site_packages):
        try:
            raw = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for para in re.split(r"\n\s*\n", raw):
            text = re.sub(r"\s+", " ", para).strip()
            if len(text) < 200 or text in seen or sum(c.isalpha() for c in text) < 0.6 * len(text):
                continue
            seen.add(text)
            out.append(Text("legal", str(path), text, text, h(text) % 5 == 0))
    return out


TOPICS = ["photosynthesis", "the French Revolution", "black holes", "compound interest", "the water cycle", "vaccines",
          "machine learning", "the Roman Empire", "climate change", "the human heart", "volcanoes", "the stock market",
          "electric cars", "honey bees", "the internet", "democracy", "sleep", "coffee", "the moon", "recycling",
          "earthquakes", "the piano", "chess", "gravity", "bread baking", "the Olympic Games", "rainbows", "DNA",
          "solar panels", "the printing press", "octopuses", "meditation", "inflation", "the Great Wall of China",
          "antibiotics", "jazz music", "glaciers", "password security", "public libraries", "friendship"]
TASKS = ["Explain {t} to a ten-year-old.", "What are three interesting facts about {t}?", "Write a short poem about {t}.",
         "Give me some tips for learning about {t}.", "Why is {t} important?", "Summarize the history of {t} in a few sentences.",
         "What is a common misconception about {t}?", "Write a short story that involves {t}.",
         "How would you describe {t} to someone who has never heard of it?", "List some pros and cons of {t}."]


def chat_prompts() -> list[str]:
    prompts = [task.format(t=topic) for i, topic in enumerate(TOPICS) for j, task in enumerate(TASKS) if (i + 3 * j) % 5 < 2]
    prompts += ["How do I reset my password?", "Can you recommend a good book for a long flight?", "What should I cook for dinner tonight?",
                "How can I be more productive when working from home?", "What is the capital of Australia?",
                "Help me write a polite email declining a meeting.", "What's the difference between weather and climate?",
                "How many minutes are in a week?", "Translate 'good morning, how are you?' into French.",
                "What are some good exercises for back pain?", "I feel nervous before exams. Any advice?",
                "Write a haiku about autumn leaves.", "What is 15% of 240?", "Suggest a name for a small bakery.",
                "How do plants know which way is up?", "Tell me a joke about computers."]
    return prompts


def chat_texts(answers: dict[str, str]) -> list[Text]:
    out = []
    for i, prompt in enumerate(chat_prompts()):
        answer = answers[prompt]
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>"
        out.append(Text("chat", f"prompt {i}", text, prompt, h(prompt) % 5 == 0))
    return out


def select(texts: list[Text], per_domain_cal: int, per_domain_held: int) -> tuple[list[Text], list[Text]]:
    """Per domain, ordered by sha256 of the text: the first N calibration and first M held-out texts."""
    cal, held = [], []
    for d in DOMAINS:
        rows = sorted((t for t in texts if t.domain == d), key=lambda t: hashlib.sha256(t.text.encode()).hexdigest())
        cal += [t for t in rows if not t.held_out][:per_domain_cal]
        held += [t for t in rows if t.held_out][:per_domain_held]
    return cal, held


def build_domains(cache: Path, generate_answers, site_packages: Path) -> list[Text]:
    """All texts of the four domains; `generate_answers(prompts) -> {prompt: answer}` runs once (cached)."""
    if cache.is_file():
        return [Text(**json.loads(line)) for line in cache.read_text(encoding="utf-8").splitlines()]
    answers = generate_answers(chat_prompts())
    texts = code_texts() + prose_texts() + legal_texts(site_packages) + chat_texts(answers)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("".join(json.dumps(asdict(t), ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return texts


def routing_texts(per_domain_cal: int = 64, per_domain_held: int = 32) -> tuple[list[str], list[str]]:
    """What a router reads of the four domains (calibration, held-out), without the model's chat answers: for chat,
    the user message is all the router sees."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    chat = [Text("chat", f"prompt {i}", prompt, prompt, h(prompt) % 5 == 0) for i, prompt in enumerate(chat_prompts())]
    cal, held = select(code_texts() + prose_texts() + legal_texts(site_packages) + chat, per_domain_cal, per_domain_held)
    return [t.route for t in cal], [t.route for t in held]
