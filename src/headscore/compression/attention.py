"""Attention over `headscore.compression.cache.HeadwiseCache` (registered through transformers'
`AttentionInterface`): each head's kept prompt entries plus the generated tail, exact, with no loops over heads.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headscore.core.attention import sdpa_forward

HEADWISE_ATTENTION = "headscore_headwise"


def headwise_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, head: torch.Tensor,
                       heads: int, tail_keys: torch.Tensor, tail_values: torch.Tensor,
                       scaling: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of new queries over a head-wise cache, without loops over heads.

    `query` [q_heads, q, d] (the last q tokens); `keys`/`values` [total, d] the kept prompt entries, `head`
    [total] the cache head of each (query head `h` reads cache head `h // (q_heads // heads)`);
    `tail_keys`/`tail_values` [kv_heads, t, d] the generated tokens, the last q of them being the queries'
    own (causal among themselves). One softmax over [prompt entries of the head's cache head, tail] per
    query head: the prompt logits are computed against all entries ([q_heads, q, total], dense matmul) and
    the other heads' entries masked out. `bias` [total] float32 (or None) is added to each entry's prompt
    logits (a summary entry standing for c tokens carries log c). Returns [q_heads, q, d] in the query's dtype.
    """
    q_heads, q_len, dim = query.shape
    kv_heads, t_len = tail_keys.shape[0], tail_keys.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    flat = query.reshape(q_heads * q_len, dim).float()  # logits in float32, as sdpa keeps them
    prompt = torch.matmul(flat, keys.float().t()).view(q_heads, q_len, -1).mul_(scale)
    if bias is not None:
        prompt = prompt.add_(bias)
    owner = torch.arange(q_heads, device=query.device) // (q_heads // heads)
    foreign = head[None, :] != owner[:, None]  # [q_heads, total]
    prompt = prompt.masked_fill_(foreign[:, None, :], float("-inf"))
    grouped = flat.view(kv_heads, (q_heads // kv_heads) * q_len, dim)
    tail = torch.matmul(grouped, tail_keys.float().transpose(1, 2)).view(q_heads, q_len, t_len).mul_(scale)
    if q_len > 1:
        rows = torch.arange(q_len, device=query.device)[:, None] + (t_len - q_len)
        tail = tail.masked_fill_(torch.arange(t_len, device=query.device)[None, :] > rows, float("-inf"))
    probs = torch.softmax(torch.cat([prompt, tail], dim=-1), dim=-1).to(values.dtype)
    total = keys.shape[0]
    out = torch.matmul(probs[..., :total].reshape(q_heads * q_len, total), values).view(q_heads, q_len, dim)
    tail_probs = probs[..., total:].reshape(kv_heads, (q_heads // kv_heads) * q_len, t_len)
    return out + torch.matmul(tail_probs, tail_values).view(q_heads, q_len, dim)


def headwise_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: Any, value: Any,
                               attention_mask: torch.Tensor | None, scaling: float | None = None,
                               dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered function for `HeadwiseCache` (plain tensors, e.g. a DynamicCache: exactly sdpa).

    `key` is a `HeadwiseLayer` (what its `update` returns). At prefill: the exact sdpa output over the full
    keys/values, then the layer selects what it keeps. At decode: `headwise_attention` over the layer.
    Output [b, q, q_heads, d] as sdpa's.
    """
    if isinstance(key, torch.Tensor):
        return sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = key
    if layer.pending is not None:
        keys, values = layer.pending
        output = sdpa_forward(module, query, keys[None], values[None], attention_mask, dropout=dropout,
                              scaling=scaling, **kwargs)
        layer.finish_prefill(query[0], scaling)
        return output
    out = headwise_attention(query[0], layer.keys, layer.values, layer.head, layer.heads, layer.tail_keys,
                             layer.tail_values, scaling, layer.bias)
    return out.transpose(0, 1)[None], None


AttentionInterface.register(HEADWISE_ATTENTION, headwise_attention_forward)
# sdpa's masks: without a registered mask function transformers passes none, and sdpa's own causal flag is only
# right when the queries see no earlier cached keys (a prefill after a shared prefix does)
AttentionMaskInterface.register(HEADWISE_ATTENTION, sdpa_mask)
