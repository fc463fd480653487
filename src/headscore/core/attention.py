"""The shared pieces of headscore's attention functions (registered through transformers'
`AttentionInterface`): sdpa attention that stays fast after cached tokens, softmax rows of some queries over all
keys without repeating GQA keys, and switching a model's attention function.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from headscore.core.errors import HeadscoreError

# `model(..., **CAUSAL_SUFFIX)`: this pass runs right after cached tokens of the same unpadded sequence
CAUSAL_SUFFIX = {"causal_suffix": True}


@cache
def cpu_flash_kernel() -> tuple[Any, bool]:
    """`(kernel, reads grouped KV heads)`: torch's private CPU flash-attention op, or `(None, False)`.

    Why a private op: it is the only CPU attention that returns its log-sum-exps, which
    `causal_suffix_attention` needs to merge two unmasked calls into the masked result (public sdpa returns
    outputs only). The probe runs once per process: whether the op exists in this torch, and whether it maps
    query head h to KV head h // g itself (else the caller repeats the KV heads). Everything else uses public
    sdpa.
    """
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is None:
        return None, False
    query, key = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    try:
        grouped = kernel(query, key, key, 0.0, False)[0]
    except RuntimeError:
        return kernel, False
    return kernel, torch.allclose(grouped, kernel(query, key.expand(1, 2, 3, 8), key.expand(1, 2, 3, 8), 0.0,
                                                  False)[0])


def causal_suffix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            scaling: float | None = None) -> torch.Tensor:
    """Attention of the last `q` of `k` positions, each query seeing every key up to its own position.

    `query` [b, q_heads, q, d], `key`/`value` [b, kv_heads, k, d] (k > q). Returns [b, q_heads, q, d].
    On CPU: two calls of the flash kernel, the queries over the `k - q` earlier keys (no mask) and over their
    own `q` keys (causal), merged by their log-sum-exps: exactly the masked attention, with none of the masked
    half of the queries' own square computed and no mask read. Elsewhere: sdpa with a lower-right causal bias
    (fused kernels on CUDA).
    """
    return causal_suffix_parts(query, key, value, scaling)[0]


def causal_suffix_parts(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`causal_suffix_attention`'s output and, where the CPU flash kernel ran, each query's log-sum-exp of its
    scaled logits over every key it sees (float32 `[b, q_heads, q]`; None elsewhere)."""
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    kernel, groups_keys = cpu_flash_kernel() if query.device.type == "cpu" else (None, False)
    if kernel is None:
        return torch.nn.functional.scaled_dot_product_attention(
            query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=causal_lower_right(q_len, k_len),
            scale=scaling), None
    if groups > 1 and not groups_keys:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    past = k_len - q_len
    earlier, earlier_lse = kernel(query, key[:, :, :past], value[:, :, :past], 0.0, False, scale=scaling)[:2]
    own, own_lse = kernel(query, key[:, :, past:], value[:, :, past:], 0.0, True, scale=scaling)[:2]
    total = torch.logaddexp(earlier_lse, own_lse)  # [b, q_heads, q], float32
    merged = earlier * (earlier_lse - total).exp_().unsqueeze(-1) + own * (own_lse - total).exp_().unsqueeze(-1)
    return merged.to(query.dtype), total


def sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 causal_suffix: bool = False, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention (`sdpa_attention_forward`, same output [b, q, q_heads, d]), with a pass of
    several tokens after cached ones computed by `causal_suffix_attention` when the caller says so.

    `causal_suffix=True` (a model forward argument, `CAUSAL_SUFFIX`, that transformers hands every attention
    call): the caller knows this pass runs right after cached tokens of the same sequence, unpadded (a prompt's
    suffix on a shared prefix), so its mask is the lower-right causal one and is not read. Why: sdpa with that
    explicit mask scores every query against every key, the masked half of the new tokens' own square
    included: up to twice the attention work of a fresh prefill (`bench/bench_suffix.py`). Without the flag,
    and with dropout or a position bias, transformers' function runs. Logit soft-capping (Gemma 2's
    `softcap`) and learned sinks (gpt-oss's `s_aux`), which sdpa cannot express, go to `blocked_attention`.
    `query` [b, q_heads, q, d], `key`/`value` [b, kv_heads, k, d], `attention_mask` [b, 1|heads, q, >= k].
    """
    q_len, k_len = query.shape[2], key.shape[2]
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    if softcap is not None or sinks is not None:
        mask = attention_mask[..., :k_len] if isinstance(attention_mask, torch.Tensor) else None
        return blocked_attention(query, key, value, scaling, mask=mask, softcap=softcap, sinks=sinks), None
    if causal_suffix and k_len > q_len > 1 and not dropout and kwargs.get("position_bias") is None:
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
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of some queries over all keys, in float32.

    `query` [b, q_heads, q, d], `key` [b, kv_heads, k, d] (GQA: query head `h` reads KV head
    `h // (q_heads // kv_heads)`; the keys are not repeated in memory). `mask`, broadcastable to
    [b, q_heads, q, k], is a boolean keep-mask or an additive float mask. `causal_offset`: the key index of
    query row 0, so row `i` sees keys `j <= causal_offset + i` (ignored when `mask` is given; None = no
    causal mask). `softcap`: logits become `softcap * tanh(logits / softcap)` before masking (Gemma 2);
    `sinks` [q_heads]: one learned logit per head joins each row's softmax and is dropped after (gpt-oss), so
    a row sums to less than 1. Returns probs [b, q_heads, q, k], as eager attention's `output_attentions`.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if q_heads % kv_heads:
        raise HeadscoreError(f"{q_heads} query heads do not split evenly over {kv_heads} KV heads")
    scale = dim**-0.5 if scaling is None else scaling
    grouped = query.float().reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, dim)
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)).mul_(scale)
    scores = scores.view(batch, q_heads, q_len, k_len)
    if softcap is not None:
        scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    elif causal_offset is not None:
        rows = torch.arange(q_len, device=scores.device)[:, None] + causal_offset
        hidden = torch.arange(k_len, device=scores.device)[None, :] > rows
        scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = sinks.float().view(1, q_heads, 1, 1).expand(batch, q_heads, q_len, 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :k_len]


def blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None = None,
                      *, mask: torch.Tensor | None = None, softcap: float | None = None,
                      sinks: torch.Tensor | None = None, max_logits: int = 1 << 24) -> torch.Tensor:
    """Exact attention with the terms sdpa cannot express (soft-capped logits, learned sinks), computed by
    blocks of queries so that at most about `max_logits` float32 logits exist at once (never the whole
    queries × keys matrix of a long prefill). Costs eager attention's work (no fused kernel), in float32.

    `query` [b, q_heads, q, d], `key`/`value` [b, kv_heads, k, d]; `mask` a boolean keep-mask or additive
    mask broadcastable to [b, q_heads, q, k], or None: causal, the queries being the last q of the k
    positions. `softcap`, `sinks`: as `attention_rows`. Returns [b, q, q_heads, d] (sdpa_forward's layout).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    block = max(1, max_logits // max(1, batch * q_heads * k_len))
    grouped_value = value.float()
    parts = []
    for start in range(0, q_len, block):  # loop over query blocks (memory bound), not over heads or tokens
        stop = min(start + block, q_len)
        rows = attention_rows(query[:, :, start:stop], key, scaling,
                              mask=None if mask is None else mask[..., start:stop, :],
                              causal_offset=k_len - q_len + start, softcap=softcap, sinks=sinks)
        probs = rows.view(batch, kv_heads, (q_heads // kv_heads) * (stop - start), k_len)
        parts.append(torch.matmul(probs, grouped_value).view(batch, q_heads, stop - start, dim))
    return torch.cat(parts, dim=2).to(query.dtype).transpose(1, 2).contiguous()


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
