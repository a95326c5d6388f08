"""Recipe 3: a small routing space learned with a selectable cross-batch memory (S-XBM), compiled by edgecompile.

The router measures distances between a text's sentence embedding and K centroids. This recipe learns
a linear projection (384 -> 128 by default) that keeps the frozen encoder's similarities, so routing
(and any nearest-neighbour use of the router's space) happens in the small space:

1. The encoder is frozen: every text is embedded once.
2. Per step, a batch of embeddings is projected; its candidates are the batch itself and a FIFO memory
   of past batches' encoder embeddings (enqueued after each step, oldest dequeued first), as in
   cross-batch memory (XBM): the memory spares the costly encoder pass, and the cheap projection is
   re-applied to it each step (stored projections went stale and cost recall). The cosine score
   matrices of the frozen and the projected space are compared on the top-k hard pairs of each query
   only (selectable: its k truest neighbours and its k strongest projected impostors), with a
   squared-error pair loss.
3. Retrieval agreement: recall@10 of the projected space against the full one on held-out texts,
   trained with and without the memory (same steps, same seed), beside a PCA projection of the same width.
4. The projection goes into the masks file as router.projection.* with the clusters' centroids in the
   projected space (cosine metric); the gates come from `--masks` (by default the learned IG-Pruning
   masks checked in from recipe 1 run with MiniLM as its router: centroids in its 384-d space). Routing agreement with the full-space router is printed; then
   `edgecompile build` compiles it (the router graph applies the projection before the distances).

    python examples/recipe_sxbm_projection.py            # defaults (a few minutes on 2 cores)
    python examples/recipe_sxbm_projection.py --short    # seconds: checks the pipeline, figures meaningless
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from corpus import CORPUS_FILE, load_corpus, split, spread  # noqa: E402
from common import (HERE, OUT, RecipeParser, add_run_arguments, build_bundle, done, finished, length_batches,  # noqa: E402
                    minilm, phase, recall_at_k, require, require_file, run_recipe, sentence_embeddings)

from edgecompile.inputs.masks import load_masks  # noqa: E402
from edgecompile.inputs.router import check_masks_router  # noqa: E402
from edgecompile.families.router import load_router  # noqa: E402
from edgecompile.families import load_student  # noqa: E402
from edgecompile.inputs.tokens import load_tokenizer  # noqa: E402
from edgecompile.reference.router import RouterModule  # noqa: E402
from edgecompile.families.bert_model import load_student_module  # noqa: E402

LEARNED_MASKS = HERE / "masks" / "minilm_ig_pruning_k4_full_router.safetensors"  # centroids in MiniLM's own 384-d space


def parse_args(argv: list[str] | None):
    parser = RecipeParser(prog="recipe_sxbm_projection.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="sentence-transformers BERT folder: the frozen router encoder and the student [default: all-MiniLM-L6-v2]")
    parser.add_argument("--masks", type=Path, default=LEARNED_MASKS, help="masks file whose gates and clusters are kept [default: %(default)s]")
    parser.add_argument("--corpus", type=Path, default=CORPUS_FILE, help="corpus JSONL (examples/corpus.py) [default: %(default)s]")
    parser.add_argument("--width", type=int, default=128, help="projection width D' (at most the encoder's width) [default: %(default)s]")
    parser.add_argument("--memory", type=int, default=256, help="cross-batch memory size in embeddings (0 = none) [default: %(default)s]")
    parser.add_argument("--top-k", type=int, default=20, help="hard pairs per query and kind (true neighbours, impostors) [default: %(default)s]")
    parser.add_argument("--steps", type=int, default=600, help="[default: %(default)s]")
    parser.add_argument("--batch-size", type=int, default=64, help="[default: %(default)s]")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate [default: %(default)s]")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text when embedding [default: %(default)s]")
    parser.add_argument("--max-texts", type=int, default=None, help="use at most this many train and held-out texts each [default: all]")
    parser.add_argument("--out", type=Path, default=OUT / "sxbm_projection", help="output folder [default: %(default)s]")
    add_run_arguments(parser, "40 texts, 5 steps, width and memory at most 32")
    args = parser.parse_args(argv)
    if args.short:
        # 40 texts give PCA (the baseline) at most 39 components: a 32-d projection still compares all three
        args.steps, args.max_texts, args.memory, args.width = 5, 40, min(args.memory, 32), min(args.width, 32)
    for name in ("width", "top_k", "steps", "batch_size", "max_length", "threads"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')}", "at least 1", getattr(args, name))
    require(args.memory >= 0, "--memory", "0 (no memory) or more embeddings", args.memory)
    require(args.lr > 0, "--lr", "a positive number", args.lr)
    require_file(args.corpus, "the corpus JSONL")
    require_file(args.masks, "a masks file (edgecompile-masks/1)")
    return args


class CrossBatchMemory:
    """FIFO of past batches' frozen-encoder embeddings (the costly part to recompute): enqueue the
    newest batch, dequeue the oldest. Each step projects them with the current weights, so the pairs
    they form stay consistent while the projection moves fast (stored projections go stale)."""

    def __init__(self, size: int, width: int) -> None:
        self.size = size
        self.frozen = torch.zeros(0, width)

    def enqueue(self, frozen: torch.Tensor) -> None:
        if self.size:
            self.frozen = torch.cat([self.frozen, frozen.detach()])[-self.size:]


def selected_pair_loss(frozen: torch.Tensor, projection: torch.nn.Linear, memory: CrossBatchMemory, top_k: int) -> torch.Tensor:
    """Squared error between projected and frozen cosine scores on each query's top-k hard pairs."""
    candidates_frozen = torch.cat([frozen, memory.frozen])
    candidates_projected = F.normalize(projection(candidates_frozen), dim=1)
    projected = candidates_projected[: len(frozen)]
    target = frozen @ candidates_frozen.T  # [B, B + M], both sides unit length
    scores = projected @ candidates_projected.T
    self_pair = torch.zeros_like(target, dtype=torch.bool)
    self_pair[:, : len(frozen)] = torch.eye(len(frozen), dtype=torch.bool)
    k = min(top_k, target.shape[1] - 1)
    chosen = torch.zeros_like(self_pair)
    chosen.scatter_(1, target.masked_fill(self_pair, -2.0).topk(k, dim=1).indices, True)  # true neighbours
    chosen.scatter_(1, scores.detach().masked_fill(self_pair, -2.0).topk(k, dim=1).indices, True)  # impostors
    return ((scores - target) ** 2)[chosen].mean()


