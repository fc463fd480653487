"""The head-wise variable-length KV cache.

Each layer stores, for every cache head (a KV head, or a query head for query-granularity budgets), only the
prompt entries that head kept, flattened head after head:

- `keys`, `values`: `[total_kept, head_dim]`, the kept prompt entries of head 0, then head 1, ... each head's
  entries in original order (so their RoPE positions are the original ones);
- `head`: int16 `[total_kept]`, the cache head of each entry; `kept`: int64 `[heads]`, entries per head;
- `tail_keys`, `tail_values`: `[kv_heads, generated, head_dim]`, the dense tail of generated tokens, shared
  by all heads (every head attends to every generated token).

Storage is Σ kept × head_dim × 2 × dtype size plus the tail: no padding to the largest head, no mask.
The cache plugs into transformers through `Cache.update`: at prefill a layer holds the full keys/values until
the registered attention function (`headscore.attention.headwise_attention_forward`) has computed the exact
output and the window scores; then the layer is compressed (or, in recording mode, kept whole for
`headscore.generation.prefill`). At decode, `update` appends to the tail and hands the layer itself to the
attention function as `key` and `value`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, get_layer_types_and_kwargs

from headscore.compression.presses import Press, kept_positions, window_scores
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry

PrefillHook = Callable[["HeadwiseLayer", torch.Tensor, torch.Tensor, torch.Tensor], None]


def select_entries(scores: torch.Tensor, press: Press, layer: int, geometry: Geometry,
                   length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which prompt entries each cache head keeps.

    `scores`: the layer's window scores `[q_heads, m]`, m = `length` − window. Returns `(head, position,
    kept)`: int64 `[total]` cache head and prompt position of every kept entry (head-major, positions
    ascending; the window included) and the CPU int64 `[heads]` entries per head.
    """
    selection_scores = press.head_scores(scores, press.cache_heads(geometry))
    budgets = press.layer_budgets(layer, selection_scores, geometry)
    return kept_positions(selection_scores, budgets, length - scores.shape[1])


