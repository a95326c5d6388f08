"""Fit centroids for a cheap router from the full encoder's clusters, and measure their agreement.

The clusters are defined by the full sentence encoder (scikit-learn KMeans on its embeddings of the
calibration texts). A cheap router (the same encoder truncated to its first n layers, or a model2vec
static-embedding model) gets one centroid per cluster: the mean of its own embeddings of that cluster's
texts. Agreement = the share of held-out texts the cheap router sends to the same cluster as the full one.

    python examples/fit_router_centroids.py --cheap-encoder DIR [--cheap-layers 2] --out masks.safetensors \
        [--full-encoder DIR] [--clusters 4] [--texts calibration.txt] [--held-out texts.txt]
    python examples/fit_router_centroids.py --refit MASKS --cheap-encoder MODEL2VEC_DIR [--distill] --out masks_cheap.safetensors
    python examples/fit_router_centroids.py --adopt MASKS --cheap-encoder MODEL2VEC_DIR --distill --out masks_here.safetensors

The masks file gets the example gates of make_example_masks.py and metadata naming the cheap router; with
`--refit MASKS` it keeps that file's clusters and gates (its centroids in the full encoder's space define the
clusters) and only refits the centroids for the cheap router, so `edgecompile build --router-encoder DIR [--router-layers n]` checks it.
`--adopt MASKS` takes masks whose centroids were fitted for a model2vec router distilled the same way (recipe 1's default)
to the router distilled here: as they are when it is bit-identical, refitted in its own space otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIBRATION, done, minilm, text_lines, write_masks


def embed(encoder_dir: Path, texts: list[str], layers: int | None = None) -> np.ndarray:
    """Sentence embeddings exactly as the router graph computes them (the PyTorch reference)."""
    import torch

    from edgecompile.inputs.router import STATIC_MAX_TOKENS, encode_router, load_router_tokenizer

    from edgecompile.families.router import load_router
    from edgecompile.reference.router import TransformerSentenceEncoder, load_static_encoder
    from edgecompile.families.bert_model import load_student_module

    spec = load_router(encoder_dir, layers)
    if spec.kind == "static":
        encoder, max_length = load_static_encoder(encoder_dir), STATIC_MAX_TOKENS
    else:
        encoder, max_length = TransformerSentenceEncoder(load_student_module(spec.encoder), spec.layers), spec.encoder.max_seq_length
    samples = encode_router(load_router_tokenizer(spec, spec.tokenization), spec.tokenization, texts, max_length)
    out = []
    with torch.no_grad():
        for sample in samples:
            ids = torch.from_numpy(sample.input_ids)[None]
            out.append(encoder.eval()(ids, torch.ones_like(ids))[0].numpy())
    return np.stack(out).astype(np.float32)


def distill_static_router(source: Path, width: int, folder: Path, instead: str, only_texts: list[str] | None = None) -> Path:
    """A model2vec static-embedding router distilled from a sentence-transformers folder into `folder`
    (256 PCA dims when the encoder is wider, its own width otherwise); `instead` says how to do without.
    model2vec embeds every vocabulary entry (MiniLM's 29,525: about a minute on one thread); with
    `only_texts`, only the entries the source's tokenizer makes of those texts, and its special tokens
    (seconds: for checking a pipeline; other words read as [UNK])."""
    from edgecompile.errors import EnvironmentProblem

    try:
        from model2vec.distill import distill
    except ImportError as exc:
        raise EnvironmentProblem(f"model2vec.distill: cannot import ({exc}); pip install -e .[examples], or {instead}") from None
    options = {"pca_dims": 256 if width > 256 else None}
    if only_texts is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source))
        keep = set(tokenizer.all_special_tokens) | {token for text in only_texts for token in tokenizer.tokenize(text)}
        # model2vec drops the entries this pattern matches: all but the kept ones
        options["token_remove_pattern"] = "(?!(?:" + "|".join(re.escape(t) for t in sorted(keep)) + r")\Z)"
        if len(keep) <= 256:  # too few rows for 256 principal components: the table keeps the encoder's width
            options["pca_dims"] = None
    print(f"distilling a model2vec static-embedding router from {source.name} into {folder}"
          + (f" (only the {len(keep)} vocabulary entries of {len(only_texts)} texts)" if only_texts is not None else ""), flush=True)
    start = time.perf_counter()
    distill(str(source), **options).save_pretrained(str(folder))
    done(start)
    return folder


def nearest(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmin(((embeddings[:, None] - centroids[None]) ** 2).sum(-1), axis=1)


def fit(full_dir: Path, cheap_dir: Path, cheap_layers: int | None, texts: list[str], held_out: list[str],
        clusters: int, seed: int = 0) -> dict:
    """Full-encoder KMeans clusters -> cheap centroids (cluster means) -> agreement on the held-out texts."""
    from sklearn.cluster import KMeans

    full = embed(full_dir, texts)
    kmeans = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(full)
    labels = kmeans.labels_
    cheap = embed(cheap_dir, texts, cheap_layers)
    cheap_centroids = np.stack([cheap[labels == k].mean(axis=0) for k in range(clusters)]).astype(np.float32)
    full_centroids = kmeans.cluster_centers_.astype(np.float32)
    truth = nearest(embed(full_dir, held_out), full_centroids)
    picked = nearest(embed(cheap_dir, held_out, cheap_layers), cheap_centroids)
    return {"full_centroids": full_centroids, "cheap_centroids": cheap_centroids, "agreement": float(np.mean(truth == picked)),
            "calibration_agreement": float(np.mean(nearest(cheap, cheap_centroids) == labels)),
            "held_out_full": truth, "held_out_cheap": picked}


def write_router_masks(out: Path, centroids: np.ndarray, router_dir: Path, layers: int | None,
                       clusters: dict[int, dict[str, np.ndarray]]) -> None:
    """A masks file whose metadata names the router its l2 centroids were fitted for."""
    from edgecompile.families.router import load_router
    from edgecompile.inputs.router import router_metadata

    write_masks(out, clusters, centroids, metadata=router_metadata(load_router(router_dir, layers)))


def refit_masks(masks: Path, router_dir: Path, calibration: list[str], held_out: list[str], out: Path,
                full_dir: Path | None = None) -> float:
    """`masks` (centroids in the full encoder's space) rewritten to `out` for a cheaper router: the same gates, each
    centroid the mean of the cheap router's embeddings of the calibration texts nearest to that cluster's full
    centroid. Returns the share of held-out texts both routers send to the same cluster."""
    from safetensors.numpy import load_file

    full_dir = full_dir or minilm()
    tensors = load_file(str(masks))
    full_centroids = tensors["router.centroids"]
    same = Path(full_dir).resolve() == Path(router_dir).resolve()  # --adopt: the masks' space is the router's own
    full = embed(full_dir, calibration)
    labels = nearest(full, full_centroids)
    if empty := [k for k in range(len(full_centroids)) if not np.any(labels == k)]:
        raise SystemExit(f"error: {masks}: cluster(s) {empty} are nearest to none of the {len(calibration)} calibration "
                         "texts; expected every cluster to have some (give texts of the kind the masks were learned on)")
    cheap = full if same else embed(router_dir, calibration)
    centroids = np.stack([cheap[labels == k].mean(axis=0) for k in range(len(full_centroids))]).astype(np.float32)
    held_full = embed(full_dir, held_out)
    held_cheap = held_full if same else embed(router_dir, held_out)
    agreement = float(np.mean(nearest(held_full, full_centroids) == nearest(held_cheap, centroids)))
    clusters: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if key.startswith("cluster."):
            _, k, kind = key.split(".", 2)
            clusters.setdefault(int(k), {})[kind] = value
    write_router_masks(out, centroids, router_dir, None, clusters)
    return agreement


ADOPT_DRIFT = 1e-3  # largest centroid move, relative to the largest centroid entry, of a router that is the same space


def adopt_masks(masks: Path, router_dir: Path, calibration: list[str], held_out: list[str], out: Path) -> str:
    """`masks` (hard gates, l2 centroids fitted by KMeans on `calibration` for a model2vec router distilled as
    `router_dir` was, e.g. by recipe 1) made the masks of `router_dir`: copied as they are when it is that very router
    (same sha256); otherwise the centroids are refitted in `router_dir`'s space (the mean of the calibration texts each
    one is nearest to) and kept only when they land where the shipped ones are (within ADOPT_DRIFT: the distillation
    differs in its last bits, as floating-point sums do across machines), since the build refuses centroids fitted
    for another router. A router of another space, or masks this cannot carry over, are refused in one line (SystemExit).
    Returns what was done, in a sentence."""
    import shutil

    from safetensors import safe_open

    from edgecompile.families.router import load_router

    def refuse(what: str, expected: str, found: object) -> SystemExit:
        return SystemExit(f"error: {masks}: {what}: expected {expected}, found {found}")

    try:
        with safe_open(str(masks), "np") as f:
            declared, names = f.metadata() or {}, set(f.keys())
            shipped = f.get_tensor("router.centroids") if "router.centroids" in names else None
        spec = load_router(router_dir)
    except Exception as exc:  # an unreadable masks file or router folder (OSError, EdgecompileError, safetensors'): one line
        raise SystemExit(f"error: --adopt {masks} --cheap-encoder {router_dir}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if declared.get("router.metric", "l2") != "l2" or declared.get("mask.kind", "hard") != "hard" or shipped is None \
            or any(n.startswith("router.projection") for n in names):
        raise refuse("metadata 'router.metric' / 'mask.kind' and tensors", "l2, hard gates, router.centroids and no projection",
                     f"{declared.get('router.metric')}, {declared.get('mask.kind')}, {sorted(n for n in names if n.startswith('router.'))}")
    if Path(out).resolve() == Path(masks).resolve():
        raise refuse("--out", "another file than the masks adopted", out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if declared.get("router.encoder.sha256") == spec.sha256:
        shutil.copyfile(masks, out)
        return f"{masks.name}'s centroids were fitted for this very router ({spec.name}, sha256 {spec.sha256[:12]}...): used as they are"
    fitted = declared.get("router.encoder.name", "an unnamed router")
    if declared.get("router.encoder.kind") != spec.kind or declared.get("router.encoder.width") != str(spec.embedding_dim):
        raise refuse("metadata 'router.encoder.kind' / 'router.encoder.width'", f"{spec.kind} / {spec.embedding_dim} (the router {router_dir})",
                     f"{declared.get('router.encoder.kind')} / {declared.get('router.encoder.width')} (fitted for {fitted}); "
                     "use --refit with the encoder that defines its clusters")
    staged = Path(out).with_name(Path(out).name + ".adopting")
    try:
        agreement = refit_masks(masks, router_dir, calibration, held_out, staged, full_dir=router_dir)
        with safe_open(str(staged), "np") as f:
            refitted = f.get_tensor("router.centroids")
        drift = float(np.abs(refitted - shipped).max() / np.abs(shipped).max())
    except SystemExit:  # a cluster no clustering text is nearest to: the centroids are not of this space
        drift, agreement = float("inf"), float("nan")
    if drift > ADOPT_DRIFT:
        staged.unlink(missing_ok=True)
        raise refuse("router.centroids refitted for this router", f"within {ADOPT_DRIFT:g} of the shipped ones (the same embedding space, "
                     f"up to floating-point noise, on the texts its clusters were fitted on)",
                     f"a move of {drift:.3g} relative, {agreement:.1%} of held-out texts keeping their cluster: {router_dir} is not the router "
                     f"{fitted} was (sha256 {declared.get('router.encoder.sha256', '?')[:12]}...); run the recipe for it")
    staged.replace(out)
    return (f"{masks.name}'s centroids were fitted for {fitted} (sha256 {declared.get('router.encoder.sha256', '?')[:12]}...), not this "
            f"distillation (sha256 {spec.sha256[:12]}...): refitted in its space, they moved {drift:.2g} relative and "
            f"{agreement:.1%} of {len(held_out)} held-out texts keep their cluster")


def example_gates(student_dir: Path, clusters: int) -> dict[int, dict[str, np.ndarray]]:
    from make_example_masks import cluster_gates

    from edgecompile.families import load_student
    from edgecompile.families.bert_model import load_student_module

    bert = load_student_module(load_student(student_dir)).bert
    return {k: cluster_gates(k, bert) for k in range(clusters)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cheap-encoder", type=Path, required=True, help="sentence-transformers or model2vec folder")
    parser.add_argument("--cheap-layers", type=int, default=None, help="truncate a transformer cheap router to n layers")
    parser.add_argument("--full-encoder", type=Path, default=None, help="[default: all-MiniLM-L6-v2]")
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--texts", type=Path, default=CALIBRATION)
    parser.add_argument("--held-out", type=Path, default=None, help="[default: edgecompile's built-in samples]")
    parser.add_argument("--corpus", action="store_true",
                        help="calibrate on 400 texts of the docstrings corpus' train split and measure on 200 of its held-out split "
                        "(what recipe 1 trains on) "
                        "instead of --texts / --held-out")
    parser.add_argument("--out", type=Path, default=None, help="write a masks file for the cheap router")
    parser.add_argument("--distill", action="store_true",
                        help="first distil --cheap-encoder DIR as a model2vec router from the full encoder (kept if DIR has one)")
    parser.add_argument("--refit", type=Path, default=None, metavar="MASKS",
                        help="keep this masks file's clusters and gates: only its centroids are refitted for the cheap router")
    parser.add_argument("--adopt", type=Path, default=None, metavar="MASKS",
                        help="masks fitted for a model2vec router distilled as --cheap-encoder is: copied when it is the same "
                        "router, refitted in its own space when the distillation differs")
    args = parser.parse_args()

    from edgecompile.inputs.samples import BUILTIN_SAMPLES

    args.full_encoder = args.full_encoder or minilm()
    held_out = text_lines(args.held_out) if args.held_out else list(BUILTIN_SAMPLES)
    texts = text_lines(args.texts)
    if args.corpus:
        from corpus import load_corpus, split, spread

        train, held = split(load_corpus())  # every family kept, evenly spaced: the means settle well before all texts
        # --adopt refits on all the train split: recipe 1's KMeans texts, where its centroids are the cluster means
        texts, held_out = [d.text for d in spread(train, None if args.adopt else 400)], [d.text for d in spread(held, 200)]
    if args.distill and not (args.cheap_encoder / "model.safetensors").is_file():
        from edgecompile.families.router import load_router

        width = load_router(args.full_encoder).embedding_dim
        distill_static_router(args.full_encoder, width, args.cheap_encoder, "drop --distill and give a router folder")
    if args.adopt:
        if args.out is None or args.refit is not None or args.cheap_layers is not None:
            raise SystemExit("error: --adopt: expected --out, a model2vec --cheap-encoder and no --refit / --cheap-layers")
        print(f"wrote {args.out}: " + adopt_masks(args.adopt, args.cheap_encoder, texts, held_out, args.out))
        return
    if args.refit:
        if args.out is None or args.cheap_layers is not None:
            raise SystemExit("error: --refit: expected --out and a model2vec --cheap-encoder (no --cheap-layers)")
        agreement = refit_masks(args.refit, args.cheap_encoder, texts, held_out, args.out, args.full_encoder)
        print(f"wrote {args.out}: the clusters and gates of {args.refit}, centroids refitted for {args.cheap_encoder.name}; "
              f"it routes {agreement:.1%} of {len(held_out)} held-out texts to the cluster {args.full_encoder.name} picks")
        return
    result = fit(args.full_encoder, args.cheap_encoder, args.cheap_layers, texts, held_out, args.clusters)
    print(f"cheap router {args.cheap_encoder.name}{f' ({args.cheap_layers} layers)' if args.cheap_layers else ''}: "
          f"agreement with the full encoder's clusters {result['agreement']:.1%} on {len(held_out)} held-out texts "
          f"({result['calibration_agreement']:.1%} on the {len(texts)} calibration texts)")
    if args.out:
        write_router_masks(args.out, result["cheap_centroids"], args.cheap_encoder, args.cheap_layers,
                           example_gates(args.full_encoder, args.clusters))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
