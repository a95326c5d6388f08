"""Recipe 1 on a real LLM: input-guided sub-layer pruning (IG-Pruning, stage 1) of SmolLM2-135M-Instruct, against
static pruning at the same number of removed sub-layers.

1. Text of four domains that differ in kind (examples/lm_domains.py: Python source, technical prose, license text,
   the student's OWN greedy chat answers), split into calibration / held-out by hash.
2. The router (all-MiniLM-L6-v2 by default) embeds the calibration texts exactly as the router graph does
   (for chat: the user message); scikit-learn KMeans makes K clusters (--clusters; 4, ablation 2 and 8).
3. Per cluster, and once on all calibration text, hard-concrete gates over the 2L attention / FFN sub-layers
   (60 on SmolLM2) are trained to match the dense model's next-token distributions (KL per real token) under the
   augmented-Lagrangian L0 penalty toward the target count. Training runs under Hugging Face accelerate: one CPU
   process by default; `accelerate launch --num_processes N examples/recipe_ig_pruning_lm.py` spreads the
   gate trainings and the cluster searches over processes (or GPUs).
4. Hard masks at EXACTLY n removed sub-layers for each n in --removed: a swap search scored on the WHOLE mask by
   the group's own calibration loss (next-token CE). Its starts: the gates' top-k by log_alpha, the static mask,
   ShortGPT's mask and the cluster's own single-removal ranking; the best start by that loss wins, then
   single swaps (restore one removed, remove one kept) in the order of the additive estimate from the cluster's
   single-removal losses, each evaluated exactly, the first improvement taken, until --search-evals.
   Every mask removes n sub-layers, so routed and static cost the same.
5. Static baselines at the same n: (a) `static`: one mask made the same way (gates + search) on all calibration
   text; (b) `shortgpt`: ShortGPT's block influence per sub-layer (1 - cos(input, output) of the residual
   stream) on the same text, the n lowest removed; `single-removal`: the n sub-layers whose removal alone costs
   least. Routed is compared with the BEST static one.
6. Figures per n: held-out perplexity per domain and overall (dense, each static, routed, and routed with each
   cluster's top-k mask before the search, the paper's rule); the share of texts per cluster; the masks and
   their Hamming distances; greedy-token agreement with dense over --agree-tokens on held-out chat prompts.
7. Masks files (edgecompile-masks/1) per n; `edgecompile build` compiles those of the largest n (router + K
   clusters, greedy tokens parity-gated; `--target cpu-int4`: 4-bit weights after pruning), `edgecompile verify`,
   `edgecompile bench` times decode per graph; then every graph beside onnxruntime-genai's model builder, fp32 and
   int4 of the same checkpoint (`--builder-rounds`, 0 skips).

Defaults (the whole run 20 minutes on the idle 2-core machine with torch on both cores, the default: the figures 14.5,
build + verify + bench 4, the builder comparison 1.3; at 1 thread beside other jobs, load average about 3, it was
29.5 minutes without the comparison; figures in docs/recipes.md):
48 calibration and 24 held-out texts per domain, at most 64 tokens each; gates trained once per group at the
largest n, 24 steps of 4 texts (48 tokens); searches of 24 exact evaluations on 12 of the cluster's calibration
texts (the static mask: 24 texts, balanced over clusters), every 2nd position scored; single-removal profiles
on 4 texts per cluster.

    python examples/recipe_ig_pruning_lm.py                    # SmolLM2 (examples/real_models.py), K = 4, 8 and 16 of 60 removed
    python examples/recipe_ig_pruning_lm.py --clusters 8       # the K ablation
    python examples/recipe_ig_pruning_lm.py --static-search-evals 96   # the static search gets the 4 cluster searches' budget
    python examples/recipe_ig_pruning_lm.py --short --student DIR      # seconds on a small Llama: checks the pipeline, figures meaningless
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_domains as domains  # noqa: E402
from common import (OUT, RecipeParser, add_run_arguments, build_bundle, cpu_flags, done, edgecompile, finished,  # noqa: E402
                    minilm, phase, require, require_dir, run_recipe, write_masks)
from lm_masks_search import (FastLlama, Scorer, ce_sums, chunks_by_length, generate, lowest, pad,  # noqa: E402
                             removal_profile, removed_list, swap_search, top_k, train_gates, unsupported)

from edgecompile.families.router import load_router  # noqa: E402
from edgecompile.inputs.router import router_metadata  # noqa: E402

STARTS = ("own", "static", "shortgpt", "own-single-removal")


def parse_args(argv: list[str] | None):
    parser = RecipeParser(prog="recipe_ig_pruning_lm.py", description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, default=None,
                        help="LlamaForCausalLM folder [default: SmolLM2-135M-Instruct, examples/real_models.py's cached checkpoint]")
    parser.add_argument("--router-encoder", type=Path, default=None, help="router folder edgecompile builds [default: all-MiniLM-L6-v2]")
    parser.add_argument("--clusters", type=int, default=4, help="K of KMeans (the paper's ablation: 2, 4, 8) [default: %(default)s]")
    parser.add_argument("--removed", default="8,16", help="sub-layers removed by every mask, comma-separated counts [default: %(default)s]")
    parser.add_argument("--train-removed", default="largest",
                        help="L0 target of the gate training: 'largest' (one training per group at the largest --removed), "
                             "'each' (one per count) or a count [default: %(default)s]")
    parser.add_argument("--steps", type=int, default=24, help="gate-training steps per group [default: %(default)s]")
    parser.add_argument("--batch-size", type=int, default=4, help="texts per training step [default: %(default)s]")
    parser.add_argument("--lr", type=float, default=0.2, help="Adam lr of log_alpha [default: %(default)s]")
    parser.add_argument("--multiplier-lr", type=float, default=0.1, help="Adam lr (ascent) of the L0 multiplier [default: %(default)s]")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text [default: %(default)s]")
    parser.add_argument("--train-length", type=int, default=48, help="tokens per text in gate training [default: %(default)s]")
    parser.add_argument("--cal-texts", type=int, default=48, help="calibration texts per domain [default: %(default)s]")
    parser.add_argument("--held-texts", type=int, default=24, help="held-out texts per domain [default: %(default)s]")
    parser.add_argument("--search-texts", type=int, default=12, help="calibration texts scoring each cluster's search [default: %(default)s]")
    parser.add_argument("--static-search-texts", type=int, default=24,
                        help="calibration texts scoring the static mask's search (balanced over clusters) [default: %(default)s]")
    parser.add_argument("--search-evals", type=int, default=24, help="exact whole-mask evaluations per search, starts included [default: %(default)s]")
    parser.add_argument("--static-search-evals", type=int, default=None,
                        help="evaluations of the static mask's search (K x --search-evals: as many as all cluster searches "
                             "together) [default: --search-evals]")
    parser.add_argument("--starts", default=",".join(STARTS), help="starts of the cluster searches (own = its gates' top-k) [default: %(default)s]")
    parser.add_argument("--profile-texts", type=int, default=4, help="texts of each cluster's single-removal profile [default: %(default)s]")
    parser.add_argument("--score-stride", type=int, default=2, help="the search scores every n-th position's next token [default: %(default)s]")
    parser.add_argument("--agree-prompts", type=int, default=12, help="held-out chat prompts of the greedy agreement [default: %(default)s]")
    parser.add_argument("--agree-tokens", type=int, default=32, help="greedy tokens compared with dense [default: %(default)s]")
    parser.add_argument("--answer-tokens", type=int, default=64, help="new tokens of the student's chat answers (the chat domain) [default: %(default)s]")
    parser.add_argument("--samples", type=int, default=8, help="held-out prompts for the build's parity gate [default: %(default)s]")
    parser.add_argument("--prompt-tokens", type=int, default=24, help="tokens of each parity prompt [default: %(default)s]")
    parser.add_argument("--bench-runs", type=int, default=3, help="edgecompile bench --runs [default: %(default)s]")
    parser.add_argument("--bench-tokens", type=int, default=64, help="prompt and new tokens of each bench round [default: %(default)s]")
    parser.add_argument("--target", choices=("cpu", "cpu-int4"), default="cpu",
                        help="the bundle's target: fp32 weights, or cpu-int4 (4-bit weights after pruning, as onnxruntime-genai's "
                        "builder makes them; parity-gated against the reference with the same 4-bit weights) [default: %(default)s]")
    parser.add_argument("--builder-rounds", type=int, default=3,
                        help="rounds of the decode comparison with onnxruntime-genai's builder, fp32 and int4 of the same checkpoint "
                        "(0: skip it; --short skips it) [default: %(default)s]")
    parser.add_argument("--out", type=Path, default=OUT / "ig_pruning_lm", help="output folder [default: %(default)s]")
    # a 135 M-parameter forward over 16 x 64 tokens is large enough for every core to pay (1.65x at 2 threads, idle 2-core
    # machine); under `accelerate launch --num_processes N` each process takes its share
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    add_run_arguments(parser, "K=2, 3 steps, 6 + 3 texts per domain, a quarter and half of the sub-layers removed, searches of 4 evaluations",
                      threads=max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    args = parser.parse_args(argv)
    try:
        args.removed = sorted({int(x) for x in args.removed.split(",") if x.strip()})
    except ValueError:
        require(False, "--removed", "comma-separated counts of sub-layers", args.removed)
    args.starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    if args.short:
        args.clusters, args.steps, args.cal_texts, args.held_texts = min(args.clusters, 2), 3, 6, 3
        args.search_texts, args.static_search_texts, args.search_evals, args.profile_texts = 3, 4, 4, 2
        args.agree_prompts, args.agree_tokens, args.answer_tokens = 2, 4, 16  # --removed: a quarter and half, once L is known
        args.max_length, args.train_length, args.samples, args.bench_runs, args.bench_tokens = 32, 32, 3, 3, 8
        args.builder_rounds = 0
    args.static_search_evals = args.search_evals if args.static_search_evals is None else args.static_search_evals
    require(len(args.removed) >= 1 and args.removed[0] >= 1, "--removed", "positive counts of removed sub-layers", args.removed)
    require(args.train_removed in ("largest", "each") or args.train_removed.isdigit(), "--train-removed", "'largest', 'each' or a count",
            args.train_removed)
    require(set(args.starts) <= set(STARTS) and args.starts, "--starts", f"some of {','.join(STARTS)}", ",".join(args.starts))
    require(args.clusters >= 2, "--clusters", "at least 2 (one cluster is the static mask)", args.clusters)
    for name in ("steps", "batch_size", "max_length", "train_length", "cal_texts", "held_texts", "search_texts", "static_search_texts",
                 "search_evals", "static_search_evals", "profile_texts", "score_stride", "agree_prompts", "agree_tokens", "answer_tokens", "samples",
                 "prompt_tokens", "bench_tokens", "threads"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')}", "at least 1", getattr(args, name))
    require(args.bench_runs >= 3, "--bench-runs", "at least 3", args.bench_runs)
    require(args.builder_rounds >= 0, "--builder-rounds", "0 (skip) or more", args.builder_rounds)
    require(args.clusters <= args.cal_texts * len(domains.DOMAINS), "--clusters",
            f"at most the number of calibration texts ({args.cal_texts * len(domains.DOMAINS)})", args.clusters)
    if args.student is not None:
        require_dir(args.student, "a LlamaForCausalLM folder")
    if args.router_encoder is not None:
        require_dir(args.router_encoder, "a router folder (sentence-transformers or model2vec)")
    return args


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The student's chat turn for `prompt`; a tokenizer without a chat template gets the ChatML text lm_domains scores."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tokenizer(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


def domain_texts(args, fast: FastLlama, tokenizer, student: Path) -> tuple[list, list, list[str]]:
    """Calibration and held-out texts of the four domains, and the held-out chat prompts of the greedy agreement.
    Only the chat prompts used are answered (by sha256 order), cached in --out beside the student's name."""
    import sysconfig

    texts = domains.code_texts() + domains.prose_texts() + domains.legal_texts(Path(sysconfig.get_paths()["purelib"]))
    by_hash = sorted(domains.chat_prompts(), key=domains.h)
    cal_q = [q for q in by_hash if domains.h(q) % 5 != 0][: args.cal_texts]
    held_q = [q for q in by_hash if domains.h(q) % 5 == 0][: max(args.held_texts, args.agree_prompts)]
    cache = args.out / "chat_answers.json"
    key = f"{student.resolve()} {args.answer_tokens} tokens"
    stored = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    answers = stored.get("answers", {}) if stored.get("key") == key else {}
    missing = [q for q in cal_q + held_q if q not in answers]
    if missing:
        print(f"  the student answers {len(missing)} chat prompts greedily ({args.answer_tokens} new tokens at most)", flush=True)
        outs = generate(fast, [chat_prompt_ids(tokenizer, q) for q in missing], np.ones(2 * fast.L, np.float32), args.answer_tokens)
        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None, tokenizer.unk_token_id}
        for q, o in zip(missing, outs):
            end = next((i for i, t in enumerate(o) if t in stops), len(o))
            answers[q] = tokenizer.decode(o[:end], skip_special_tokens=True).strip()
        cache.write_text(json.dumps({"key": key, "answers": answers}, ensure_ascii=False, indent=0), encoding="utf-8")
    chosen = set(cal_q) | set(held_q)
    texts += [t for t in domains.chat_texts({q: answers.get(q, "") for q in domains.chat_prompts()}) if t.route in chosen]
    cal, held = domains.select(texts, args.cal_texts, args.held_texts)
    return cal, held, held_q[: args.agree_prompts]


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from sklearn.cluster import KMeans

    from edgecompile.families.llama import Llama
    from edgecompile.inputs.tokens import load_tokenizer
    from fit_router_centroids import embed

    accelerator = Accelerator(cpu=True)
    processes, rank, main_process = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    torch.set_num_threads(args.threads)
    if args.student is None:
        from real_models import smollm2_checkpoint

        args.student = smollm2_checkpoint()
    router_dir = args.router_encoder or minilm("pass --router-encoder DIR")
    config = json.loads((args.student / "config.json").read_text())
    require(config.get("model_type") == "llama", f"{args.student}", "a LlamaForCausalLM folder (model_type llama)", config.get("model_type"))
    layers = config["num_hidden_layers"]
    S = 2 * layers
    if args.short:
        args.removed = sorted({max(1, S // 4), S // 2})
    require(args.removed[-1] < S, "--removed", f"counts below the student's {S} sub-layers", args.removed)
    args.out.mkdir(parents=True, exist_ok=True)

    t = phase(f"data: four domains, {args.cal_texts} calibration + {args.held_texts} held-out texts each")
    model = Llama.load_reference(args.student)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    require(unsupported(model.config) is None, f"{args.student}", "a Llama this recipe's fast forward implements", unsupported(model.config))
    tokenizer = load_tokenizer(args.student)
    fast = FastLlama(model)
    ones = np.ones(S, np.float32)
    cal, held, agree_q = domain_texts(args, fast, tokenizer, args.student)
    cal_ids, held_ids = [[tokenizer(x.text)["input_ids"][: args.max_length] for x in ts] for ts in (cal, held)]
    print("| domain | calibration texts (tokens) | held-out texts (tokens) |\n|---|---:|---:|")
    for d in domains.DOMAINS:
        c, h = [[len(i) for x, i in zip(ts, ids) if x.domain == d] for ts, ids in ((cal, cal_ids), (held, held_ids))]
        print(f"| {d} | {len(c)} ({sum(c)}) | {len(h)} ({sum(h)}) |")
    done(t)

    t = phase(f"routing: {router_dir} embeds what the router reads; KMeans, K = {args.clusters}")
    emb = embed(router_dir, [x.route for x in cal] + [x.route for x in held] + agree_q)
    cal_emb, held_emb, agree_emb = emb[: len(cal)], emb[len(cal) : len(cal) + len(held)], emb[len(cal) + len(held) :]
    K = args.clusters
    kmeans = KMeans(n_clusters=K, n_init=10, random_state=args.seed).fit(cal_emb.astype(np.float64))
    centroids = kmeans.cluster_centers_.astype(np.float32)

    def route(e: np.ndarray) -> np.ndarray:  # the router graph's rule: the nearest centroid (l2)
        return np.argmin(((e[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)

    cal_cluster, held_cluster, agree_cluster = kmeans.labels_, route(held_emb), route(agree_emb)
    print("\nTexts per cluster (calibration: KMeans labels / held-out: routed by the router):\n")
    print("| domain | " + " | ".join(f"cluster {k}" for k in range(K)) + " |\n|---|" + "---:|" * K)
    for d in domains.DOMAINS:
        c = np.bincount([k for x, k in zip(cal, cal_cluster) if x.domain == d], minlength=K)
        h = np.bincount([k for x, k in zip(held, held_cluster) if x.domain == d], minlength=K)
        print(f"| {d} | " + " | ".join(f"{c[k]} / {h[k]}" for k in range(K)) + " |")
    done(t)

    t = phase("dense teacher on the calibration texts (final hidden states) and ShortGPT's block influence per sub-layer")
    teacher: list[torch.Tensor] = [torch.empty(0)] * len(cal)
    cos_sum, cos_count = np.zeros(S), 0
    with torch.no_grad():
        for chunk in chunks_by_length(list(range(len(cal))), cal_ids, 16):
            ids, valid = pad([cal_ids[i] for i in chunk])
            states: list[torch.Tensor] = []
            x = fast.run(fast.embed_ids(ids), [1.0] * S, record=states)
            states.append(x)
            for s in range(S):
                cos_sum[s] += float(F.cosine_similarity(states[s][valid], states[s + 1][valid], dim=-1).sum())
            cos_count += int(valid.sum())
            hidden = fast.final_hidden(x)
            for row, i in enumerate(chunk):
                teacher[i] = hidden[row, : len(cal_ids[i])].clone()
    block_influence = 1.0 - cos_sum / cos_count
    done(t)

    groups: list = [*range(K), "all"]
    members = {k: [i for i in range(len(cal)) if cal_cluster[i] == k] for k in range(K)}
    members["all"] = list(range(len(cal)))
    targets = {"largest": [args.removed[-1]], "each": args.removed}.get(args.train_removed) or [int(args.train_removed)]
    t = phase(f"hard-concrete gates, {args.steps} steps of {args.batch_size} texts per group, L0 target {targets} removed "
              f"({processes} process(es))")
    jobs = [(g, n) for n in targets for g in groups]
    mine = []
    for j, (g, n) in enumerate(jobs):
        if j % processes == rank:
            log_alpha, info = train_gates(fast, [cal_ids[i] for i in members[g]], [teacher[i] for i in members[g]], n, args,
                                          args.seed + 7 * j, accelerator)
            print(f"  {'static' if g == 'all' else f'cluster {g}'}: {len(members[g])} texts, KL (last 10 steps) {info['kl_last10']:.4f}, "
                  f"expected kept {info['expected_kept_end']:.1f}/{S}", flush=True)
            mine.append(((g, n), log_alpha.tolist()))
    trained = {key: np.array(la, np.float32) for key, la in gather_object(mine)}

    def log_alpha(g, n: int) -> np.ndarray:  # the training nearest to n
        return trained[(g, min(targets, key=lambda m: (abs(m - n), -m)))]
    done(t)

    rng = np.random.default_rng(args.seed)
    search_rows = {k: [members[k][i] for i in rng.permutation(len(members[k]))[: args.search_texts]] for k in range(K)}
    per_cluster = max(1, args.static_search_texts // K)  # the static mask's texts: balanced over the clusters
    search_rows["all"] = [i for k in range(K) for i in list(rng.permutation(members[k]))[:per_cluster]][: args.static_search_texts]
    masks: dict[tuple, np.ndarray] = {}
    searches: dict[tuple, dict] = {}
    t = phase(f"searches at exactly {args.removed} removed: {args.search_evals} exact whole-mask evaluations per cluster, "
              f"{args.static_search_evals} for the static mask, scored by the group's own calibration CE")
    scorers = {g: Scorer(fast, [cal_ids[i] for i in search_rows[g]], None, "ce", args.score_stride) for g in groups}
    profiles: dict = {}
    for k in range(K):  # each cluster's single-removal losses: the swap order and a start
        profiles[k] = removal_profile(Scorer(fast, [cal_ids[i] for i in search_rows[k][: args.profile_texts]], None, "ce", args.score_stride))
    weights = np.array([len(members[k]) for k in range(K)], float)
    profiles["all"] = sum(w * profiles[k] for k, w in zip(range(K), weights)) / weights.sum()
    for n in args.removed:
        masks[("shortgpt", n)], masks[("single-removal", n)] = lowest(block_influence, n), lowest(profiles["all"], n)
        starts = {"own": top_k(log_alpha("all", n), n), "shortgpt": masks[("shortgpt", n)], "single-removal": masks[("single-removal", n)]}
        masks[("static", n)], searches[("static", n)] = swap_search(scorers["all"], starts, args.static_search_evals, profiles["all"])
        mine = []
        for k in range(K):
            if k % processes == rank:
                candidates = {"own": top_k(log_alpha(k, n), n), "static": masks[("static", n)], "shortgpt": masks[("shortgpt", n)],
                              "own-single-removal": lowest(profiles[k], n)}
                found, info = swap_search(scorers[k], {s: candidates[s] for s in args.starts}, args.search_evals, profiles[k])
                mine.append((k, found.tolist(), info))
        for k, found, info in gather_object(mine):
            masks[(k, n)], searches[(k, n)] = np.array(found, np.float32), info
        for g in groups:
            info = searches[("static" if g == "all" else g, n)]
            print(f"  -{n} {'static' if g == 'all' else f'cluster {g}'}: start {info['start']} "
                  f"({', '.join(f'{s} {v:.3f}' for s, v in info['start_losses'].items())}) -> {info['final_loss']:.3f}, "
                  f"{info['moves']} swap(s) in {info['evals']} evaluations", flush=True)
    done(t)
    if not main_process:
        return

    t = phase("held-out perplexity per domain (routed: each text by the mask of the cluster the router picks)")
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    @torch.no_grad()
    def losses(gates: np.ndarray, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Summed next-token CE and token count per held-out text (NaN where not computed yet)."""
        total, count = cache.setdefault(tuple(gates.tolist()), (np.full(len(held), np.nan), np.full(len(held), np.nan)))
        for chunk in chunks_by_length([i for i in rows if np.isnan(total[i])], held_ids, 16):
            ids, valid = pad([held_ids[i] for i in chunk])
            a, b = ce_sums(fast, fast.final_hidden(fast.run(fast.embed_ids(ids), [float(g) for g in gates])), ids, valid)
            total[chunk], count[chunk] = a.numpy(), b.numpy()
        return total, count

    def routed(pick) -> tuple[np.ndarray, np.ndarray]:
        total, count = np.zeros(len(held)), np.zeros(len(held))
        for k in range(K):
            rows = [i for i in range(len(held)) if held_cluster[i] == k]
            if rows:
                a, b = losses(pick(k), rows)
                total[rows], count[rows] = a[rows], b[rows]
        return total, count

    def ppl(pair: tuple[np.ndarray, np.ndarray], rows: list[int]) -> float:
        return float(math.exp(pair[0][rows].sum() / pair[1][rows].sum())) if rows else float("nan")

    everything = list(range(len(held)))
    by_domain = {d: [i for i, x in enumerate(held) if x.domain == d] for d in domains.DOMAINS}
    dense = losses(ones, everything)
    statics = ("static", "shortgpt", "single-removal")
    table: dict[int, dict[str, tuple]] = {}
    for n in args.removed:
        table[n] = {name: losses(masks[(name, n)], everything) for name in statics}
        table[n]["routed"] = routed(lambda k: masks[(k, n)])
        table[n]["routed top-k (no search)"] = routed(lambda k: top_k(log_alpha(k, n), n))
    done(t)

    t = phase(f"greedy agreement with dense over {args.agree_tokens} tokens on {len(agree_q)} held-out chat prompts")
    agree_ids = [chat_prompt_ids(tokenizer, q) for q in agree_q]
    dense_tokens = generate(fast, agree_ids, ones, args.agree_tokens)

    def agreement(tokens: list[list[int]]) -> tuple[float, float]:
        """Share of positions equal to dense's token, and mean length of the identical prefix."""
        match = np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(tokens, dense_tokens)])
        prefix = np.mean([next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(tokens, dense_tokens)])
        return float(match), float(prefix)

    agree: dict[int, dict[str, tuple[float, float]]] = {}
    for n in args.removed:
        agree[n] = {name: agreement(generate(fast, agree_ids, masks[(name, n)], args.agree_tokens)) for name in statics}
        routed_tokens: list[list[int]] = [[] for _ in agree_ids]
        for k in range(K):
            rows = [i for i in range(len(agree_ids)) if agree_cluster[i] == k]
            for i, tokens in zip(rows, generate(fast, [agree_ids[i] for i in rows], masks[(k, n)], args.agree_tokens) if rows else []):
                routed_tokens[i] = tokens
        agree[n]["routed"] = agreement(routed_tokens)
    done(t)

    results: dict = {"command": " ".join(sys.argv), "student": str(args.student), "router": str(router_dir), "clusters": K, "removed": {}}
    print(f"\nIG-Pruning stage 1 on {args.student.name} ({S} sub-layers; A = attention, F = FFN), router {router_dir}, K = {K}")
    for n in args.removed:
        rows = table[n]
        print(f"\n{n} of {S} sub-layers removed: held-out perplexity (token-weighted)\n")
        print("| mask | " + " | ".join(domains.DOMAINS) + " | overall |\n|---|" + "---:|" * (len(domains.DOMAINS) + 1))
        for name, pair in [("dense", dense), *rows.items()]:
            print(f"| {name} | " + " | ".join(f"{ppl(pair, by_domain[d]):.2f}" for d in domains.DOMAINS) + f" | {ppl(pair, everything):.2f} |")
        best = min(statics, key=lambda name: ppl(rows[name], everything))
        gap = 1 - ppl(rows["routed"], everything) / ppl(rows[best], everything)
        print(f"\nrouted {ppl(rows['routed'], everything):.2f} vs best static ({best}) {ppl(rows[best], everything):.2f}: "
              f"routed {100 * abs(gap):.1f}% {'below' if gap >= 0 else 'ABOVE'} it ({'meets' if gap >= 0.05 else 'misses'} the 5% bar)")
        print("\n| mask | removed sub-layers | differ from static | search: start -> calibration CE (swaps / evaluations) | held-out texts |")
        print("|---|---|---:|---|---:|")
        for g in [*range(K), *statics]:
            mask = masks[(g, n)]
            info = searches.get((g, n))
            how = f"{info['start']} {info['start_losses'][info['start']]:.3f} -> {info['final_loss']:.3f} ({info['moves']} / {info['evals']})" if info else ""
            texts = str(int((held_cluster == g).sum())) if isinstance(g, int) else "all"
            print(f"| {f'cluster {g}' if isinstance(g, int) else g} | {' '.join(removed_list(mask))} | "
                  f"{int((mask != masks[('static', n)]).sum())} | {how} | {texts} |")
        pairwise = [int((masks[(a, n)] != masks[(b, n)]).sum()) for a in range(K) for b in range(a + 1, K)]
        to_static = [int((masks[(k, n)] != masks[("static", n)]).sum()) for k in range(K)]
        print(f"\nmask diversity (Hamming distance, sub-layers): between clusters mean {np.mean(pairwise):.1f} (max {max(pairwise)}); "
              f"to the static mask mean {np.mean(to_static):.1f}")
        print("greedy agreement with dense (position match share / mean identical prefix in tokens): "
              + ", ".join(f"{name} {a:.3f} / {p:.1f}" for name, (a, p) in agree[n].items()))
        results["removed"][n] = {"perplexity": {name: {**{d: ppl(pair, by_domain[d]) for d in domains.DOMAINS}, "overall": ppl(pair, everything)}
                                                for name, pair in [("dense", dense), *rows.items()]},
                                 "best static": best, "routed below best static": gap, "agreement": agree[n],
                                 "masks": {str(g): removed_list(masks[(g, n)]) for g in [*range(K), *statics]},
                                 "hamming between clusters": pairwise, "hamming to static": to_static,
                                 "searches": {str(g): {k: v for k, v in info.items() if k != "history"} for (g, m), info in searches.items() if m == n}}

    # the router the centroids were fitted for, named in every masks file so `edgecompile build` checks it
    hard = {"mask.kind": "hard", **router_metadata(load_router(router_dir))}
    for n in args.removed:
        write_masks(args.out / f"masks_removed{n}.safetensors", {k: {"blocks": masks[(k, n)].reshape(layers, 2)} for k in range(K)},
                    centroids, metadata=hard)
        write_masks(args.out / f"masks_static_removed{n}.safetensors", {0: {"blocks": masks[("static", n)].reshape(layers, 2)}},
                    centroids[:1], metadata=hard)
    masks_file = write_masks(args.out / "masks.safetensors", {k: {"blocks": masks[(k, args.removed[-1])].reshape(layers, 2)} for k in range(K)},
                             centroids, metadata=hard)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print(f"\nwrote {args.out}/masks_removed{{{','.join(map(str, args.removed))}}}.safetensors (and the static masks), results.json; "
          f"{masks_file.name} = the {args.removed[-1]}-removed masks, compiled below")

    t = phase("compiling with edgecompile build (greedy tokens of every graph parity-gated), verify, bench")
    prompts = [ids[: args.prompt_tokens] for ids in held_ids if len(ids) >= args.prompt_tokens]
    samples = [tokenizer.decode(p, skip_special_tokens=True).replace("\n", " ") for p in prompts][:: max(1, len(prompts) // args.samples)][: args.samples]
    require(len(samples) >= 1, "--prompt-tokens", "held-out texts at least that long", args.prompt_tokens)
    bundle = build_bundle(args.student, masks_file, router_dir, args.out / "bundle", samples, target=args.target)
    report = args.out / "bundle_bench.json"
    positions = json.loads((bundle / "manifest.json").read_text())["student"]["max_seq_length"]
    tokens = min(args.bench_tokens, positions // 2)
    edgecompile("bench", bundle, "--runs", args.bench_runs, "--prompt-tokens", tokens, "--new-tokens", tokens, "--json", report)
    graphs = {row["graph"]: row for row in json.loads(report.read_text())["graphs"]}
    clusters = [graphs[f"cluster_{k}"] for k in range(K)]
    print(f"\n{args.target} decode per token (median of {args.bench_runs} rounds of a {tokens} + {tokens}-token generation, 1 thread): "
          f"dense {graphs['dense']['decode_ms_per_token']:.3f} ms, clusters " + ", ".join(f"{r['decode_ms_per_token']:.3f}" for r in clusters)
          + " ms (speed-up vs dense " + ", ".join(f"{r['decode_speedup_vs_dense']:.2f}x" for r in clusters)
          + f"); the router runs once per prompt; {cpu_flags()}")
    done(t)
    if args.builder_rounds:
        from bench_decoder import compare_with_builder

        t = phase("the bundle's graphs beside onnxruntime-genai's model builder (fp32 and int4 of the same checkpoint)")
        compare_with_builder(bundle, args.student, args.out, args.builder_rounds, tokens, tokens)
        done(t)
    finished(started)


if __name__ == "__main__":
    run_recipe(main)