class HeadwiseLayer(CacheLayerMixin):
    """One layer of `HeadwiseCache` (see the module docstring for the storage)."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, index: int, window: int, on_prefill: PrefillHook) -> None:
        super().__init__()
        self.index = index
        self.window = window
        self.on_prefill = on_prefill
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.selection_seconds = 0.0  # wall time of window scores + selection at prefill (no device sync)
        self.prompt_length = 0
        self.head: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None
        self.heads = 0
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None
        self.bias: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.tail_keys = key_states.new_empty(key_states.shape[1], 0, key_states.shape[-1])
        self.tail_values = value_states.new_empty(value_states.shape[1], 0, value_states.shape[-1])
        self.is_initialized = True

    def seed(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Start the prefill from already computed states `[1, kv_heads, s, d]` of the prompt's first s tokens
        (a shared prefix): the prefill pass then runs only the rest, and the layer holds all n."""
        self.lazy_initialization(keys, values)
        self.prefix = (keys[0], values[0])
        self.prompt_length = keys.shape[2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill: hold the full `[1, kv_heads, n, d]` states (after the seeded prefix, if any) until the
        attention function compresses them. Decode: append to the tail. Returns `(self, self)`: the attention
        function reads this layer."""
        if key_states.shape[0] != 1:
            raise HeadscoreError(f"the head-wise cache supports batch size 1 only, got a batch of "
                                 f"{key_states.shape[0]}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            # contiguous, as DynamicCache's copy makes them (projections arrive transposed; sdpa and the
            # gather of the kept entries are faster on contiguous states)
            self.pending = (key_states[0].contiguous(), value_states[0].contiguous())
            self.prompt_length = key_states.shape[2]
        elif self.prefix is not None:
            keys, values = self.prefix
            self.pending = (torch.cat([keys, key_states[0]], dim=1), torch.cat([values, value_states[0]], dim=1))
            self.prompt_length, self.prefix = self.pending[0].shape[1], None
        elif self.pending is not None:
            raise HeadscoreError("the head-wise cache got a second forward pass before the prefill was compressed "
                                 "(is the model using headscore's attention function?)")
        elif self.keys is None:
            raise HeadscoreError("this head-wise cache only recorded a prefill; build a compressed cache from "
                                 "it (headscore.generation.compress_state) to decode")
        else:
            self.tail_keys = torch.cat([self.tail_keys, key_states[0]], dim=1)
            self.tail_values = torch.cat([self.tail_values, value_states[0]], dim=1)
        return self, self

    def finish_prefill(self, query: torch.Tensor, scaling: float | None) -> None:
        """Called by the attention function after the exact prefill output: window scores of the queries
        `[q_heads, q, d]` (the prefill pass's; only the last `window` rows are used, so a pass after a seeded
        prefix must hold at least `window` queries), then the prefill hook compresses."""

        start = time.perf_counter()
        keys, values = self.pending
        length = keys.shape[1]
        window = min(self.window, length)
        if window > query.shape[1]:
            raise HeadscoreError(f"the prefill pass after a shared prefix has {query.shape[1]} tokens, fewer "
                                 f"than the observation window ({window})")
        if window > 0:
            scores = window_scores(query[:, query.shape[1] - window:], keys, scaling, window)
        else:
            scores = query.new_zeros(query.shape[0], length, dtype=torch.float32)
        self.pending = None
        self.on_prefill(self, keys, values, scores)
        self.selection_seconds = time.perf_counter() - start

    def set_prefix(self, keys: torch.Tensor, values: torch.Tensor, head: torch.Tensor, kept: torch.Tensor,
                   length: int, bias: torch.Tensor | None = None) -> None:
        """Store the kept prompt entries: `keys`/`values` `[total, d]`, `head` `[total]`, `kept` `[heads]`;
        `bias` float32 `[total]` (or None): added to each entry's attention logits (a summary entry's weight)."""
        self.keys, self.values, self.bias = keys, values, bias
        self.head = head.to(torch.int16)
        self.kept = kept
        self.heads = kept.shape[0]
        self.prompt_length = length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        """The uncompressed length (prompt + generated), so new tokens get the right positions."""
        if not self.is_initialized:
            return 0
        return self.prompt_length + self.tail_keys.shape[1]

    def get_max_length(self) -> int:
        return -1

    @property
    def generated(self) -> int:
        return 0 if self.tail_keys is None else self.tail_keys.shape[1]

    def kv_bytes(self) -> int:
        """Bytes of the stored keys and values: kept prompt entries plus the generated tail."""
        tensors = (self.keys, self.values, self.tail_keys, self.tail_values)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def index_bytes(self) -> int:
        """Bytes of the bookkeeping: the head index of every entry, the per-head counts (and the logit bias of
        summary entries, if any)."""
        return sum(t.numel() * t.element_size() for t in (self.head, self.kept, self.bias) if t is not None)

    def reset(self) -> None:
        raise HeadscoreError("a head-wise cache cannot be reset; build a new one")

    def crop(self, tokens_to_remove: int) -> None:
        raise HeadscoreError("a head-wise cache cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise HeadscoreError("the head-wise cache does not support beam search (batch size 1, greedy)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise HeadscoreError("the head-wise cache supports batch size 1 only")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise HeadscoreError("the head-wise cache supports batch size 1 only")


class HeadwiseCache(DynamicCache):
    """Per-head variable-length cache for every layer, compressed at prefill by `press` (see module doc).

    With `press=None` the cache records instead: each layer keeps its full keys/values and window scores in
    `recorded` (for `headscore.generation.prefill`) and cannot decode.
    """

    def __init__(self, geometry: Geometry, press: Press | None, *, window: int | None = None,
                 config=None) -> None:
        if config is not None:
            check_full_attention(config)
        self.geometry = geometry
        self.press = press
        self.window = press.window if press is not None else (8 if window is None else window)
        self.recorded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * geometry.layers
        layers = [HeadwiseLayer(index, self.window, self._on_prefill) for index in range(geometry.layers)]
        Cache.__init__(self, layers=layers)

    def _on_prefill(self, layer: HeadwiseLayer, keys: torch.Tensor, values: torch.Tensor,
                    scores: torch.Tensor) -> None:
        if self.press is None:
            self.recorded[layer.index] = (keys, values, scores)
            return
        self.compress_layer(layer, keys, values, scores)

    def compress_layer(self, layer: HeadwiseLayer, keys: torch.Tensor, values: torch.Tensor,
                       scores: torch.Tensor) -> None:
        """Keep the press's selection of one layer's full `keys`/`values` `[kv_heads, n, d]`."""
        length = keys.shape[1]
        head, position, kept = select_entries(scores, self.press, layer.index, self.geometry, length)
        source = head // (kept.shape[0] // keys.shape[0])
        kept_keys, kept_values, bias = keys[source, position], values[source, position], None
        extra = self.press.summary_entries(layer.index, keys, values, kept, kept.shape[0])
        if extra is not None:  # merged head-major: each head's extra entries after its selection
            head = torch.cat([head, extra.head])
            order = torch.argsort(head, stable=True)
            head = head[order]
            kept_keys = torch.cat([kept_keys, extra.keys])[order]
            kept_values = torch.cat([kept_values, extra.values])[order]
            bias = torch.cat([torch.zeros(position.shape[0], device=keys.device), extra.log_weight])[order]
            kept = kept + torch.bincount(extra.head.cpu(), minlength=kept.shape[0])
        layer.set_prefix(kept_keys, kept_values, head, kept, length, bias)

    @classmethod
    def from_prefill(cls, geometry: Geometry, press: Press,
                     recorded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> HeadwiseCache:
        """A compressed cache built from recorded full states `(keys, values, window scores)` per layer."""
        cache = cls(geometry, press)
        for layer, (keys, values, scores) in zip(cache.layers, recorded, strict=True):
            layer.lazy_initialization(keys[None], values[None])
            cache.compress_layer(layer, keys, values, scores)
        return cache

    def kept(self) -> torch.Tensor:
        """Entries kept per head, window included: int64 `[layers, heads]`."""
        return torch.stack([layer.kept for layer in self.layers])

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)

    @property
    def selection_seconds(self) -> float:
        """Time spent at prefill on window scores and selection, all layers (CPU wall time)."""
        return sum(layer.selection_seconds for layer in self.layers)

    def index_bytes(self) -> int:
        return sum(layer.index_bytes() for layer in self.layers)


def check_full_attention(config) -> None:
    """Only models whose every layer is plain full attention can use the head-wise cache."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        types, _ = get_layer_types_and_kwargs(text)
    except (AttributeError, TypeError):
        return
    other = sorted({t for t in types if t != "full_attention"})
    if other:
        raise HeadscoreError(f"the head-wise cache needs full-attention layers only; this model has "
                             f"{', '.join(other)} layers")
