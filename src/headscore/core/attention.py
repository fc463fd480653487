"""The shared pieces of headscore's attention functions (registered through transformers'
`AttentionInterface`): sdpa attention that stays fast after cached tokens, softmax rows of some queries over all
keys without repeating GQA keys, and switching a model's attention function.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from headscore.core.errors import HeadscoreError

QUERY_BLOCK = 256  # queries per sdpa call in a masked pass (see `sdpa_forward`)


def sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention (`sdpa_attention_forward`, same output [b, q, q_heads, d]), with the
    queries of a long masked causal pass taken in blocks of `QUERY_BLOCK` when they outnumber the keys before
    them.

    Why: a pass after cached tokens (a prompt's suffix on a shared prefix) comes with an explicit causal mask,
    and sdpa then scores every query against every key, the masked half of the new tokens' own square
    included: up to twice the attention work of a fresh prefill, which skips it. Block `i` reads only the keys
    its queries can see (a view, no copy), so the waste is at most half a block's square per block. The
    blocks cost calls of their own: with more cached keys than queries (waste under a third) one call is
    faster (`bench/bench_suffix.py`).
    `query` [b, q_heads, q, d], `key`/`value` [b, kv_heads, k, d], `attention_mask` [b, 1|heads, q, >= k].
    """
    q_len, k_len = query.shape[2], key.shape[2]
    plain = (not isinstance(attention_mask, torch.Tensor) or q_len <= max(QUERY_BLOCK, k_len - q_len) or dropout
             or not kwargs.get("is_causal", getattr(module, "is_causal", True))
             or any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux", "sinks")))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    past = k_len - q_len  # keys before the first query
    blocks = []
    for start in range(0, q_len, QUERY_BLOCK):
        stop = min(q_len, start + QUERY_BLOCK)
        seen = past + stop  # a causal query sees no key after its own position
        blocks.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:stop], key[:, :, :seen], value[:, :, :seen],
            attn_mask=attention_mask[:, :, start:stop, :seen], scale=scaling))
    return torch.cat(blocks, dim=2).transpose(1, 2).contiguous(), None


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
