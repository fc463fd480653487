"""The shared pieces of headscore's attention functions (registered through transformers'
`AttentionInterface`): sdpa attention that stays fast after cached tokens, softmax rows of some queries over all
keys without repeating GQA keys, and switching a model's attention function.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from headscore.core.errors import HeadscoreError

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_LAST_MASK: tuple[Any, tuple[int, int], bool] | None = None  # (weakref to a mask, (q, k), verdict)


def is_causal_suffix_mask(mask: Any, q_len: int, k_len: int) -> bool:
    """Whether `mask` (boolean [b, 1|heads, q, >= k]) lets query `i` see exactly keys `0 .. k - q + i`: the
    mask of a pass run after `k - q` cached tokens, no padding. One check per mask (every layer of a forward
    pass gets the same mask object)."""
    global _LAST_MASK
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[-2] != q_len:
        return False
    if _LAST_MASK is not None and _LAST_MASK[0]() is mask and _LAST_MASK[1] == (q_len, k_len):
        return _LAST_MASK[2]
    expected = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril(k_len - q_len)
    verdict = mask.shape[-1] >= k_len and bool((mask[..., :k_len] == expected).all())
    _LAST_MASK = (weakref.ref(mask), (q_len, k_len), verdict)
    return verdict


@cache
def _flash_cpu_groups_keys() -> bool:
    """Whether this torch's CPU flash kernel reads grouped KV heads itself (query head h -> KV head h // g)."""
    if _FLASH_CPU is None:
        return False
    query, key = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    try:
        grouped = _FLASH_CPU(query, key, key, 0.0, False)[0]
    except RuntimeError:
        return False
    return torch.allclose(grouped, _FLASH_CPU(query, key.expand(1, 2, 3, 8), key.expand(1, 2, 3, 8), 0.0, False)[0])


def causal_suffix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            scaling: float | None = None) -> torch.Tensor:
    """Attention of the last `q` of `k` positions, each query seeing every key up to its own position.

    `query` [b, q_heads, q, d], `key`/`value` [b, kv_heads, k, d] (k > q). Returns [b, q_heads, q, d].
    On CPU: two calls of the flash kernel, the queries over the `k - q` earlier keys (no mask) and over their
    own `q` keys (causal), merged by their log-sum-exps: exactly the masked attention, with none of the masked
    half of the queries' own square computed and no mask read. Elsewhere: sdpa with a lower-right causal bias
    (fused kernels on CUDA).
    """
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    if query.device.type != "cpu" or _FLASH_CPU is None:
        return torch.nn.functional.scaled_dot_product_attention(
            query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=causal_lower_right(q_len, k_len),
            scale=scaling)
    if groups > 1 and not _flash_cpu_groups_keys():
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    past = k_len - q_len
    earlier, earlier_lse = _FLASH_CPU(query, key[:, :, :past], value[:, :, :past], 0.0, False, scale=scaling)[:2]
    own, own_lse = _FLASH_CPU(query, key[:, :, past:], value[:, :, past:], 0.0, True, scale=scaling)[:2]
    total = torch.logaddexp(earlier_lse, own_lse)  # [b, q_heads, q], float32
    merged = earlier * (earlier_lse - total).exp_().unsqueeze(-1) + own * (own_lse - total).exp_().unsqueeze(-1)
    return merged.to(query.dtype)


def sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention (`sdpa_attention_forward`, same output [b, q, q_heads, d]), with a pass of
    several tokens after cached ones (a prompt's suffix on a shared prefix) computed by
    `causal_suffix_attention`.

    Why: such a pass comes with an explicit causal mask, and sdpa then scores every query against every key,
    the masked half of the new tokens' own square included: up to twice the attention work of a fresh
    prefill, which skips it through sdpa's causal flag (`bench/bench_suffix.py`). Any other mask (padding,
    sliding windows, bidirectional), dropout, or extra terms (softcap, sinks) go to transformers' function.
    `query` [b, q_heads, q, d], `key`/`value` [b, kv_heads, k, d], `attention_mask` [b, 1|heads, q, >= k].
    """
    q_len, k_len = query.shape[2], key.shape[2]
    if (k_len > q_len > 1 and not dropout and is_causal_suffix_mask(attention_mask, q_len, k_len)
            and all(kwargs.get(name) is None for name in ("position_bias", "softcap", "s_aux", "sinks"))):
        return causal_suffix_attention(query, key, value, scaling).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


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
