"""The recipes' text corpus: first paragraphs of Python standard-library docstrings, labelled by module family.

Real topical variety, built offline: text processing, files, networking, concurrency, data formats,
numbers, developer tools, date and time, containers. The corpus is built ONCE from the running Python
and checked in (examples/data/stdlib_docstrings.jsonl, ~0.7 MB, text under the PSF License), because
docstrings change between Python patch versions; `load_corpus` checks its sha256, so every machine
trains and evaluates on the same texts. The train / held-out split is part of the file: a text is
held out when sha256(text) mod 5 == 0 (20%), which does not depend on order or machine.

    python examples/corpus.py                 # summary of the checked-in corpus
    python examples/corpus.py --rebuild       # rewrite it from this Python (prints the new sha256)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

CORPUS_FILE = Path(__file__).parent / "data" / "stdlib_docstrings.jsonl"
CORPUS_SHA256 = "c79c76cf463f9aef184ed0b192f41726946302767dad1b47c0b91db50eac6008"
BUILT_WITH = "3.11.7"
PER_FAMILY = 400  # cap, so the classes of recipe 2 are roughly balanced
MIN_CHARS, MAX_CHARS = 40, 400

FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "codecs", "locale", "gettext", "shlex", "stringprep",
             "encodings", "pprint", "reprlib"),
    "files": ("os", "os.path", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "stat", "fileinput", "io"),
    "network": ("socket", "ssl", "http.client", "http.server", "http.cookies", "http.cookiejar", "urllib.request",
                "urllib.parse", "urllib.robotparser", "ftplib", "smtplib", "poplib", "imaplib", "socketserver",
                "xmlrpc.client", "xmlrpc.server", "ipaddress", "email.message", "email.utils", "email.parser",
                "email.header", "email.policy", "email.headerregistry", "mailbox", "mimetypes", "webbrowser"),
    "concurrency": ("threading", "multiprocessing", "multiprocessing.pool", "multiprocessing.managers",
                    "multiprocessing.connection", "multiprocessing.queues", "multiprocessing.synchronize",
                    "multiprocessing.shared_memory", "concurrent.futures", "asyncio.events", "asyncio.tasks",
                    "asyncio.queues", "asyncio.locks", "asyncio.streams", "asyncio.subprocess",
                    "asyncio.futures", "asyncio.base_events", "queue", "subprocess", "sched", "selectors", "signal"),
    "data formats": ("json", "csv", "pickle", "shelve", "marshal", "sqlite3", "xml.etree.ElementTree",
                     "xml.dom.minidom", "xml.sax", "html", "html.parser", "configparser", "tomllib", "plistlib",
                     "base64", "binascii", "zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile", "struct"),
    "numbers": ("math", "cmath", "decimal", "fractions", "numbers", "statistics", "random"),
    "developer tools": ("unittest", "unittest.mock", "doctest", "pdb", "bdb", "inspect", "ast", "dis", "traceback",
                        "typing", "tokenize", "trace", "timeit", "cProfile", "profile", "pstats", "warnings",
                        "logging", "argparse", "importlib", "pydoc"),
    "date and time": ("datetime", "time", "calendar", "zoneinfo", "_strptime"),
    "containers": ("collections", "collections.abc", "itertools", "functools", "heapq", "bisect", "array",
                   "weakref", "copy", "enum", "dataclasses", "types", "contextlib", "operator"),
}


@dataclass(frozen=True)
class Doc:
    family: str
    source: str  # dotted name of the documented object
    text: str
    held_out: bool


def is_held_out(text: str) -> bool:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 5 == 0


def _first_paragraph(doc: str | None) -> str | None:
    if not isinstance(doc, str) or not doc:
        return None
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    text = re.sub(r"\s+", " ", paragraph).strip()
    if not (MIN_CHARS <= len(text) <= MAX_CHARS) or "<==>" in text or text.startswith(("Initialize self", "Create and return")):
        return None
    return text


def _documented(module) -> list[tuple[str, str | None]]:
    """(dotted name, docstring) of the module, its public functions and classes, and their public methods."""
    found = [(module.__name__, paragraph) for paragraph in (module.__doc__ or "").split("\n\n")]
    # Objects defined here, or in the C accelerator the module re-exports (_csv for csv, posix for os).
    homes = {module.__name__, "_" + module.__name__.rpartition(".")[2], "posix" if module.__name__ == "os" else ""}
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) not in homes:
            continue
        if inspect.isclass(obj):
            found.append((f"{module.__name__}.{name}", obj.__doc__))
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_"):
                    found.append((f"{module.__name__}.{name}.{attr}", getattr(member, "__doc__", None)))
        elif callable(obj):
            found.append((f"{module.__name__}.{name}", obj.__doc__))
    return found


def build_corpus() -> list[Doc]:
    """Harvest, deduplicate (a text seen in two families is dropped as ambiguous), cap per family."""
    by_text: dict[str, tuple[str, str]] = {}
    ambiguous: set[str] = set()
    for family, modules in FAMILIES.items():
        for module_name in modules:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated aliases warn when their docstring is read
                documented = _documented(importlib.import_module(module_name))
            for source, doc in documented:
                text = _first_paragraph(doc)
                if text is None:
                    continue
                if text in by_text and by_text[text][0] != family:
                    ambiguous.add(text)
                by_text.setdefault(text, (family, source))
    docs: list[Doc] = []
    for family in FAMILIES:
        texts = sorted(t for t, (f, _) in by_text.items() if f == family and t not in ambiguous)
        # Cap deterministically by hash rank (not by name order, which would favour early modules).
        texts = sorted(texts, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())[:PER_FAMILY]
        docs += [Doc(family, by_text[t][1], t, is_held_out(t)) for t in sorted(texts)]
    return docs


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_corpus(path: Path = CORPUS_FILE, *, check: bool = True) -> list[Doc]:
    """The checked-in corpus; with `check`, refuses a file whose sha256 differs from the recorded one."""
    if not path.is_file():
        raise SystemExit(f"{path}: corpus file not found (run: python examples/corpus.py --rebuild)")
    if check and path == CORPUS_FILE and file_sha256(path) != CORPUS_SHA256:
        raise SystemExit(f"{path}: sha256 expected {CORPUS_SHA256}, found {file_sha256(path)} (rebuilt by another Python?)")
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            docs.append(Doc(row["family"], row["source"], row["text"], row["split"] == "held_out"))
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"{path}:{number}: expected a JSON object with family, source, text, split") from None
    return docs


def split(docs: list[Doc]) -> tuple[list[Doc], list[Doc]]:
    return [d for d in docs if not d.held_out], [d for d in docs if d.held_out]


def spread(docs: list[Doc], count: int | None) -> list[Doc]:
    """At most `count` docs evenly spaced through the list (the file is grouped by family, so every
    family stays represented); all of them when count is None."""
    if count is None or count >= len(docs):
        return docs
    return [docs[int(i * len(docs) / count)] for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help=f"rebuild {CORPUS_FILE.name} from this Python's standard library")
    parser.add_argument("--out", type=Path, default=CORPUS_FILE, help="where --rebuild writes [default: %(default)s]")
    args = parser.parse_args(argv)
    if args.rebuild:
        version = ".".join(map(str, sys.version_info[:3]))
        if version != BUILT_WITH:
            print(f"note: the checked-in corpus was built with Python {BUILT_WITH}; this is {version}", file=sys.stderr)
        docs = build_corpus()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"family": d.family, "source": d.source, "split": "held_out" if d.held_out else "train",
                             "text": d.text}, ensure_ascii=False) for d in docs]
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {args.out}: {len(docs)} texts, sha256 {file_sha256(args.out)}")
    docs = load_corpus(args.out, check=not args.rebuild)
    train, held_out = split(docs)
    print(f"{len(docs)} texts: {len(train)} train, {len(held_out)} held out")
    for family in FAMILIES:
        n_train = sum(d.family == family for d in train)
        n_held = sum(d.family == family for d in held_out)
        print(f"  {family:16s} {n_train:4d} train {n_held:4d} held out")


if __name__ == "__main__":
    main()
