"""Sub-layer masks of a Llama causal LM, found fast on CPU: the pieces of examples/recipe_ig_pruning_lm.py that are not
the recipe's own steps.

- `FastLlama`: a lean functional forward of transformers' LlamaForCausalLM with one gate per attention / FFN
  sub-layer (edgecompile's block-mask semantics, README "Masks": gate g multiplies the branch added to the
  residual stream; g == 0 skips the branch, so the pre-norm sub-layer is the identity). It exists because the
  mask search evaluates hundreds of whole masks and can restart a candidate at its first changed sub-layer from
  a cached residual stream, which transformers' module forward cannot. Right-padded batches only: with causal
  attention real tokens never see the pads after them, so `is_causal=True` is exact for every real position.
  `generate` is its greedy decoder (left padding, a KV cache for the kept attention sub-layers).
- `train_gates`: hard-concrete gates (edgecompile.reference.hard_concrete) over the 2L sub-layers, KL to the dense
  model's next-token distributions + the augmented-Lagrangian L0 penalty toward a target count.
- `Scorer`, `removal_profile`, `swap_search`: the exact loss of a WHOLE hard mask on one group's texts, and a
  swap search at a fixed count of removed sub-layers scored by it.

Sub-layer index s = 2 * layer + j (j 0 attention, 1 FFN); a mask is a float32 vector of 2L gates in {0, 1}.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

def unsupported(config) -> str | None:
    """What of a Llama config FastLlama does not implement (None: nothing), so the recipe can refuse it in one line."""
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default" if getattr(config, "rope_scaling", None) is None else "scaled"}
    if rope.get("rope_type", "default") != "default":
        return f"rope_type {rope.get('rope_type')!r}"
    for name in ("attention_bias", "mlp_bias"):
        if getattr(config, name, False):
            return name
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    return None


class FastLlama:
    """transformers' LlamaForCausalLM weights (shared, not copied) run by plain tensor code with per-sub-layer gates."""

    def __init__(self, model) -> None:
        self.model = model
        cfg = model.config
        problem = unsupported(cfg)
        if problem is not None:
            raise ValueError(f"FastLlama: {problem} is not implemented")
        self.cfg = cfg
        self.L = cfg.num_hidden_layers
        self.H = cfg.num_attention_heads
        self.KV = cfg.num_key_value_heads
        self.D = cfg.hidden_size
        self.hd = getattr(cfg, "head_dim", None) or self.D // self.H
        self.eps = cfg.rms_norm_eps
        m = model.model
        self.embed = m.embed_tokens.weight
        self.final_norm = m.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = []
        for layer in m.layers:
            a, f = layer.self_attn, layer.mlp
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0).contiguous()
            gu = torch.cat([f.gate_proj.weight, f.up_proj.weight], 0).contiguous()
            self.layers.append(dict(n1=layer.input_layernorm.weight, qkv=qkv, o=a.o_proj.weight,
                                    n2=layer.post_attention_layernorm.weight, gu=gu, down=f.down_proj.weight))
        rope = cfg.rope_parameters if hasattr(cfg, "rope_parameters") and cfg.rope_parameters else {"rope_theta": cfg.rope_theta}
        theta = rope.get("rope_theta", 10000.0)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, T: int):
        if T not in self._rope_cache:
            t = torch.arange(T, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat([freqs, freqs], -1)
            self._rope_cache[T] = (emb.cos()[None, None], emb.sin()[None, None])
        return self._rope_cache[T]

    def rms(self, x, w):
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.eps))

    @staticmethod
    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], -1)

    def attn_branch(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = self.layers[i]
        B, T, _ = x.shape
        h = self.rms(x, p["n1"])
        qkv = h @ p["qkv"].T
        q, k, v = qkv.split([self.H * self.hd, self.KV * self.hd, self.KV * self.hd], -1)
        q = q.view(B, T, self.H, self.hd).transpose(1, 2)
        k = k.view(B, T, self.KV, self.hd).transpose(1, 2)
        v = v.view(B, T, self.KV, self.hd).transpose(1, 2)
        cos, sin = self.rope(T)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        rep = self.H // self.KV
        k = k.repeat_interleave(rep, 1)
        v = v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(B, T, self.H * self.hd)
        return o @ p["o"].T

    def ffn_branch(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = self.layers[i]
        h = self.rms(x, p["n2"])
        g, u = (h @ p["gu"].T).chunk(2, -1)
        return (F.silu(g) * u) @ p["down"].T

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)

    def run(self, x: torch.Tensor, gates, start: int = 0, stop: int | None = None, record: list | None = None) -> torch.Tensor:
        """Residual stream from sub-layer index `start` (0..2L; s = 2*i + j, j 0 attention, 1 FFN) to `stop`.
        gates: [2L] floats or a tensor (autograd ok). With `record`, appends the stream entering each sub-layer."""
        stop = 2 * self.L if stop is None else stop
        for s in range(start, stop):
            if record is not None:
                record.append(x)
            g = gates[s]
            if isinstance(g, float) or (not torch.is_tensor(g)):
                if float(g) == 0.0:
                    continue
            i, j = divmod(s, 2)
            branch = self.attn_branch(i, x) if j == 0 else self.ffn_branch(i, x)
            x = x + (branch if (not torch.is_tensor(g) and float(g) == 1.0) else g * branch)
        return x

    def final_hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.rms(x, self.final_norm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.lm_head.T

    def forward_logits(self, ids: torch.Tensor, gates) -> torch.Tensor:
        return self.logits(self.final_hidden(self.run(self.embed_ids(ids), gates)))


@torch.no_grad()
def generate(fast: FastLlama, prompts: list[list[int]], gates, new_tokens: int, batch_size: int = 16) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), `new_tokens` tokens, no early stop; left-padded batches
    with a KV cache for the kept attention sub-layers. Removed sub-layers (gate 0) are skipped."""
    out: list[list[int]] = [None] * len(prompts)  # type: ignore
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    gates = [float(g) for g in gates]
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        B, T = len(chosen), max(len(prompts[i]) for i in chosen)
        ids = torch.full((B, T), 0, dtype=torch.long)
        valid = torch.zeros((B, T), dtype=torch.bool)
        for r, i in enumerate(chosen):
            ids[r, T - len(prompts[i]):] = torch.tensor(prompts[i])
            valid[r, T - len(prompts[i]):] = True
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
        mask = (causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool)[None]
        x = _step(fast, fast.embed_ids(ids), pos, mask[:, None], cache, gates)
        generated = []
        keys_valid = valid
        nxt = fast.logits(fast.final_hidden(x[:, -1])).argmax(-1)
        for step in range(new_tokens):
            generated.append(nxt)
            if step == new_tokens - 1:
                break
            pos = pos[:, -1:] + 1
            keys_valid = torch.cat([keys_valid, torch.ones(B, 1, dtype=torch.bool)], 1)
            x = _step(fast, fast.embed_ids(nxt[:, None]), pos, keys_valid[:, None, None, :], cache, gates)
            nxt = fast.logits(fast.final_hidden(x[:, -1])).argmax(-1)
        tokens = torch.stack(generated, 1)
        for r, i in enumerate(chosen):
            out[i] = tokens[r].tolist()
    return out


def _step(fast: FastLlama, x, pos, mask, cache, gates):
    cos_t, sin_t = fast.rope(int(pos.max()) + 1)
    cos, sin = cos_t[0, 0][pos][:, None], sin_t[0, 0][pos][:, None]  # [B, 1, T, hd]
    B, T, _ = x.shape
    for s in range(2 * fast.L):
        if gates[s] == 0.0:
            continue
        i, j = divmod(s, 2)
        p = fast.layers[i]
        if j == 1:
            x = x + gates[s] * fast.ffn_branch(i, x) if gates[s] != 1.0 else x + fast.ffn_branch(i, x)
            continue
        hdn = fast.rms(x, p["n1"])
        q, k, v = (hdn @ p["qkv"].T).split([fast.H * fast.hd, fast.KV * fast.hd, fast.KV * fast.hd], -1)
        q = q.view(B, T, fast.H, fast.hd).transpose(1, 2)
        k = k.view(B, T, fast.KV, fast.hd).transpose(1, 2)
        v = v.view(B, T, fast.KV, fast.hd).transpose(1, 2)
        q = q * cos + fast.rotate_half(q) * sin
        k = k * cos + fast.rotate_half(k) * sin
        if i in cache:
            k = torch.cat([cache[i][0], k], 2)
            v = torch.cat([cache[i][1], v], 2)
        cache[i] = (k, v)
        rep = fast.H // fast.KV
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
        branch = o.transpose(1, 2).reshape(B, T, fast.H * fast.hd) @ p["o"].T
        x = x + branch if gates[s] == 1.0 else x + gates[s] * branch
    return x


def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    valid = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        valid[i, : len(r)] = True
    return ids, valid


def chunks_by_length(idx: list[int], ids: list[list[int]], size: int) -> list[list[int]]:
    order = sorted(idx, key=lambda i: (len(ids[i]), i))
    return [order[s : s + size] for s in range(0, len(order), size)]


def ce_sums(fast: FastLlama, hidden: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed next-token CE over real positions and their count (chunked lm_head)."""
    pred = valid[:, 1:]
    h = hidden[:, :-1][pred]
    tgt = ids[:, 1:][pred]
    losses = torch.cat([F.cross_entropy(fast.logits(h[s : s + 512]), tgt[s : s + 512], reduction="none")
                        for s in range(0, len(h), 512)]) if len(h) else torch.zeros(0)
    rows = torch.arange(ids.shape[0])[:, None].expand_as(pred)[pred]
    total = torch.zeros(ids.shape[0]).index_add_(0, rows, losses)
    return total, pred.sum(1).float()


def kl_mean(fast: FastLlama, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(dense || student) of the next-token distributions, chunked."""
    total = student_hidden.new_zeros(())
    for s in range(0, len(student_hidden), 256):
        with torch.no_grad():
            t = F.log_softmax(fast.logits(teacher_hidden[s : s + 256]), -1)
        st = F.log_softmax(fast.logits(student_hidden[s : s + 256]), -1)
        total = total + F.kl_div(st, t, log_target=True, reduction="sum")
    return total / max(len(student_hidden), 1)


# ----------------------------------------------------------------------------------------------- routing

def layout(gates: np.ndarray) -> str:
    b = np.asarray(gates).reshape(-1, 2)
    return " ".join(("A" if a else "-") + ("F" if f else "-") for a, f in b)


def removed_list(gates: np.ndarray) -> list[str]:
    return [f"{'A' if s % 2 == 0 else 'F'}{s // 2}" for s in np.flatnonzero(np.asarray(gates) == 0)]


def top_k(log_alpha: np.ndarray, removed: int) -> np.ndarray:
    order = sorted(range(len(log_alpha)), key=lambda i: (-float(log_alpha[i]), i))
    g = np.zeros(len(log_alpha), np.float32)
    g[order[: len(log_alpha) - removed]] = 1.0
    return g


def lowest(score: np.ndarray, removed: int) -> np.ndarray:
    g = np.ones(len(score), np.float32)
    g[np.argsort(score, kind="stable")[:removed]] = 0.0
    return g


class Scorer:
    """Exact loss of a whole hard mask on a fixed batch of one group's calibration texts, with the residual
    stream of the current mask cached at every sub-layer so a candidate runs from its first change only."""

    def __init__(self, fast: FastLlama, rows: list[list[int]], teacher: list[torch.Tensor] | None, loss: str, stride: int = 1) -> None:
        self.fast, self.loss = fast, loss
        self.ids, self.valid = pad(rows)
        if stride > 1:  # score every stride-th position only (the lm_head is a third of a cached evaluation)
            keep = torch.zeros_like(self.valid)
            keep[:, ::stride] = True
            self.score_valid = self.valid & keep
        else:
            self.score_valid = self.valid
        self.x0 = fast.embed_ids(self.ids)
        if loss == "kl":
            self.teacher = torch.cat(teacher)
        self.evals = 0
        self.cache_gates: np.ndarray | None = None
        self.states: list[torch.Tensor] = []

    @torch.no_grad()
    def _finish(self, x: torch.Tensor) -> float:
        h = self.fast.final_hidden(x)
        if self.loss == "kl":
            return float(kl_mean(self.fast, h[self.valid], self.teacher))
        # CE of the tokens after the scored positions: the target at t+1 counts when position t is scored
        pred = self.score_valid[:, :-1] & self.valid[:, 1:]
        logits_h = h[:, :-1][pred]
        tgt = self.ids[:, 1:][pred]
        total = sum(float(F.cross_entropy(self.fast.logits(logits_h[i : i + 512]), tgt[i : i + 512], reduction="sum"))
                    for i in range(0, len(logits_h), 512))
        return total / max(int(pred.sum()), 1)

    @torch.no_grad()
    def __call__(self, gates: np.ndarray, keep: bool = False) -> float:
        """Loss of `gates`; with keep, its states become the cache."""
        self.evals += 1
        start = 0
        if self.cache_gates is not None:
            diff = np.flatnonzero(self.cache_gates != gates)
            start = int(diff[0]) if diff.size else len(gates)
        x = self.x0 if start == 0 else self.states[start]
        record: list[torch.Tensor] | None = [] if keep else None
        x = self.fast.run(x, [float(g) for g in gates], start=start, record=record)
        if keep:
            self.states = self.states[:start] + record + [x] if start else record + [x]
            self.cache_gates = gates.copy()
        return self._finish(x)

    def gradient(self, gates: np.ndarray, rows: int) -> np.ndarray:
        """d loss / d gate at the hard mask (removed branches computed with gate 0), on the first `rows` texts."""
        g = torch.tensor(gates, requires_grad=True)
        x = self.fast.run(self.x0[:rows], g)
        h = self.fast.final_hidden(x)
        ids, valid = self.ids[:rows], self.valid[:rows]
        if self.loss == "kl":
            n = int(self.valid[:rows].sum())
            loss = kl_mean(self.fast, h[valid], self.teacher[:n])
        else:
            pred = valid[:, 1:]
            loss = F.cross_entropy(self.fast.logits(h[:, :-1][pred]), ids[:, 1:][pred])
        loss.backward()
        return g.grad.numpy().copy()


def removal_profile(scorer: Scorer) -> np.ndarray:
    """Loss increase when each sub-layer alone is removed from the dense model (prefix-cached from the dense run)."""
    S = 2 * scorer.fast.L
    scorer.cache_gates = None
    base = scorer(np.ones(S, np.float32), keep=True)
    return np.array([scorer(np.where(np.arange(S) == s, 0.0, 1.0).astype(np.float32)) - base for s in range(S)])


def swap_search(scorer: Scorer, starts: dict[str, np.ndarray], budget: int, profile: np.ndarray, tol: float = 1e-3) -> tuple[np.ndarray, dict]:
    """Best start by exact whole-mask loss, then first-improvement swap search: swaps (restore a removed r,
    remove a kept c) in order of the additive estimate profile[c] - profile[r] (the group's own single-removal
    losses), each evaluated EXACTLY on the whole mask; a swap that lowers the loss by more than `tol` is taken
    and the order recomputed. Stops after `budget` evaluations (starts included) or when none helps."""
    scorer.evals = 0
    scorer.cache_gates = None
    start_losses: dict[str, float] = {}
    for name, g in starts.items():
        same = next((other for other in start_losses if np.array_equal(starts[other], g)), None)
        start_losses[name] = start_losses[same] if same else scorer(g, keep=True)
    best_name = min(start_losses, key=start_losses.get)
    cur = starts[best_name].copy()
    cur_loss = start_losses[best_name]
    if not np.array_equal(scorer.cache_gates, cur):
        cur_loss = scorer(cur, keep=True)
        scorer.evals -= 1
    history, moves, tried = [cur_loss], [], set()
    while scorer.evals < budget:
        removed, kept = np.flatnonzero(cur == 0), np.flatnonzero(cur == 1)
        cands = sorted((profile[c] - profile[r], int(r), int(c)) for r in removed for c in kept
                       if (frozenset(np.flatnonzero(cur == 0)) - {r}) | {c} not in tried)
        moved = False
        for _, r, c in cands:
            if scorer.evals >= budget:
                break
            g = cur.copy()
            g[r], g[c] = 1.0, 0.0
            tried.add(frozenset(np.flatnonzero(g == 0)))
            loss = scorer(g)
            if loss < cur_loss - tol:
                moves.append((f"{'AF'[r % 2]}{r // 2}", f"{'AF'[c % 2]}{c // 2}", round(cur_loss - loss, 4)))
                cur, cur_loss = g, scorer(g, keep=True)
                scorer.evals -= 1  # the same mask again, only to refresh the cache
                history.append(cur_loss)
                moved = True
                break
        if not moved:
            break
    return cur, {"start_losses": start_losses, "start": best_name, "final_loss": cur_loss, "moves": len(moves),
                 "swaps (restored, removed, gain)": moves, "evals": scorer.evals, "history": history}


def train_gates(fast: FastLlama, rows: list[list[int]], teacher: list[torch.Tensor], removed: int, args, seed: int,
                accelerator) -> tuple[np.ndarray, dict]:
    """Hard-concrete gates over the 2L sub-layers, KL to the dense model + augmented-Lagrangian L0 toward 2L - removed kept.
    `teacher`: the dense model's final hidden states per text (the KL's targets); `args` gives steps, batch_size,
    lr, multiplier_lr, train_length; `accelerator` (accelerate) runs the backward pass."""
    from edgecompile.reference.hard_concrete import HardConcreteGates

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = 2 * fast.L
    target = (n - removed) / n
    # start with the expected kept share at the target, P(kept) = sigmoid(log_alpha + beta * log(1.1 / 0.1)): with few
    # steps, gates that start near "keep all" spend them walking down to the target instead of choosing
    la0 = math.log(target / (1 - target)) - (2.0 / 3.0) * math.log(1.1 / 0.1)
    mask = HardConcreteGates((n,), initial_keep=1 / (1 + math.exp(-la0)))
    opt = torch.optim.Adam([{"params": mask.gate_parameters(), "lr": args.lr},
                            {"params": mask.lagrangian_parameters(), "lr": args.multiplier_lr, "maximize": True}])
    rows = [r[: args.train_length] for r in rows]
    teacher = [t[: args.train_length] for t in teacher]
    order: list[int] = []
    kls, kept = [], []
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order += list(rng.permutation(len(rows)))
        chosen, order = order[: args.batch_size], order[args.batch_size:]
        ids, valid = pad([rows[i] for i in chosen])
        z = mask()
        h = fast.final_hidden(fast.run(fast.embed_ids(ids), z))
        kl = kl_mean(fast, h[valid], torch.cat([teacher[i] for i in chosen]))
        loss = kl + mask.penalty(target)
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        kls.append(float(kl.detach()))
        kept.append(float(mask.expected_kept_fraction().detach()) * n)
    la = mask.log_alpha.detach().numpy().copy()
    return la, {"kl_last10": float(np.mean(kls[-10:])), "expected_kept_end": kept[-1], "kl_curve": kls}