def train_projection(train: torch.Tensor, width: int, memory_size: int, args) -> torch.nn.Linear:
    torch.manual_seed(args.seed)
    projection = torch.nn.Linear(train.shape[1], width)
    optimizer = torch.optim.Adam(projection.parameters(), lr=args.lr)
    memory = CrossBatchMemory(memory_size, train.shape[1])
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(train))
    position = 0
    for _ in range(args.steps):
        if position + args.batch_size > len(order):
            order, position = rng.permutation(len(train)), 0
        frozen = train[order[position : position + args.batch_size]]
        position += args.batch_size
        loss = selected_pair_loss(frozen, projection, memory, args.top_k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        memory.enqueue(frozen)
    return projection


def pca_projection(train: torch.Tensor, width: int) -> torch.nn.Linear:
    """The classical baseline: the top principal directions of the train embeddings (width < their count)."""
    mean = train.mean(0)
    _, _, vt = torch.linalg.svd(train - mean, full_matrices=False)
    projection = torch.nn.Linear(train.shape[1], width)
    with torch.no_grad():
        projection.weight.copy_(vt[:width])
        projection.bias.copy_(-(vt[:width] @ mean))
    return projection


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model or minilm("pass --model DIR")
    spec = load_student(model_dir)
    require(spec.family == "sentence-transformers", f"{model_dir}", "a sentence-transformers BERT folder", spec.family)
    require(args.width <= spec.embedding_dim, "--width", f"at most the encoder's embedding width {spec.embedding_dim}", args.width)
    masks = load_masks(args.masks, spec, spec.embedding_dim)
    require(masks.projection_weight is None, f"{args.masks}", "a masks file routing in the encoder's own space", "one that already has router.projection.*")
    # centroids fitted for another router (recipe 1's default model2vec one) live in another space
    check_masks_router(args.masks, masks.router_identity, load_router(model_dir, None))
    train_docs, held_docs = split(load_corpus(args.corpus))
    train_texts = [d.text for d in spread(train_docs, args.max_texts)]
    held_texts = [d.text for d in spread(held_docs, args.max_texts)]
    require(args.width < len(train_texts), "--width", f"at most {len(train_texts) - 1}: the PCA baseline finds no more components in "
            f"{len(train_texts)} train texts (more with --max-texts)", args.width)
    args.out.mkdir(parents=True, exist_ok=True)

    phase(f"embedding {len(train_texts)} train and {len(held_texts)} held-out texts with the frozen encoder")
    encoder = load_student_module(spec)
    tokenizer = load_tokenizer(spec.transformer_dir)
    train = sentence_embeddings(encoder, length_batches(tokenizer, train_texts, 32, args.max_length), len(train_texts))
    held = sentence_embeddings(encoder, length_batches(tokenizer, held_texts, 32, args.max_length), len(held_texts))
    if not spec.normalize:  # the loss compares cosines: work on unit vectors either way
        train, held = F.normalize(train, dim=1), F.normalize(held, dim=1)

    t = phase(f"training {spec.embedding_dim} -> {args.width} projections, {args.steps} steps of {args.batch_size}, top-{args.top_k} hard pairs")
    projections = {f"S-XBM, memory {args.memory}": train_projection(train, args.width, args.memory, args),
                   "same, without memory": train_projection(train, args.width, 0, args),
                   "PCA (no training)": pca_projection(train, args.width)}
    done(t)
    print(f"\nrecall@10 of the {args.width}-d projected space against the full {spec.embedding_dim}-d one, {len(held_texts)} held-out texts")
    print("| projection | recall@10 |\n|---|---:|")
    with torch.no_grad():
        for name, projection in projections.items():
            print(f"| {name} | {recall_at_k(held.numpy(), projection(held).numpy(), 10):.3f} |")
    projection = projections[f"S-XBM, memory {args.memory}"]

    # Centroids in the projected space: the mean projected embedding of the train texts the full-space
    # router sends to each cluster (cosine metric, so only their direction matters).
    full_router = RouterModule(encoder, masks.centroids, masks.metric)
    with torch.no_grad():
        assigned = full_router.distances(train).argmin(1)
        projected_train = F.normalize(projection(train), dim=1)
        centroids = torch.stack([F.normalize(projected_train[assigned == k].mean(0), dim=0) if bool((assigned == k).any())
                                 else torch.zeros(args.width) for k in range(masks.num_clusters)])
        small_router = RouterModule(encoder, centroids.numpy(), "cosine", projection.weight.numpy(), projection.bias.numpy())
        agreement = float((full_router.distances(held).argmin(1) == small_router.distances(projection(held)).argmin(1)).float().mean())
    print(f"\nrouting agreement on held-out texts, {args.width}-d router vs the {spec.embedding_dim}-d one of {args.masks.name}: {agreement:.3f}")

    from safetensors.numpy import load_file, save_file

    tensors = {name: array for name, array in load_file(str(args.masks)).items() if name.startswith("cluster.")}
    tensors.update({"router.centroids": centroids.numpy().astype(np.float32),
                    "router.projection.weight": projection.weight.detach().numpy().astype(np.float32),
                    "router.projection.bias": projection.bias.detach().numpy().astype(np.float32)})
    masks_file = args.out / "masks.safetensors"
    save_file(tensors, str(masks_file), metadata={"format": "edgecompile-masks/1", "router.metric": "cosine", "mask.kind": masks.kind})
    print(f"wrote {masks_file} (gates of {args.masks.name}, router.projection {args.width}x{spec.embedding_dim}, cosine centroids)")

    phase("compiling with edgecompile build")
    samples = [held_texts[i] for i in np.linspace(0, len(held_texts) - 1, min(24, len(held_texts))).astype(int)]
    build_bundle(model_dir, masks_file, model_dir, args.out / "bundle", samples)
    finished(started)


if __name__ == "__main__":
    run_recipe(main)
