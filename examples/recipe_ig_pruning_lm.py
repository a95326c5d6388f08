"""Recipe 1 on a causal LM: input-guided block pruning (IG-Pruning, stage 1) of recipe 4's small Llama.

The same steps as recipe_ig_pruning.py, with a language model as the student:
1. The router's sentence encoder (all-MiniLM-L6-v2) embeds the calibration texts; KMeans makes K clusters.
2. Per cluster, hard-concrete gates over the LM's 2L sub-layers (attention and MLP of every layer,
   head 0's layer included; extra multi-token heads are never pruned) are trained on that cluster's
   texts, distilling the dense LM's next-token distributions (KL per real token), with the L0
   augmented Lagrangian toward the target; the file gets the `kept` sub-layers with the largest log_alpha.
3. The static baseline: one mask trained the same way on all texts.
4. Held-out texts routed by the router: perplexity of the routed masks, of the static mask and of
   the dense model on the same texts.
5. `edgecompile build` compiles the masks into a decoder bundle (greedy tokens parity-gated);
   `edgecompile bench` times prefill and decode per token of every graph against dense.

    python examples/recipe_mtp.py                    # first: trains the LM (examples/out/mtp/student)
    python examples/recipe_ig_pruning_lm.py          # defaults: K = 4, half the sub-layers
    python examples/recipe_ig_pruning_lm.py --short  # seconds: checks the pipeline, figures meaningless
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from corpus import CORPUS_FILE, load_corpus, split, spread  # noqa: E402
from mask_training import add_mask_arguments, check_mask_arguments, layout, train_block_mask  # noqa: E402
from common import (OUT, RecipeParser, add_run_arguments, build_bundle, cpu_flags, done, edgecompile, finished,  # noqa: E402
                    length_batches, minilm, phase, require, require_dir, require_file, run_recipe,
                    sentence_embeddings, write_masks)

from edgecompile.families.llama import Llama  # noqa: E402
from edgecompile.inputs.masks import ClusterMasks  # noqa: E402
from edgecompile.families import load_student  # noqa: E402
from edgecompile.inputs.tokens import load_tokenizer  # noqa: E402
from edgecompile.reference.gate_training import set_block_gates  # noqa: E402
from edgecompile.reference.masks import ModelGates  # noqa: E402
from edgecompile.reference.router import RouterModule  # noqa: E402
from edgecompile.families.bert_model import load_student_module  # noqa: E402


def parse_args(argv: list[str] | None):
    parser = RecipeParser(prog="recipe_ig_pruning_lm.py", description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, default=OUT / "mtp" / "student",
                        help="LlamaForCausalLM folder (recipe_mtp.py's output, or any Llama edgecompile builds) [default: %(default)s]")
    parser.add_argument("--router-encoder", type=Path, default=None, help="sentence-transformers folder of the router [default: all-MiniLM-L6-v2]")
    parser.add_argument("--corpus", type=Path, default=CORPUS_FILE, help="corpus JSONL (examples/corpus.py) [default: %(default)s]")
    add_mask_arguments(parser)
    parser.add_argument("--samples", type=int, default=16, help="held-out prompts for the build's parity gate [default: %(default)s]")
    parser.add_argument("--prompt-tokens", type=int, default=24, help="tokens of each parity prompt [default: %(default)s]")
    parser.add_argument("--max-texts", type=int, default=None, help="use at most this many train and held-out texts each [default: all]")
    parser.add_argument("--bench-runs", type=int, default=5, help="edgecompile bench --runs (rounds of 64 + 64 tokens) [default: %(default)s]")
    parser.add_argument("--out", type=Path, default=OUT / "ig_pruning_lm", help="output folder [default: %(default)s]")
    add_run_arguments(parser, "K=2, 2 steps, 40 texts")
    args = parser.parse_args(argv)
    if args.short:
        args.clusters, args.steps, args.max_texts, args.samples, args.bench_runs = min(args.clusters, 2), 2, 40, 3, 3
    check_mask_arguments(args)
    for name in ("samples", "prompt_tokens", "threads"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')}", "at least 1", getattr(args, name))
    require(args.bench_runs >= 3, "--bench-runs", "at least 3", args.bench_runs)
    require_file(args.corpus, "the corpus JSONL")
    require_dir(args.student, "a LlamaForCausalLM folder (run examples/recipe_mtp.py first, or pass --student)")
    if args.router_encoder is not None:
        require_dir(args.router_encoder, "a sentence-transformers folder")
    return args


def lm_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """`<s> text </s>` (cut to max_length), batched by length, padded on the right, with the texts' indices."""
    ids = [(row + [tokenizer.eos_token_id])[:max_length] for row in tokenizer(texts)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chosen)
        input_ids = torch.full((len(chosen), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, i in enumerate(chosen):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask, "index": torch.tensor(chosen)})
    return batches


