"""Example masks for a BERT sentence encoder used as both student and router (all-MiniLM-L6-v2 by default).

Centroids: scikit-learn KMeans (fixed seed) on the router's embeddings of examples/calibration.txt.
Per-cluster gates, set by hand to exercise every granularity in tests and benchmarks; these are NOT
learned masks (examples/recipe_ig_pruning.py learns them; the quickstart uses its output):
  cluster 0: dense (nothing pruned)
  cluster 1: skips half the sub-layers (attention in odd layers, FFN in even layers)
  cluster 2: removes the half of each layer's heads with the smallest output-projection norm
  cluster 3: removes the half of each layer's FFN neurons with the smallest weight norm, soft block gates 0.9
  clusters 4.. repeat the patterns with the other half / other layers.

    python examples/make_example_masks.py --out masks.safetensors [--encoder DIR] [--clusters 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIBRATION, half_blocks, minilm, text_lines, write_masks

from edgecompile.families import load_student
from edgecompile.families.bert_model import load_student_module
from edgecompile.inputs.tokens import encode, load_tokenizer
from edgecompile.reference.evaluate import student_outputs


def kmeans(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """scikit-learn's KMeans (k-means++ seeding, best of 10 runs); deterministic for a seed."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x).cluster_centers_.astype(np.float32)


def cluster_gates(k: int, bert: torch.nn.Module) -> dict[str, np.ndarray]:
    config = bert.config
    layers, heads, inter = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    size = config.hidden_size // heads
    pattern, flip = k % 4, (k // 4) % 2
    if pattern == 0:
        if not flip:
            return {"blocks": np.ones((layers, 2), np.float32)}
        blocks = np.ones((layers, 2), np.float32)
        blocks[layers // 2 :, :] = 0.0  # the upper half of the layers emptied
        return {"blocks": blocks}
    if pattern == 1:
        return {"blocks": half_blocks(layers, flip)}
    if pattern == 2:
        gates = np.ones((layers, heads), np.float32)
        for i, layer in enumerate(bert.encoder.layer):
            w = layer.attention.output.dense.weight.detach().numpy()  # [hidden, heads * size]
            norms = np.linalg.norm(w.reshape(w.shape[0], heads, size), axis=(0, 2))
            order = np.argsort(norms, kind="stable")
            gates[i, order[: heads // 2] if not flip else order[heads // 2 :]] = 0.0
        return {"heads": gates}
    gates = np.ones((layers, inter), np.float32)
    for i, layer in enumerate(bert.encoder.layer):
        norms = np.linalg.norm(layer.intermediate.dense.weight.detach().numpy(), axis=1)
        order = np.argsort(norms, kind="stable")
        gates[i, order[: inter // 2] if not flip else order[inter // 2 :]] = 0.0
    return {"neurons": gates, "blocks": np.full((layers, 2), 0.9, np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--encoder", type=Path, default=None, help="sentence-transformers folder [default: all-MiniLM-L6-v2]")
    parser.add_argument("--student", type=Path, default=None, help="BERT student the gates are sized for [default: the encoder]")
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--metric", choices=["l2", "cosine"], default="l2")
    parser.add_argument("--calibration", type=Path, default=CALIBRATION)
    args = parser.parse_args()

    encoder_dir = args.encoder or minilm()
    encoder = load_student_module(load_student(encoder_dir))
    texts = text_lines(args.calibration)
    embeddings = np.stack(student_outputs(encoder, encode(load_tokenizer(encoder_dir), texts, 128))["sentence_embedding"])
    centroids = kmeans(embeddings.astype(np.float64), args.clusters)
    labels = np.argmin(((embeddings[:, None] - centroids[None]) ** 2).sum(-1), axis=1)

    student = encoder if args.student is None else load_student_module(load_student(args.student))
    write_masks(args.out, {k: cluster_gates(k, student.bert) for k in range(args.clusters)}, centroids, metric=args.metric)
    sizes = np.bincount(labels, minlength=args.clusters).tolist()
    print(f"wrote {args.out}: K={args.clusters} centroids from {len(texts)} calibration texts (cluster sizes {sizes})")


if __name__ == "__main__":
    main()
