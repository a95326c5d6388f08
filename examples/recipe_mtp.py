"""Recipe 4: a small causal LM with multi-token-prediction heads (Gloeckle et al. 2024), compiled by edgecompile.

1. A byte-level BPE tokenizer (tokenizers) is trained on the corpus' train split; the texts become one
   token stream, cut into windows of --context tokens.
2. A small Llama (transformers' LlamaForCausalLM: layers 0..L-2 the trunk, layer L-1 head 0) gets n-1
   extra heads (LlamaDecoderLayers on the trunk's output; head j predicts token t+1+j) and is trained
   from scratch on the mean of the heads' cross-entropies, in the memory-saving order: trunk forward
   once; for each head in turn forward, loss, backward into the trunk output (gradients accumulate);
   trunk backward once (edgecompile/reference/mtp_training.py). The peak tensor memory of one step in
   that order and in the naive one (all heads, then one backward) is measured on the same batch.
3. Printed: loss curves (and a plot), held-out perplexity of every head.
4. Saved in the multi-token-prediction checkpoint contract (families/mtp.py), built with
   `edgecompile build` (every head's logits and the speculative path checked against transformers), and
   decoded from held-out prompts greedily and self-speculatively (the extra heads draft, head 0
   verifies, runtime/speculative.py): acceptance rate, tokens per forward pass, decode speed-up.

    python examples/recipe_mtp.py               # defaults (minutes on 2 cores)
    python examples/recipe_mtp.py --short       # seconds: checks the pipeline, figures meaningless
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import train_bpe_tokenizer  # noqa: E402
from common import (OUT, RecipeParser, add_run_arguments, build_bundle, cpu_flags, done, finished, minilm,  # noqa: E402
                    phase, require, require_dir, require_file, run_recipe, write_trivial_masks)
from corpus import CORPUS_FILE, load_corpus, split, spread  # noqa: E402

from edgecompile.errors import ParityError  # noqa: E402
from edgecompile.reference.mtp_training import MultiTokenLlama  # noqa: E402
from edgecompile.reference.tensor_memory import PeakTensorMemory  # noqa: E402


def parse_args(argv: list[str] | None):
    parser = RecipeParser(prog="recipe_mtp.py", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS_FILE, help="corpus JSONL (examples/corpus.py) [default: %(default)s]")
    parser.add_argument("--n-future", type=int, default=2, help="heads: n, head j predicts token t+1+j (at least 2) [default: %(default)s]")
    parser.add_argument("--layers", type=int, default=4, help="Llama layers L: trunk L-1, head 0 the last (at least 2) [default: %(default)s]")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size [default: %(default)s]")
    parser.add_argument("--heads", type=int, default=4, help="attention heads [default: %(default)s]")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention) [default: %(default)s]")
    parser.add_argument("--intermediate", type=int, default=384, help="MLP width [default: %(default)s]")
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size, at least 259 (256 bytes + 3 specials) [default: %(default)s]")
    parser.add_argument("--context", type=int, default=128, help="training window in tokens (also the model's positions) [default: %(default)s]")
    parser.add_argument("--steps", type=int, default=300, help="training steps [default: %(default)s]")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step [default: %(default)s]")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (warm-up, then cosine decay) [default: %(default)s]")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts for the speculative decoding figures [default: %(default)s]")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="tokens of each prompt (cut from a held-out text) [default: %(default)s]")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt [default: %(default)s]")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds of greedy vs speculative decoding (medians) [default: %(default)s]")
    parser.add_argument("--router-encoder", type=Path, default=None,
                        help="sentence encoder of the (one-cluster) router the bundle needs [default: all-MiniLM-L6-v2]")
    parser.add_argument("--max-texts", type=int, default=None, help="use at most this many train and held-out texts each [default: all]")
    parser.add_argument("--out", type=Path, default=OUT / "mtp", help="output folder [default: %(default)s]")
    add_run_arguments(parser, "40 texts, a 2-layer model, 4 steps")
    args = parser.parse_args(argv)
    if args.short:
        args.max_texts, args.steps, args.prompts, args.rounds = 40, 4, 3, 1
        args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate = 2, 32, 2, 1, 64
        args.vocab, args.context, args.batch_size, args.new_tokens = min(args.vocab, 320), 64, 4, 8
    require(args.n_future >= 2, "--n-future", "at least 2 (head 0 and one drafting head)", args.n_future)
    require(args.layers >= 2, "--layers", "at least 2 (a trunk layer and head 0)", args.layers)
    require(args.vocab >= 259, "--vocab", "at least 259 (256 byte tokens and 3 special tokens)", args.vocab)
    for name in ("hidden", "heads", "kv_heads", "intermediate", "steps", "batch_size", "prompts", "prompt_tokens", "new_tokens",
                 "rounds", "threads"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')}", "at least 1", getattr(args, name))
    require(args.hidden % args.heads == 0 and (args.hidden // args.heads) % 2 == 0, "--hidden, --heads",
            "a hidden size that splits into heads of even width", f"{args.hidden}, {args.heads}")
    require(args.heads % args.kv_heads == 0, "--kv-heads", f"a divisor of --heads ({args.heads})", args.kv_heads)
    require(args.context >= 8, "--context", "at least 8 tokens", args.context)
    require(args.prompt_tokens + 1 + args.new_tokens <= args.context, "--prompt-tokens + --new-tokens",
            f"at most --context - 1 ({args.context - 1}) tokens, so decoding stays within the positions",
            args.prompt_tokens + args.new_tokens)
    require(args.lr > 0, "--lr", "a positive number", args.lr)
    require_file(args.corpus, "the corpus JSONL")
    if args.router_encoder is not None:
        require_dir(args.router_encoder, "a sentence-transformers folder")
    return args


def windows(tokenizer, texts: list[str], context: int) -> torch.Tensor:
    """Every text as `<s> ... </s>`, concatenated in the given order and cut into [N, context] windows."""
    stream = [i for ids in tokenizer(texts)["input_ids"] for i in ids + [tokenizer.eos_token_id]]
    count = len(stream) // context
    return torch.tensor(stream[: count * context]).reshape(count, context)


def make_model(args, vocab: int) -> MultiTokenLlama:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=args.context, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return MultiTokenLlama(LlamaForCausalLM(config), args.n_future)


@torch.no_grad()
def perplexities(model: MultiTokenLlama, data: torch.Tensor, batch_size: int) -> list[float]:
    """exp(mean cross-entropy) of every head on the windows (head j: the token j+1 places ahead)."""
    model.eval()
    totals = np.zeros(len(model.heads))
    for start in range(0, len(data), batch_size):
        ids = data[start : start + batch_size]
        trunk, context = model.trunk(ids)
        totals += [float(model.head_loss(j, trunk, context, ids)) * len(ids) for j in range(len(model.heads))]
    model.train()
    return [float(np.exp(t / len(data))) for t in totals]


def peak_memory(model: MultiTokenLlama, ids: torch.Tensor) -> dict[str, int]:
    """Peak bytes of the tensors one training step allocates (activations, gradients, temporaries), per order."""
    peaks = {}
    for order in ("naive", "memory_saving"):
        model.zero_grad(set_to_none=True)
        with PeakTensorMemory() as memory:
            getattr(model, f"step_{order}")(ids)
        peaks[order] = memory.peak_bytes
    model.zero_grad(set_to_none=True)
    return peaks


def train(model: MultiTokenLlama, data: torch.Tensor, args) -> list[list[float]]:
    """AdamW, linear warm-up over 5% of the steps then cosine decay; returns each step's per-head losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(data), generator=generator)
    curve, position, started = [], 0, time.perf_counter()
    model.train()
    for step in range(args.steps):
        if position + args.batch_size > len(order):
            order, position = torch.randperm(len(data), generator=generator), 0
        ids = data[order[position : position + args.batch_size]]
        position += args.batch_size
        optimizer.zero_grad(set_to_none=True)
        curve.append(model.step_memory_saving(ids))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            recent = np.mean(curve[-20:], axis=0)
            print(f"  step {step + 1:4d}/{args.steps}: loss per head (mean of the last {min(20, len(curve))} steps) "
                  + ", ".join(f"{x:.3f}" for x in recent) + f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    return curve


def plot_curves(curve: list[list[float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.array(curve)
    smooth = max(1, len(losses) // 50)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for j in range(losses.shape[1]):
        series = np.convolve(losses[:, j], np.ones(smooth) / smooth, mode="valid")
        axis.plot(np.arange(len(series)) + smooth, series, label=f"head {j} (token t+{j + 1})")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (train)")
    axis.set_title("multi-token prediction: training loss per head")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def speculative_figures(bundle: Path, prompts: list[list[int]], new_tokens: int, rounds: int) -> dict[str, float]:
    """Greedy and self-speculative decoding of each prompt with the bundle's dense graph on onnxruntime,
    round-robin; tokens must be identical (else exit 3). Acceptance over all drafts; decode ms medians over rounds."""
    from edgecompile.bundle.store import load_bundle
    from edgecompile.lowering.targets import target_from_dict
    from edgecompile.runtime.decode import greedy
    from edgecompile.runtime.sessions import create_session
    from edgecompile.runtime.speculative import speculative_greedy

    loaded = load_bundle(bundle)
    entry = loaded.target(None)
    session = create_session(loaded.graph_file(entry, "dense"), target_from_dict(entry["target"]), 1)
    plain_ms, fast_ms, drafted, accepted, passes, tokens = [], [], 0, 0, 0, 0
    for round_ in range(rounds + 1):  # round 0 warms up
        plain_total = fast_total = 0.0
        for prompt in prompts:
            plain = greedy(session, prompt, new_tokens)  # a fixed budget: no stop at end-of-sequence
            fast = speculative_greedy(session, prompt, new_tokens)
            if fast.tokens != plain.tokens:
                raise ParityError(f"{bundle}: speculative decoding gave {fast.tokens[:8]}..., greedy {plain.tokens[:8]}... "
                                  "for the same prompt; they must be identical")
            plain_total += float(np.sum(plain.decode_ms))
            fast_total += float(np.sum(fast.step_ms))
            if round_ == 0:
                drafted, accepted = drafted + fast.drafted, accepted + fast.accepted
                passes, tokens = passes + fast.forward_passes - 1, tokens + len(fast.tokens) - 1
        if round_ > 0:
            plain_ms.append(plain_total)
            fast_ms.append(fast_total)
    plain, fast = float(np.median(plain_ms)), float(np.median(fast_ms))
    return {"acceptance": accepted / drafted if drafted else 0.0, "tokens_per_pass": tokens / passes if passes else 0.0,
            "greedy_ms": plain, "speculative_ms": fast, "speedup": plain / fast if fast else float("nan")}


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    router_dir = args.router_encoder or minilm("pass --router-encoder DIR")
    from edgecompile.families import load_student

    router_spec = load_student(router_dir)
    require(router_spec.family == "sentence-transformers", f"{router_dir}", "a sentence-transformers folder (the router encoder)",
            router_spec.family)
    train_docs, held_docs = split(load_corpus(args.corpus))
    train_docs, held_docs = spread(train_docs, args.max_texts), spread(held_docs, args.max_texts)
    args.out.mkdir(parents=True, exist_ok=True)
    student_dir = args.out / "student"
    if student_dir.exists():
        shutil.rmtree(student_dir)

    phase(f"tokenizer: byte-level BPE, {args.vocab} tokens, trained on {len(train_docs)} train texts")
    tokenizer = train_bpe_tokenizer([d.text for d in train_docs], args.vocab, student_dir)  # <s> </s> <pad>: ids 0, 1, 2
    rng = np.random.default_rng(args.seed)
    train_data = windows(tokenizer, [train_docs[i].text for i in rng.permutation(len(train_docs))], args.context)
    held_data = windows(tokenizer, [d.text for d in held_docs], args.context)
    require(len(train_data) >= 1 and len(held_data) >= 1, "--context", "windows short enough for the texts",
            f"{len(train_data)} train and {len(held_data)} held-out windows of {args.context} tokens")
    print(f"  {len(train_data)} train windows, {len(held_data)} held-out windows of {args.context} tokens")

    model = make_model(args, len(tokenizer))
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: Llama, {args.layers} layers (trunk {args.layers - 1} + head 0) + {args.n_future - 1} extra head(s), hidden {args.hidden}, "
          f"{args.heads} heads / {args.kv_heads} KV heads, MLP {args.intermediate}, vocab {len(tokenizer)}: {parameters / 1e6:.2f} M parameters")
    peaks = peak_memory(model, train_data[: args.batch_size])
    print(f"peak tensor memory of one training step (batch {args.batch_size} x {args.context} tokens; activations, gradients, "
          f"temporaries; weights excluded): naive order {peaks['naive'] / 2**20:.1f} MiB, memory-saving order "
          f"{peaks['memory_saving'] / 2**20:.1f} MiB ({peaks['memory_saving'] / peaks['naive']:.2f} of naive)")

    before = perplexities(model, held_data, args.batch_size)
    t = phase(f"training {args.steps} steps, memory-saving order (held-out perplexity per head before: "
              + ", ".join(f"{p:.0f}" for p in before) + ")")
    curve = train(model, train_data, args)
    done(t)
    plot = plot_curves(curve, args.out / "loss_curves.png")
    after = perplexities(model, held_data, args.batch_size)
    print("\n| head | predicts | held-out perplexity (untrained) | held-out perplexity (trained) |\n|---|---|---:|---:|")
    for j, (p0, p1) in enumerate(zip(before, after)):
        print(f"| {j} | token t+{j + 1} | {p0:.1f} | {p1:.2f} |")
    first, last = np.mean(curve[:10], axis=0), np.mean(curve[-10:], axis=0)
    print("train loss per head, first 10 -> last 10 steps: "
          + ", ".join(f"head {j} {a:.3f} -> {b:.3f}" for j, (a, b) in enumerate(zip(first, last))) + f"; plot {plot}")

    model.save(student_dir)
    (args.out / "loss_curve.json").write_text(json.dumps(curve) + "\n")
    print(f"wrote {student_dir} (LlamaForCausalLM + extra_heads.*, n_future_tokens = {args.n_future})")

    phase("compiling with edgecompile build (every head's logits and the speculative path are parity-checked)")
    prompts = [ids[: args.prompt_tokens] for ids in tokenizer([d.text for d in held_docs])["input_ids"]]
    prompts = [p for p in prompts if len(p) == args.prompt_tokens][: args.prompts]
    require(len(prompts) >= 1, "--prompt-tokens", "held-out texts at least that long", args.prompt_tokens)
    # The build tokenizes the sample lines itself (and prepends <s>): give it the prompts' text.
    samples = [tokenizer.decode(p[1:]).replace("\n", " ") for p in prompts]
    masks = write_trivial_masks(args.out / "masks.safetensors", args.layers, router_spec.embedding_dim)
    bundle = build_bundle(student_dir, masks, router_dir, args.out / "bundle", samples)

    phase(f"decoding {len(prompts)} held-out prompts ({args.prompt_tokens} tokens each, {args.new_tokens} new tokens) "
          f"greedily and speculatively with the bundle's dense graph on onnxruntime, {args.rounds} round(s)")
    figures = speculative_figures(bundle, prompts, args.new_tokens, args.rounds)
    print(f"self-speculative decoding (the {args.n_future - 1} extra head(s) draft, head 0 verifies; tokens identical to greedy): "
          f"acceptance rate {figures['acceptance']:.3f}, {figures['tokens_per_pass']:.2f} tokens per forward pass, "
          f"decode {figures['speculative_ms']:.1f} ms vs greedy {figures['greedy_ms']:.1f} ms for all prompts "
          f"(speed-up {figures['speedup']:.2f}x; medians of {args.rounds} round(s), 1 thread; {cpu_flags()})")
    finished(started)


if __name__ == "__main__":
    run_recipe(main)
