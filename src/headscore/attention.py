"""Attention functions registered through transformers' `AttentionInterface`.

Capture part: `capture_attention_forward` computes every layer's output with sdpa, exactly as the `sdpa`
implementation does, and, only while an `AttentionCapture` is armed, also computes the softmax attention rows
of the last few queries (`attention_rows`) and keeps them. Memory per capture is
O(layers × heads × rows × context); the context × context attention matrix is never materialized.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headscore.errors import HeadscoreError

CAPTURE_ATTENTION = "headscore_capture"


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


class AttentionCapture:
    """Rows captured in one forward pass: arm it with `arm(rows)`, run the model, read them with `take()`.

    While armed, every layer stores the attention rows of its last `rows` queries, [b, q_heads, rows, k].
    """

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.rows = 0
        self._store: list[torch.Tensor | None] = [None] * layers

    @property
    def armed(self) -> bool:
        return self.rows > 0

    def arm(self, rows: int) -> None:
        """Capture the last `rows` queries of every layer in the next forward pass."""
        self.rows = rows
        self._store = [None] * self.layers

    def record(self, module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
               scaling: float | None) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer is None or not 0 <= layer < self.layers:
            raise HeadscoreError(f"attention module {type(module).__name__} has no usable layer_idx "
                                 f"({layer!r})")
        q_len, k_len = query.shape[2], key.shape[2]
        rows = min(self.rows, q_len)
        mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4:
            mask = attention_mask[..., -rows:, :k_len]
        self._store[layer] = attention_rows(query[:, :, q_len - rows:], key, scaling, mask=mask,
                                            causal_offset=k_len - rows)

    def take(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The captured rows, [layers, b, q_heads, rows, k] on `device` (default: layer 0's), and disarm.

        A layer that reported nothing means the model does not call the attention interface: an error.
        """
        store, self._store, self.rows = self._store, [None] * self.layers, 0
        missing = [layer for layer, rows in enumerate(store) if rows is None]
        if missing:
            if len(missing) == self.layers:
                raise HeadscoreError("the model's attention does not go through transformers' "
                                     "AttentionInterface (no layer called the registered capture function); "
                                     "this model type cannot be scored")
            raise HeadscoreError(f"layers {missing[:8]} did not call the registered attention function "
                                 "(not standard attention layers); this model type cannot be scored")
        lengths = {rows.shape[-1] for rows in store}
        if len(lengths) > 1:
            raise HeadscoreError(f"layers see different context lengths {sorted(lengths)} (a sliding-window "
                                 "or hybrid cache); positions would not line up: this model cannot be scored")
        target = store[0].device if device is None else torch.device(device)
        return torch.stack([rows.to(target) for rows in store])


_ACTIVE: list[AttentionCapture] = []


def capture_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None,
                              scaling: float | None = None, dropout: float = 0.0,
                              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa attention (transformers' own function, same output) plus row capture while a capture is armed."""
    output = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                    scaling=scaling, **kwargs)
    if _ACTIVE and _ACTIVE[-1].armed:
        _ACTIVE[-1].record(module, query, key, attention_mask, scaling)
    return output


AttentionInterface.register(CAPTURE_ATTENTION, capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


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


@contextmanager
def attention_capture(model: Any, layers: int) -> Iterator[AttentionCapture]:
    """The model runs the capture attention function inside the block; arm the yielded capture to record."""
    capture = AttentionCapture(layers)
    with use_attention(model, CAPTURE_ATTENTION):
        _ACTIVE.append(capture)
        try:
            yield capture
        finally:
            _ACTIVE.remove(capture)


# ---------------------------------------------------------------------------------------------- head-wise part
# Attention over `headscore.cache.HeadwiseCache`: each head's kept prompt entries plus the generated tail.

HEADWISE_ATTENTION = "headscore_headwise"


def headwise_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, head: torch.Tensor,
                       heads: int, tail_keys: torch.Tensor, tail_values: torch.Tensor,
                       scaling: float | None = None) -> torch.Tensor:
    """Exact attention of new queries over a head-wise cache, without loops over heads.

    `query` [q_heads, q, d] (the last q tokens); `keys`/`values` [total, d] the kept prompt entries, `head`
    [total] the cache head of each (query head `h` reads cache head `h // (q_heads // heads)`);
    `tail_keys`/`tail_values` [kv_heads, t, d] the generated tokens, the last q of them being the queries'
    own (causal among themselves). One softmax over [prompt entries of the head's cache head, tail] per
    query head: the prompt logits are computed against all entries ([q_heads, q, total], dense matmul) and
    the other heads' entries masked out. Returns [q_heads, q, d] in the query's dtype.
    """
    q_heads, q_len, dim = query.shape
    kv_heads, t_len = tail_keys.shape[0], tail_keys.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    flat = query.reshape(q_heads * q_len, dim).float()  # logits in float32, as sdpa keeps them
    prompt = torch.matmul(flat, keys.float().t()).view(q_heads, q_len, -1).mul_(scale)
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
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    layer = key
    if layer.pending is not None:
        keys, values = layer.pending
        output = sdpa_attention_forward(module, query, keys[None], values[None], attention_mask,
                                        dropout=dropout, scaling=scaling, **kwargs)
        layer.finish_prefill(query[0], scaling)
        return output
    out = headwise_attention(query[0], layer.keys, layer.values, layer.head, layer.heads, layer.tail_keys,
                             layer.tail_values, scaling)
    return out.transpose(0, 1)[None], None


AttentionInterface.register(HEADWISE_ATTENTION, headwise_attention_forward)
