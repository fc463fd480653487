"""A full-attention KV cache that grows in place: decoding appends without copying the whole cache.

transformers' `DynamicLayer` concatenates every new token onto its keys and values, so each decode step copies
the layer's entire cache (`bench/bench_batch.py --parts e` times a 17-row decode step both ways). `GrowingLayer`
keeps its keys and values in a buffer with room for `RESERVE` more tokens and writes new entries into it; its
`keys`/`values` are views of the filled part, so everything that reads a `DynamicLayer` reads it unchanged, and
attention gets the same numbers (the views hold the same values; only the buffer's stride differs).

A view is overwritten when the cache is cropped and extended again, so use `growing_cache` where the cache's
tensors do not outlive the next update (a decode's cache); caches whose entries are handed out and then cropped
(the prefix cache) keep `DynamicLayer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from headscore.core.model import cache_config

RESERVE = 256  # tokens of room added whenever the buffer is (re)allocated


def extend_buffer(buffer: torch.Tensor | None, length: int, states: torch.Tensor, room: int = RESERVE
                  ) -> torch.Tensor:
    """Write `states` `[rows, heads, tokens, d]` after the first `length` tokens of `buffer` `[rows, heads,
    capacity, d]` and return the buffer: in place when it has room, else a new buffer with `room` tokens of
    room more, holding `buffer`'s first `length` tokens (None: no cached tokens). Views of its first tokens
    then read exactly what `torch.cat` would have built."""
    end = length + states.shape[2]
    if buffer is None or buffer.shape[2] < end:
        grown = states.new_empty(states.shape[0], states.shape[1], end + room, states.shape[3])
        if length and buffer is not None:
            grown[:, :, :length].copy_(buffer[:, :, :length])
        buffer = grown
    buffer[:, :, length:end].copy_(states)
    return buffer


def select_rows(buffer: torch.Tensor, length: int, indices: torch.Tensor) -> torch.Tensor:
    """A new buffer of rows `indices` (on the buffer's device; repeats allowed) of `buffer` `[rows, heads,
    capacity, d]`, as much room, holding their first `length` tokens: only those are copied."""
    selected = buffer.new_empty(indices.shape[0], *buffer.shape[1:])
    if length:
        torch.index_select(buffer[:, :, :length], 0, indices, out=selected[:, :, :length])
    return selected


def keep_rows(buffer: torch.Tensor, length: int, rows: Sequence[int]) -> torch.Tensor:
    """Rows `rows` (increasing: rows leaving a batch) of `buffer` `[rows, heads, capacity, d]` moved to its front in
    place, their first `length` tokens (a row already in place is not copied): returns the view of those rows,
    room kept. Nothing is allocated (a copy into new memory would also pay for its first touch)."""
    for position, row in enumerate(rows):  # rows, not heads or tokens; a row never overwrites one still to move
        if row != position:
            buffer[position, :, :length].copy_(buffer[row, :, :length])
    return buffer[:len(rows)]


class GrowingLayer(DynamicLayer):
    """`DynamicLayer` that appends into a preallocated `[rows, kv_heads, capacity, head_dim]` buffer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _holds_views(self) -> bool:
        """Whether `keys`/`values` are still the leading part of the buffers (nothing replaced them)."""
        buffer, keys = self._key_buffer, self.keys
        return (buffer is not None and keys is not None and keys.ndim == 4
                and keys.data_ptr() == buffer.data_ptr() and keys.shape[:2] == buffer.shape[:2]
                and keys.stride() == buffer.stride() and self.values is not None
                and self._value_buffer is not None and self.values.data_ptr() == self._value_buffer.data_ptr())

    def _fits(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int) -> bool:
        """Whether the buffers can take the new states in place: they still back the cached `length` entries,
        have room up to `end`, and match the states' rows, heads, dims, dtype and device."""
        if self._key_buffer is None or self._value_buffer is None or (length and not self._holds_views()):
            return False
        buffers = (self._key_buffer, self._value_buffer)
        return all(end <= buffer.shape[2] and buffer.dtype == states.dtype and buffer.device == states.device
                   and buffer.shape[:2] + buffer.shape[3:] == states.shape[:2] + states.shape[3:]
                   for buffer, states in zip(buffers, (key_states, value_states), strict=True))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `key_states`/`value_states` `[rows, kv_heads, tokens, head_dim]`; return every cached entry."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if self._fits(key_states, value_states, length, end):
            keys, values = self._key_buffer, self._value_buffer
        else:  # the cached entries (wherever they are) start new buffers
            keys, values = self.keys if length else None, self.values if length else None
        self._key_buffer = extend_buffer(keys, length, key_states)
        self._value_buffer = extend_buffer(values, length, value_states)
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep batch rows `indices` (the buffer's room is kept)."""
        if self.get_seq_length() > 0 and self._holds_views():
            assert self._key_buffer is not None and self._value_buffer is not None
            length = self.get_seq_length()
            self._key_buffer = select_rows(self._key_buffer, length, indices.to(self._key_buffer.device))
            self._value_buffer = select_rows(self._value_buffer, length, indices.to(self._value_buffer.device))
            self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]
        else:
            super().batch_select_indices(indices)

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def growing_cache(config: Any = None) -> DynamicCache:
    """A `DynamicCache` (for `config`'s layer kinds) whose plain full-attention layers are `GrowingLayer`s;
    sliding-window and other special layers stay transformers' own (a model whose every layer is sliding gets
    full-attention layers: `core.model.cache_config`)."""
    config = cache_config(config)
    cache = DynamicCache() if config is None else DynamicCache(config=config)
    if config is None:
        cache.layer_class_to_replicate = GrowingLayer
    else:
        cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
