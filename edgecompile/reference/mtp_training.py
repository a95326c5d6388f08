"""Training multi-token-prediction heads (Gloeckle et al., ICML 2024) in the checkpoint contract of families/mtp.py.

The model is transformers' LlamaForCausalLM, whose layers 0..L-2 are the trunk and layer L-1 is head 0,
plus one transformers LlamaDecoderLayer per extra head; head j predicts token t+1+j from the trunk's
output, through the shared final norm and unembedding: the forward families/mtp.py's reference runs.

Two orders of the backward pass, giving the same gradients:
- naive: every head's forward and loss, then one backward through everything (all n heads' graphs,
  logits included, are alive at once);
- memory-saving (the paper's): the trunk forward once; for each head in turn its forward, its loss and
  its backward into the (detached) trunk output, where the gradients accumulate; then the trunk's
  backward once. Only one head's graph is alive at a time.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def causal_mask(length: int) -> torch.Tensor:
    """Additive [1, 1, S, S] causal mask (0 on and below the diagonal), broadcast over the batch."""
    return torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]


class MultiTokenLlama(torch.nn.Module):
    """A LlamaForCausalLM plus `extra` heads, each a copy of head 0 (layer L-1) at the start."""

    def __init__(self, model: Any, n_future_tokens: int) -> None:
        super().__init__()
        if n_future_tokens < 1 or model.config.num_hidden_layers < 2:
            raise ValueError(f"multi-token prediction: expected n_future_tokens >= 1 and at least 2 layers (trunk + head 0), "
                             f"found {n_future_tokens} and {model.config.num_hidden_layers}")
        self.model = model
        self.extra_heads = torch.nn.ModuleList(copy.deepcopy(model.model.layers[-1]) for _ in range(n_future_tokens - 1))

    @property
    def heads(self) -> list[torch.nn.Module]:
        return [self.model.model.layers[-1], *self.extra_heads]

    def trunk(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The trunk's output (residual stream after layer L-2) and what every head layer needs besides it."""
        body = self.model.model
        hidden = body.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        context = {"attention_mask": causal_mask(ids.shape[1]), "position_ids": positions,
                   "position_embeddings": body.rotary_emb(hidden, positions)}
        for layer in body.layers[:-1]:
            hidden = _hidden(layer(hidden, **context))
        return hidden, context

    def head_logits(self, j: int, trunk: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        """[B, S, V] logits of head j (head j at position t predicts token t+1+j)."""
        return self.model.lm_head(self.model.model.norm(_hidden(self.heads[j](trunk, **context))))

    def head_loss(self, j: int, trunk: torch.Tensor, context: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of head j against the tokens j+1 places ahead (positions that have one)."""
        logits = self.head_logits(j, trunk, context)[:, : ids.shape[1] - 1 - j]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1 + j :].reshape(-1))

    def step_naive(self, ids: torch.Tensor) -> list[float]:
        """All heads' losses, then one backward of their mean. Returns each head's loss."""
        trunk, context = self.trunk(ids)
        losses = [self.head_loss(j, trunk, context, ids) for j in range(len(self.heads))]
        (sum(losses) / len(losses)).backward()
        return [float(loss.detach()) for loss in losses]

    def step_memory_saving(self, ids: torch.Tensor) -> list[float]:
        """Trunk forward once; per head forward, loss, backward into the trunk output; trunk backward once.
        The same gradients as step_naive (the mean of the heads' losses)."""
        trunk, context = self.trunk(ids)
        detached = trunk.detach().requires_grad_()
        losses = []
        for j in range(len(self.heads)):
            loss = self.head_loss(j, detached, context, ids)
            (loss / len(self.heads)).backward()  # frees this head's graph; its gradient adds into detached.grad
            losses.append(float(loss.detach()))
        trunk.backward(detached.grad)
        return losses

    def save(self, out: Path) -> Path:
        """The contract of families/mtp.py: the LlamaForCausalLM folder, `extra_heads.{j}.*` tensors
        beside its own in model.safetensors, `n_future_tokens` in config.json."""
        from safetensors.torch import load_file, save_file

        out = Path(out)
        self.model.save_pretrained(str(out), safe_serialization=True)
        weights = out / "model.safetensors"
        tensors = load_file(str(weights))
        for j, head in enumerate(self.extra_heads):
            tensors.update({f"extra_heads.{j}.{name}": value.detach().clone().contiguous() for name, value in head.state_dict().items()})
        save_file(tensors, str(weights), metadata={"format": "pt"})
        config = json.loads((out / "config.json").read_text())
        config["n_future_tokens"] = len(self.heads)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return out
