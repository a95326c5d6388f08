"""Multi-token-prediction heads on a decoder (Gloeckle et al., ICML 2024): the checkpoint contract and the reference.

Contract: a decoder folder of a family with `multi_token_heads` (Llama) whose `num_hidden_layers = L`
holds the trunk (layers 0..L-2) and head 0 (layer L-1), plus `n_future_tokens - 1` extra heads stored
in model.safetensors under `extra_heads.{j}.` with the parameter names of the family's decoder layer;
head j+1 (tensors `extra_heads.{j}.*`) predicts token t+2+j. Every head reads the trunk's output (the
residual stream after layer L-2) and shares the final norm and the unembedding.

The reference for head 0 is transformers' own causal LM (it ignores `extra_heads.*`); each extra head
is the family's transformers decoder layer loaded with its tensors and run on the trunk output,
captured as the input of head 0's layer L-1, so the cluster's gates on the trunk apply to every head.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def load_extra_heads(family: Any, model: Any, weights: dict[str, np.ndarray], extra_heads: int) -> list[Any]:
    """One of the family's transformers decoder layers per extra head, loaded with `extra_heads.{j}.*`, eval mode."""
    import torch

    layers = []
    for j in range(extra_heads):
        layer = family.decoder_layer(model.config)
        prefix = f"extra_heads.{j}."
        state = {name[len(prefix):]: torch.from_numpy(array) for name, array in weights.items() if name.startswith(prefix)}
        layer.load_state_dict(state, strict=True)
        layers.append(layer.eval())
    return layers


def _causal_mask(length: int) -> Any:
    import torch

    mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
    return mask[None, None]


def head_logits(model: Any, extra_layers: list[Any], prompt: list[int]) -> list[np.ndarray]:
    """Prefill logits [S, V] of every head (head 0 first) for one prompt, trunk computed once."""
    import torch

    head_0 = model.model.layers[model.config.num_hidden_layers - 1]
    captured: list[torch.Tensor] = []

    def keep(_module, args, kwargs):  # head 0's input is the trunk's output (the embeddings when L = 1)
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = head_0.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            ids = torch.tensor([prompt])
            logits = [model(ids).logits[0].numpy().copy()]
            trunk = captured[-1]
            positions = torch.arange(len(prompt))[None]
            position_embeddings = model.model.rotary_emb(trunk, positions)
            for layer in extra_layers:
                out = layer(trunk, attention_mask=_causal_mask(len(prompt)), position_ids=positions,
                            position_embeddings=position_embeddings)
                hidden = out[0] if isinstance(out, tuple) else out
                logits.append(model.lm_head(model.model.norm(hidden))[0].numpy().copy())
    finally:
        handle.remove()
    return logits
