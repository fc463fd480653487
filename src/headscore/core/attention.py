"""The shared pieces of headscore's attention functions (registered through transformers'
`AttentionInterface`): softmax rows of some queries over all keys without repeating GQA keys, and switching a
model's attention function.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from headscore.core.errors import HeadscoreError


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float | None = None,
    *,
    mask: torch.Tensor | None = None,
    causal_offset: int | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of some queries over all keys, in float32.

    `query` [b, q_heads, q, d], `key` [b, kv_heads, k, d] (GQA: query head `h` reads KV head
    `h // (q_heads // kv_heads)`; the keys are not repeated in memory). `mask`, broadcastable to
    [b, q_heads, q, k], is a boolean keep-mask or an additive float mask. `causal_offset`: the key index of
    query row 0, so row `i` sees keys `j <= causal_offset + i` (ignored when `mask` is given; None = no
    causal mask). Returns probs [b, q_heads, q, k].
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if q_heads % kv_heads:
        raise HeadscoreError(f"{q_heads} query heads do not split evenly over {kv_heads} KV heads")
    scale = dim**-0.5 if scaling is None else scaling
    grouped = query.float().reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, dim)
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)).mul_(scale)
    scores = scores.view(batch, q_heads, q_len, k_len)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    elif causal_offset is not None:
        rows = torch.arange(q_len, device=scores.device)[:, None] + causal_offset
        hidden = torch.arange(k_len, device=scores.device)[None, :] > rows
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, dim=-1)


@contextmanager
def use_attention(model: Any, name: str) -> Iterator[None]:
    """Switch `model` to the registered attention function `name` inside the block, then restore it."""
    if not type(model)._can_set_attn_implementation():
        raise HeadscoreError(f"model type {type(model).__name__} does not route attention through "
                             "transformers' AttentionInterface; headscore's attention functions cannot run")
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
