"""Recipe 1: input-guided block pruning (IG-Pruning, stage 1) on all-MiniLM-L6-v2, compiled by edgecompile.

1. The router's encoder embeds the calibration texts (the corpus' train split); scikit-learn's KMeans
   groups them into K clusters. The router is that encoder plus the K centroids. By default the encoder
   is a model2vec static-embedding model distilled from the student (model2vec.distill, once, cached in
   --out): a router that costs well under 1% of the student, so routing pays end to end. `--full-router`
   routes with the student's own encoder instead (as IG-Pruning's paper does; it costs as much as the
   student), `--router-encoder DIR [--router-layers n]` with any encoder edgecompile accepts.
2. Per cluster, hard-concrete gates over the 2L sub-layers (attention and FFN of every layer) are trained
   on that cluster's texts: the student (the same model, weights frozen) with sampled gates is distilled
   toward the dense model's sentence embeddings, and an L0 penalty (augmented Lagrangian) drives the
   expected number of kept sub-layers to the target. The file gets hard gates: the `kept` sub-layers with the largest log_alpha.
3. The static-pruning baseline: ONE mask, trained the same way on all texts, at the same sparsity.
4. Held-out texts are routed by the router; every figure compares against the dense model: sentence-
   embedding cosine, and retrieval agreement (recall@10 of each text's nearest held-out neighbours).
5. `edgecompile build` compiles the masks (parity-gated), `edgecompile bench` times the graphs.

Gates live where the parity oracle reads them (edgecompile.reference.masks.GatedLinear), and the
sampler and the L0 penalty are edgecompile.reference.hard_concrete, so what is trained is what compiles.

    python examples/recipe_ig_pruning.py             # defaults: K = 4, half the sub-layers, model2vec router (minutes on 2 cores)
    python examples/recipe_ig_pruning.py --full-router   # route with all-MiniLM-L6-v2 itself (examples/masks/ came from this)
    python examples/recipe_ig_pruning.py --short     # seconds: checks the pipeline end to end, figures meaningless
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from corpus import CORPUS_FILE, load_corpus, split, spread  # noqa: E402
from mask_training import add_mask_arguments, check_mask_arguments, layout, train_block_mask  # noqa: E402
from common import (OUT, RecipeParser, add_run_arguments, bench_report, build_bundle, cpu_flags, done,  # noqa: E402
                    finished, length_batches, minilm, phase, recall_at_k, require, require_dir, require_file,
                    run_recipe, sentence_embeddings, write_masks)
from fit_router_centroids import distill_static_router, embed, nearest  # noqa: E402

from edgecompile.inputs.masks import ClusterMasks  # noqa: E402
from edgecompile.inputs.router import router_metadata  # noqa: E402
from edgecompile.families.router import load_router  # noqa: E402
from edgecompile.families import load_student  # noqa: E402
from edgecompile.inputs.tokens import load_tokenizer  # noqa: E402
from edgecompile.reference.gate_training import set_block_gates  # noqa: E402
from edgecompile.families.bert import bert_gates  # noqa: E402
from edgecompile.reference.masks import ModelGates  # noqa: E402
from edgecompile.families.bert_model import load_student_module  # noqa: E402


def parse_args(argv: list[str] | None):
    parser = RecipeParser(prog="recipe_ig_pruning.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="sentence-transformers BERT folder: teacher, student and router encoder [default: all-MiniLM-L6-v2]")
    parser.add_argument("--corpus", type=Path, default=CORPUS_FILE, help="corpus JSONL (examples/corpus.py) [default: %(default)s]")
    router = parser.add_mutually_exclusive_group()
    router.add_argument("--router-encoder", type=Path, default=None,
                        help="the router's encoder: a model2vec or sentence-transformers folder [default: model2vec distilled "
                             "from --model once, cached in --out/router_model2vec]")
    router.add_argument("--full-router", action="store_true",
                        help="route with --model itself (costs as much as the student; examples/masks/ was made so)")
    parser.add_argument("--router-layers", type=int, default=None, help="truncate a transformer --router-encoder to its first n layers")
    add_mask_arguments(parser)
    parser.add_argument("--max-texts", type=int, default=None, help="use at most this many train and held-out texts each [default: all]")
    parser.add_argument("--bench-runs", type=int, default=30, help="edgecompile bench --runs [default: %(default)s]")
    parser.add_argument("--out", type=Path, default=OUT / "ig_pruning", help="output folder [default: %(default)s]")
    add_run_arguments(parser, "K=2, 2 steps, 40 texts, a model2vec router of their vocabulary only")
    args = parser.parse_args(argv)
    if args.short:
        args.clusters, args.steps, args.max_texts, args.bench_runs = min(args.clusters, 2), 2, 40, 3
    check_mask_arguments(args)
    for name in ("threads", "bench_runs"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')}", "at least 1", getattr(args, name))
    require_file(args.corpus, "the corpus JSONL")
    if args.router_encoder is not None:
        require_dir(args.router_encoder, "--router-encoder")
    require(args.router_layers is None or (args.router_encoder is not None and args.router_layers >= 1), "--router-layers",
            "a number of layers >= 1, with --router-encoder", args.router_layers)
    return args


def model2vec_router(model_dir: Path, width: int, folder: Path, only_texts: list[str] | None = None) -> Path:
    """A static-embedding router distilled from the student by model2vec (once; reused while its source and
    vocabulary are the same). `only_texts` (--short): only the vocabulary entries of these texts."""
    stamp = folder / "distilled_from.txt"
    source = str(model_dir.resolve())
    if only_texts is not None:
        source += f"\nvocabulary of {len(only_texts)} texts, sha256 {hashlib.sha256(chr(0).join(only_texts).encode()).hexdigest()}"
    if (folder / "model.safetensors").is_file() and stamp.is_file() and stamp.read_text() == source:
        return folder
    distill_static_router(model_dir, width, folder, "pass --router-encoder DIR or --full-router", only_texts)
    stamp.write_text(source)
    return folder


@torch.no_grad()
def embed_with(student, gates: ModelGates, blocks: np.ndarray, batches: list, count: int) -> torch.Tensor:
    """Sentence embeddings with hard block gates loaded exactly as the parity oracle loads them."""
    layers = len(gates.sites)
    set_block_gates(gates, torch.ones(layers, 2))  # plain buffers again, then the oracle's own loader
    config = student.bert.config
    gates.set(ClusterMasks(0, blocks, np.ones((layers, config.num_attention_heads), np.float32),
                           np.ones((layers, config.intermediate_size), np.float32)))
    return sentence_embeddings(student, batches, count)


@dataclass
class Quality:
    cosine: float
    recall: float


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model or minilm("pass --model DIR")
    model_name = "all-MiniLM-L6-v2" if args.model is None else model_dir.name
    spec = load_student(model_dir)
    require(spec.family == "sentence-transformers", f"{model_dir}", "a sentence-transformers BERT folder", spec.family)
    train_docs, held_docs = split(load_corpus(args.corpus))
    train_texts = [d.text for d in spread(train_docs, args.max_texts)]
    held_texts = [d.text for d in spread(held_docs, args.max_texts)]
    require(args.clusters <= len(train_texts), "--clusters", f"at most the number of calibration texts ({len(train_texts)})", args.clusters)
    layers = spec.num_layers
    kept = round((1.0 - args.sparsity) * 2 * layers)
    args.out.mkdir(parents=True, exist_ok=True)

    phase(f"embedding {len(train_texts)} calibration and {len(held_texts)} held-out texts with {model_name}")
    student = load_student_module(spec)
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    tokenizer = load_tokenizer(spec.transformer_dir)
    train_batches = length_batches(tokenizer, train_texts, args.batch_size, args.max_length)
    held_batches = length_batches(tokenizer, held_texts, args.batch_size, args.max_length)
    dense_train = sentence_embeddings(student, train_batches, len(train_texts))
    dense_held = sentence_embeddings(student, held_batches, len(held_texts))

    if args.full_router:  # the router's embeddings are the student's own sentence embeddings
        router_dir, router_train, router_held = model_dir, dense_train.numpy(), dense_held.numpy()
    else:
        router_dir = args.router_encoder or model2vec_router(model_dir, spec.embedding_dim, args.out / "router_model2vec",
                                                             train_texts + held_texts if args.short else None)
        phase(f"embedding the texts with the router's encoder ({router_dir.name}), exactly as the router graph does")
        router_train = embed(router_dir, train_texts, args.router_layers)
        router_held = embed(router_dir, held_texts, args.router_layers)
    router_spec = load_router(router_dir, None if args.full_router else args.router_layers)
    print(f"router: {router_spec.description}, {router_train.shape[1]}-d embeddings")

    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=args.clusters, n_init=10, random_state=args.seed).fit(router_train.astype(np.float64))
    centroids = kmeans.cluster_centers_.astype(np.float32)
    train_cluster = kmeans.labels_
    held_cluster = nearest(router_held, centroids)  # the router graph's rule: the l2-nearest centroid
    print(f"KMeans: K = {args.clusters}; calibration texts per cluster {np.bincount(train_cluster, minlength=args.clusters).tolist()}, "
          f"held-out texts routed per cluster {np.bincount(held_cluster, minlength=args.clusters).tolist()}")

    gates = bert_gates(student.bert)

    def distillation(targets: torch.Tensor):
        """1 - cosine to the dense sentence embeddings (`targets`, rows by the batch's text index)."""
        def loss(batch: dict, blocks: torch.Tensor) -> torch.Tensor:
            set_block_gates(gates, blocks)
            embedding = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[1]
            return (1.0 - torch.nn.functional.cosine_similarity(embedding, targets[batch["index"]], dim=1)).mean()
        return loss

    masks: dict[int, np.ndarray] = {}
    losses: dict[str, float] = {}
    t = phase(f"training hard-concrete masks, {args.steps} steps each: keep {kept} of {2 * layers} sub-layers (sparsity {args.sparsity})")
    for k in range(args.clusters):
        members = [i for i in range(len(train_texts)) if train_cluster[i] == k]
        batches = length_batches(tokenizer, [train_texts[i] for i in members], args.batch_size, args.max_length)
        masks[k], losses[f"cluster {k}"] = train_block_mask(gates, batches, kept, args, args.seed + k, distillation(dense_train[members]))
        print(f"  cluster {k}: {len(members):4d} texts, final distillation loss {losses[f'cluster {k}']:.4f}, keeps {layout(masks[k])}", flush=True)
    static, losses["static"] = train_block_mask(gates, train_batches, kept, args, args.seed + 1000, distillation(dense_train))
    print(f"  static  : {len(train_texts):4d} texts, final distillation loss {losses['static']:.4f}, keeps {layout(static)}")
    done(t)

    phase("evaluating on held-out texts (router picks the cluster; compared against the dense model)")
    routed = torch.zeros_like(dense_held)
    for k in range(args.clusters):
        members = [i for i in range(len(held_texts)) if held_cluster[i] == k]
        if members:
            batches = length_batches(tokenizer, [held_texts[i] for i in members], args.batch_size, args.max_length)
            routed[members] = embed_with(student, gates, masks[k], batches, len(members))
    static_held = embed_with(student, gates, static, held_batches, len(held_texts))
    gates.remove()

    def quality(embeddings: torch.Tensor, rows: np.ndarray) -> Quality:
        cosine = torch.nn.functional.cosine_similarity(embeddings[rows], dense_held[rows], dim=1).mean()
        recall = recall_at_k(dense_held.numpy(), embeddings.numpy(), 10, rows)
        return Quality(float(cosine), recall)

    print(f"\nIG-Pruning stage 1, {model_name}: keep {kept} of {2 * layers} sub-layers per cluster "
          f"(A = attention, F = FFN, - = removed); quality vs dense on held-out texts")
    print("| mask | held-out texts | sub-layers kept | cosine | recall@10 | static mask: cosine | static: recall@10 |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for k in range(args.clusters):
        rows = np.flatnonzero(held_cluster == k)
        if rows.size == 0:
            print(f"| cluster {k} | 0 | {layout(masks[k])} | — | — | — | — |")
            continue
        q, s = quality(routed, rows), quality(static_held, rows)
        print(f"| cluster {k} | {rows.size} | {layout(masks[k])} | {q.cosine:.4f} | {q.recall:.3f} | {s.cosine:.4f} | {s.recall:.3f} |")
    everything = np.arange(len(held_texts))
    q, s = quality(routed, everything), quality(static_held, everything)
    print(f"| **routed (all held-out)** | {len(held_texts)} | per cluster | {q.cosine:.4f} | {q.recall:.3f} | {s.cosine:.4f} | {s.recall:.3f} |")
    print(f"| static mask | {len(held_texts)} | {layout(static)} | {s.cosine:.4f} | {s.recall:.3f} | | |")

    masks_file = args.out / "masks.safetensors"
    write_masks(masks_file, {k: {"blocks": m} for k, m in masks.items()}, centroids,
                metadata={"mask.kind": "hard", **router_metadata(router_spec)})
    print(f"\nwrote {masks_file} (K = {args.clusters}, hard block gates, l2 centroids for the router {router_spec.name})")

    phase("compiling with edgecompile build")
    samples = [held_texts[i] for i in np.linspace(0, len(held_texts) - 1, min(24, len(held_texts))).astype(int)]
    bundle = build_bundle(model_dir, masks_file, router_dir, args.out / "bundle", samples,
                          router_layers=None if args.full_router else args.router_layers)
    report, sequence = bench_report(bundle, args.bench_runs)
    graphs, routed = {row["graph"]: row for row in report["graphs"]}, report["routed"]
    clusters = [graphs[f"cluster_{k}"]["p50_ms"] for k in range(args.clusters)]
    print(f"\ngraphs alone (batch 1, sequence {sequence}, 1 thread, p50): dense {graphs['dense']['p50_ms']:.2f} ms, "
          f"clusters {min(clusters):.2f}-{max(clusters):.2f} ms ({min(clusters) / graphs['dense']['p50_ms']:.2f}-"
          f"{max(clusters) / graphs['dense']['p50_ms']:.2f} of dense), router ({router_spec.name}) {graphs['router']['p50_ms']:.3f} ms")
    print(f"end-to-end routed latency (router + the cluster it picks, on {routed['source']} at their own lengths): "
          f"p50 {routed['routed_p50_ms']:.2f} ms vs dense {routed['dense_p50_ms']:.2f} ms on the same inputs "
          f"(ratio {routed['routed_vs_dense']:.2f}; the router is {routed['router_share']:.0%} of it); "
          f"plot {bundle.parent / (bundle.name + '_bench.png')}; {cpu_flags()}")
    finished(started)


if __name__ == "__main__":
    run_recipe(main)