def next_token_log_probs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at every position that has a real next token [N, V], and those tokens [N]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    real = batch["attention_mask"][:, 1:].bool()
    return F.log_softmax(logits[real], dim=-1), batch["input_ids"][:, 1:][real]


def distillation(model, gates: ModelGates):
    """KL(dense || pruned) of the next-token distributions per real token: the dense targets with every
    gate 1, then the student with the sampled gates."""
    def loss(batch: dict, blocks: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            set_block_gates(gates, torch.ones_like(blocks))
            dense, _ = next_token_log_probs(model, batch)
        set_block_gates(gates, blocks)
        pruned, _ = next_token_log_probs(model, batch)
        return F.kl_div(pruned, dense, log_target=True, reduction="batchmean")
    return loss


@torch.no_grad()
def token_losses(model, gates: ModelGates, blocks: np.ndarray, batches: list, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per text: summed next-token cross-entropy and number of predicted tokens, with hard gates set as the oracle sets them."""
    layers = len(gates.sites)
    set_block_gates(gates, torch.ones(layers, 2))  # plain buffers again, then the oracle's own loader
    config = model.config
    gates.set(ClusterMasks(0, blocks, np.ones((layers, config.num_attention_heads), np.float32),
                           np.ones((layers, config.intermediate_size), np.float32)))
    total, tokens = np.zeros(count), np.zeros(count)
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        losses = F.cross_entropy(logits.transpose(1, 2), b["input_ids"][:, 1:], reduction="none") * b["attention_mask"][:, 1:]
        total[b["index"].numpy()] = losses.sum(1).numpy()
        tokens[b["index"].numpy()] = b["attention_mask"][:, 1:].sum(1).numpy()
    return total, tokens


def perplexity(losses: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> float:
    total, tokens = losses
    return float(np.exp(total[rows].sum() / tokens[rows].sum()))


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    router_dir = args.router_encoder or minilm("pass --router-encoder DIR")
    router_spec, spec = load_student(router_dir), load_student(args.student)
    require(router_spec.family == "sentence-transformers", f"{router_dir}", "a sentence-transformers folder (the router encoder)", router_spec.family)
    require(spec.family == "llama", f"{args.student}", "a LlamaForCausalLM folder", spec.family)
    train_docs, held_docs = split(load_corpus(args.corpus))
    train_texts = [d.text for d in spread(train_docs, args.max_texts)]
    held_texts = [d.text for d in spread(held_docs, args.max_texts)]
    require(args.clusters <= len(train_texts), "--clusters", f"at most the number of calibration texts ({len(train_texts)})", args.clusters)
    args.out.mkdir(parents=True, exist_ok=True)

    phase(f"routing: embedding {len(train_texts)} calibration and {len(held_texts)} held-out texts with {router_dir.name}")
    encoder = load_student_module(router_spec)
    router_tokenizer = load_tokenizer(router_spec.transformer_dir)
    router_train = sentence_embeddings(encoder, length_batches(router_tokenizer, train_texts, 32, 128), len(train_texts))
    router_held = sentence_embeddings(encoder, length_batches(router_tokenizer, held_texts, 32, 128), len(held_texts))
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=args.clusters, n_init=10, random_state=args.seed).fit(router_train.numpy().astype(np.float64))
    centroids = kmeans.cluster_centers_.astype(np.float32)
    train_cluster = kmeans.labels_
    held_cluster = RouterModule(encoder, centroids, "l2").distances(router_held).argmin(dim=1).numpy()
    print(f"KMeans: K = {args.clusters}; calibration texts per cluster {np.bincount(train_cluster, minlength=args.clusters).tolist()}, "
          f"held-out texts routed per cluster {np.bincount(held_cluster, minlength=args.clusters).tolist()}")

    model = Llama.load_reference(args.student)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    tokenizer = load_tokenizer(args.student)
    layers = model.config.num_hidden_layers
    kept = round((1.0 - args.sparsity) * 2 * layers)
    gates = Llama.gates(model, Llama.dims(model.config.to_dict()))
    train_batches = lm_batches(tokenizer, train_texts, args.batch_size, args.max_length)
    held_batches = lm_batches(tokenizer, held_texts, args.batch_size, args.max_length)

    masks: dict[int, np.ndarray] = {}
    t = phase(f"training hard-concrete masks, {args.steps} steps each: keep {kept} of {2 * layers} sub-layers (sparsity {args.sparsity})")
    for k in range(args.clusters):
        members = [i for i in range(len(train_texts)) if train_cluster[i] == k]
        batches = lm_batches(tokenizer, [train_texts[i] for i in members], args.batch_size, args.max_length)
        masks[k], loss = train_block_mask(gates, batches, kept, args, args.seed + k, distillation(model, gates))
        print(f"  cluster {k}: {len(members):4d} texts, final KL to dense {loss:.4f}, keeps {layout(masks[k])}", flush=True)
    static, loss = train_block_mask(gates, train_batches, kept, args, args.seed + 1000, distillation(model, gates))
    print(f"  static  : {len(train_texts):4d} texts, final KL to dense {loss:.4f}, keeps {layout(static)}")
    done(t)

    phase("held-out perplexity (the router picks the cluster; beside the static mask and the dense model on the same texts)")
    count = len(held_texts)
    dense = token_losses(model, gates, np.ones((layers, 2), np.float32), held_batches, count)
    static_losses = token_losses(model, gates, static, held_batches, count)
    routed_total, routed_tokens = np.zeros(count), np.zeros(count)
    for k in range(args.clusters):
        rows = np.flatnonzero(held_cluster == k)
        if rows.size:
            total, tokens = token_losses(model, gates, masks[k], held_batches, count)
            routed_total[rows], routed_tokens[rows] = total[rows], tokens[rows]
    routed = (routed_total, routed_tokens)
    gates.remove()
    print(f"\nIG-Pruning stage 1 on the causal LM {args.student}: keep {kept} of {2 * layers} sub-layers per cluster "
          f"(A = attention, F = MLP, - = removed); held-out perplexity")
    print("| mask | held-out texts | sub-layers kept | perplexity | static mask: perplexity | dense: perplexity |")
    print("|---|---:|---|---:|---:|---:|")
    for k in range(args.clusters):
        rows = np.flatnonzero(held_cluster == k)
        if rows.size == 0:
            print(f"| cluster {k} | 0 | {layout(masks[k])} | — | — | — |")
            continue
        print(f"| cluster {k} | {rows.size} | {layout(masks[k])} | {perplexity(routed, rows):.2f} | "
              f"{perplexity(static_losses, rows):.2f} | {perplexity(dense, rows):.2f} |")
    everything = np.arange(count)
    print(f"| **routed (all held-out)** | {count} | per cluster | {perplexity(routed, everything):.2f} | "
          f"{perplexity(static_losses, everything):.2f} | {perplexity(dense, everything):.2f} |")
    print(f"| static mask | {count} | {layout(static)} | {perplexity(static_losses, everything):.2f} | | |")

    masks_file = args.out / "masks.safetensors"
    write_masks(masks_file, {k: {"blocks": m} for k, m in masks.items()}, centroids, metadata={"mask.kind": "hard"})
    print(f"\nwrote {masks_file} (K = {args.clusters}, hard block gates, l2 router centroids)")

    phase("compiling with edgecompile build (greedy tokens of every graph parity-gated)")
    prompts = [ids[1 : 1 + args.prompt_tokens] for ids in tokenizer(held_texts)["input_ids"]]
    samples = [tokenizer.decode(p).replace("\n", " ") for p in prompts if len(p) == args.prompt_tokens][: args.samples]
    require(len(samples) >= 1, "--prompt-tokens", "held-out texts at least that long", args.prompt_tokens)
    bundle = build_bundle(args.student, masks_file, router_dir, args.out / "bundle", samples)
    report = args.out / "bundle_bench.json"
    positions = json.loads((bundle / "manifest.json").read_text())["student"]["max_seq_length"]
    edgecompile("bench", bundle, "--runs", args.bench_runs, "--prompt-tokens", positions // 2, "--new-tokens", positions // 2,
                "--json", report)
    rows = {row["graph"]: row for row in json.loads(report.read_text())["graphs"]}
    clusters = [rows[f"cluster_{k}"] for k in range(args.clusters)]
    print(f"\ndecode per token (median of {args.bench_runs} rounds of a {positions // 2} + {positions // 2}-token generation, 1 thread): dense {rows['dense']['decode_ms_per_token']:.3f} ms, clusters "
          + ", ".join(f"{r['decode_ms_per_token']:.3f}" for r in clusters) + " ms (speed-up vs dense "
          + ", ".join(f"{r['decode_speedup_vs_dense']:.2f}x" for r in clusters) + "); the router runs once per prompt; "
          f"{cpu_flags()}")
    finished(started)


if __name__ == "__main__":
    run_recipe(main)
