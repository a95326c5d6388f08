"""Multi-token-prediction benchmark (issue 10): self-speculative decoding against plain greedy, n = 2 and 4.

For each n, a student in the checkpoint contract of docs/decoders.md "Multi-token prediction heads" is built
with edgecompile (one cluster keeping everything; the build proves speculative tokens identical to
greedy), then its graph decodes the same prompts greedily and speculatively with onnxruntime, one
thread, round robin (one greedy and one speculative generation per prompt per round), medians. Greedy
runs the next-token model (the same checkpoint without its extra heads, built the same way), so the
speed-up is what a user gains over ordinary decoding, extra-head cost included.
Printed: acceptance rate of the drafts, tokens per forward pass, decode ms per token and the
wall-clock decode speed-up of speculative over greedy (the median over prompts and rounds of the
back-to-back pair's ratio), beside the CPU flags.

Students (say which you measured):
  random   a not-tiny random Llama (hidden 512, 8 layers, 8/2 heads, FFN 1408, vocab 32000) whose
           extra heads are random decoder layers: drafts are almost never right, so this measures the
           verification overhead (the floor);
  ceiling  the same shapes with every branch output zeroed and the unembedding tied to the embedding
           (examples/checkpoints.add_ceiling_mtp_heads): every draft is right, so this is the most
           speculation can give at this size (the ceiling). Same compute as a real model of the shape;
  --checkpoint DIR   a trained student in the contract (e.g. recipe 4's output), for real acceptance.

Run: python examples/bench_mtp.py [--quick] [--checkpoint DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decoder import make_checkpoint
from checkpoints import add_ceiling_mtp_heads, add_random_mtp_heads, without_mtp_heads
from common import cpu_flags, edgecompile, minilm, write_trivial_masks

PROMPTS = ("How do I reset my password?", "The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
           "Return the number of items in a container.")


def random_student(directory: Path, n: int, quick: bool, ceiling: bool = False) -> Path:
    """The random student with n - 1 extra heads initialised like transformers initialises a layer, or (ceiling)
    with heads whose drafts are always right."""
    if (directory / "model.safetensors").is_file():
        return directory
    make_checkpoint(directory, quick, seed=n)  # the heads' initialisation goes on from the trunk's seeded random state
    return (add_ceiling_mtp_heads if ceiling else add_random_mtp_heads)(directory, n)


def next_token_student(student: Path, directory: Path) -> Path:
    """The same checkpoint without its extra heads: what greedy decoding would ship."""
    if (directory / "model.safetensors").is_file():
        return directory
    return without_mtp_heads(student, directory)


def build(student: Path, out: Path) -> Path:
    if (out / "manifest.json").is_file():
        return out
    layers = json.loads((student / "config.json").read_text())["num_hidden_layers"]
    masks = write_trivial_masks(out.parent / f"{out.name}_masks.safetensors", layers, 384)
    prompts = out.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    edgecompile("build", student, "--masks", masks, "--router-encoder", minilm(), "--samples", prompts, "--out", out, "-q",
                quiet=True, fresh_process=True)
    return out


def cluster_session(bundle: Path):
    """A one-thread session on the bundle's cpu cluster_0 graph, and the bundle."""
    from edgecompile.bundle.store import load_bundle
    from edgecompile.lowering.targets import target_from_dict
    from edgecompile.runtime.sessions import create_session

    reader = load_bundle(bundle)
    entry = reader.target("cpu")
    return create_session(reader.graph_file(entry, "cluster_0"), target_from_dict(entry["target"]), 1), reader


def measure(bundle: Path, baseline: Path, new_tokens: int, rounds: int) -> dict[str, float]:
    from transformers import AutoTokenizer

    from edgecompile.runtime.decode import greedy
    from edgecompile.runtime.speculative import speculative_greedy

    session, reader = cluster_session(bundle)
    plain_session, _ = cluster_session(baseline)
    tokenizer = AutoTokenizer.from_pretrained(str(bundle / reader.manifest["student"]["tokenizer"]))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    plain_ms, fast_ms, drafted, accepted, tokens, passes = [], [], 0, 0, 0, 0
    for round_ in range(rounds + 1):  # round 0 warms up
        for prompt in prompts:
            plain = greedy(plain_session, prompt, new_tokens)  # a fixed budget: no end-of-sequence stop
            fast = speculative_greedy(session, prompt, new_tokens)
            assert fast.tokens == plain.tokens, "speculative decoding must give the next-token model's greedy tokens"
            if round_:
                plain_ms.append(sum(plain.decode_ms) / (len(plain.tokens) - 1))
                fast_ms.append(sum(fast.step_ms) / (len(fast.tokens) - 1))
                drafted, accepted = drafted + fast.drafted, accepted + fast.accepted
                tokens, passes = tokens + len(fast.tokens) - 1, passes + fast.forward_passes - 1
    paired = np.asarray(plain_ms) / np.asarray(fast_ms)  # same prompt, back to back: load hits both alike
    return {"acceptance": accepted / drafted if drafted else 0.0, "tokens_per_pass": tokens / passes if passes else 0.0,
            "greedy_ms_per_token": float(np.median(plain_ms)), "speculative_ms_per_token": float(np.median(fast_ms)),
            "speedup": float(np.median(paired))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--checkpoint", type=Path, action="append", default=[],
                        help="A trained student in the contract (repeatable); default: random and ceiling students, n = 2 and 4.")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="A small random model and 1 round: checks the script, not the figures.")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_mtp_"))
    work.mkdir(parents=True, exist_ok=True)
    rounds = 1 if args.quick else args.rounds
    students = {f"{c.name} (n = {json.loads((c / 'config.json').read_text()).get('n_future_tokens', 1)})": c for c in args.checkpoint}
    if not students:
        students = {f"{kind}, n = {n}": random_student(work / f"{kind}_n{n}", n, args.quick, kind == "ceiling")
                    for kind in ("random", "ceiling") for n in (2, 4)}
    bundles = {name: (build(student, work / f"bundle_{student.name}"),  # every build first: the table below stays whole
                      build(next_token_student(student, work / f"{student.name}_next_token"), work / f"bundle_{student.name}_next_token"))
               for name, student in students.items()}
    print(f"{cpu_flags()}; onnxruntime, 1 thread; {len(PROMPTS)} prompts x {args.new_tokens} new tokens; "
          f"medians over {rounds} round-robin rounds")
    print("| student | acceptance | tokens per pass | greedy ms/token (next-token model) | speculative ms/token | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (bundle, baseline) in bundles.items():
        result = measure(bundle, baseline, args.new_tokens, rounds)
        print(f"| {name} | {result['acceptance']:.3f} | {result['tokens_per_pass']:.2f} | {result['greedy_ms_per_token']:.2f} | "
              f"{result['speculative_ms_per_token']:.2f} | {result['speedup']:.2f}x |")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
