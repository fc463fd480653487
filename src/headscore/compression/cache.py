"""The head-wise variable-length KV cache, with a batch of rows.

Each layer goes through two objects:

- `PrefillLayer` records one prefill: its `update` returns a `PendingPrefill` (the full keys/values
  `[rows, kv_heads, n, d]`) to the registered attention function
  (`headscore.compression.attention.headwise_attention_forward`), which computes the exact output and hands
  back the pass's queries; the layer then scores the observation window of every row and the cache either
  records the states (no press: for `headscore.compression.generation.prefill`) or replaces the layer by
- `HeadwiseLayer`, the compressed layer. For every (row, cache head) (a cache head is a KV head, or a query
  head for query-granularity budgets) it stores only the prompt entries that head kept, flattened:
  `keys`, `values` `[total_kept, head_dim]`, the segments of row 0's heads 0, 1, ..., then row 1's, ..., each
  segment's entries in original order (so their RoPE positions are the original ones); `kept` CPU int64
  `[rows, heads]` entries per segment, `row_starts` CPU int64 `[rows]` where each row's segments start;
  `tail_keys`, `tail_values` `[rows, kv_heads, generated, head_dim]` the dense tail of generated tokens of each
  row (every head attends to its row's generated tokens), views of buffers grown in place. Its `update`
  appends to the tail and returns the `HeadwiseEntries` the decode attention reads.

Storage is Σ kept over rows and heads × head_dim × 2 × dtype size plus the tails: no padding to the largest head
or row, no mask. Rows may hold different prompts (left padded, with an `attention_mask`: a padded position is
never kept nor counted in a budget) and different presses (one per row); finished rows can be dropped and rows
repeated (`batch_select_indices`): no kept entry moves (a repeated row reads the same entries; a dropped row's
are no longer read and go with the layer) and the decode plan is remapped, not planned again. `fork` gives a
cache sharing the kept entries with its own tails (one compressed context, several questions:
`headscore.compression.generation.answer_after`). A hybrid model's sliding-window layers keep transformers' own
bounded cache layer (`HeadwiseCache.make_layer`); budgets, presses and the KV report's compressed entries cover
the full-attention layers, whose compressed slot (`PrefillLayer.index`, `Geometry.compressed_layers`) is the row
of the budgets.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    DynamicCache,
    get_layer_types_and_kwargs,
)

from headscore.compression.attention import (
    HeadwiseEntries,
    decode_kernel,
    plan_segments,
    select_plan,
    to_device,
)
from headscore.compression.presses import Press, kept_positions
from headscore.compression.scorers import Rope, ScorerInputs
from headscore.core.errors import HeadscoreError
from headscore.core.kv_cache import extend_buffer, keep_rows, select_rows
from headscore.core.model import FULL_ATTENTION, Geometry, cache_config


@dataclass(eq=False)
class LayerRecord:
    """One compressed layer of one prompt at prefill: full `keys`/`values` `[kv_heads, n, d]` (the prompt's real
    tokens, RoPE applied), the `queries` `[q_heads, q, d]` of its last q positions, the attention `scaling` and
    `module` (what a scorer may read)."""

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    scaling: float | None = None
    module: Any = None

    def inputs(self, slot: int, heads: int, window: int, rope: Rope | None,
               extra: dict[str, torch.Tensor] | None = None) -> ScorerInputs:
        """This layer's `ScorerInputs` (batch 1) as compressed slot `slot`, for `heads` cache heads."""
        return ScorerInputs(keys=self.keys[None], values=self.values[None], queries=self.queries[None],
                            window=window, heads=heads, scaling=self.scaling, layer=slot, module=self.module,
                            rope=rope, extra=dict(extra or {}))


@dataclass(eq=False)
class RecordedPrompt:
    """One prompt's prefill, every compressed layer's `LayerRecord` (compressed-slot order), from which any
    press selects: `window` (the observation window; a shorter prompt keeps all of it), `rope` (the model's rotary
    parameters), `extra` (extra passes' results per layer, by pass name; `run_extra_passes`). The scorer
    inputs are built once per (layer, cache heads), so every press compressed from the prompt shares each
    scorer's scores."""

    layers: list[LayerRecord]
    window: int
    rope: Rope | None = None
    extra: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    _inputs: dict[tuple[int, int], ScorerInputs] = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return self.layers[0].keys.shape[1]

    @property
    def keys(self) -> list[torch.Tensor]:
        return [layer.keys for layer in self.layers]

    @property
    def values(self) -> list[torch.Tensor]:
        return [layer.values for layer in self.layers]

    def layer_inputs(self, slot: int, heads: int) -> ScorerInputs:
        """The `ScorerInputs` of compressed layer `slot` for `heads` cache heads (batch 1; built once)."""
        key = (slot, heads)
        if key not in self._inputs:
            self._inputs[key] = self.layers[slot].inputs(
                slot, heads, min(self.window, self.length), self.rope,
                {name: results[slot][None] for name, results in self.extra.items()})
        return self._inputs[key]

    def add_extra(self, name: str, results: list[torch.Tensor]) -> None:
        """Store an extra pass's per-layer results (also in the scorer inputs already built)."""
        self.extra[name] = results
        for (slot, _), inputs in self._inputs.items():
            inputs.extra[name] = results[slot][None]


TAIL_ROOM = 32  # tokens of room at least when a compressed layer's tail buffer is (re)allocated (else doubled)
# (layer, full keys [rows, kv_heads, n, d], values, per row its last queries [q_heads, q, d], prompt length per
#  row, perf_counter() when the prefill hook began)
PrefillHook = Callable[["PrefillLayer", torch.Tensor, torch.Tensor, list[torch.Tensor], list[int], float], None]


def select_entries(inputs: ScorerInputs, press: Press, geometry: Geometry, counts: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which prompt entries each cache head keeps: the press's top positions of each head plus the window.

    `inputs`: one prompt's layer (batch 1); `counts`: int64 `[heads]` positions each head keeps before the
    window, when already known (an allocation spanning layers), else the press's. Returns `(head, position,
    kept)`: int64 `[total]` cache head and prompt position of every kept entry (head-major, positions
    ascending; the window included) and the CPU int64 `[heads]` entries per head.
    """
    selection_scores = press.selection_scores(inputs)
    if counts is None:
        counts = press.prompt_counts(inputs.layer, selection_scores, geometry)
    return kept_positions(selection_scores, counts, inputs.window)


def layer_counts(prompt: RecordedPrompt, press: Press, geometry: Geometry) -> list[torch.Tensor]:
    """Every compressed layer's counts for a press whose allocation spans layers (`Press.layer_counts`)."""
    heads = press.cache_heads(geometry)
    scores = [press.selection_scores(prompt.layer_inputs(slot, heads)) for slot in range(geometry.layers)]
    return press.layer_counts(scores, geometry)


def prompt_lengths(attention_mask: torch.Tensor | None, rows: int, width: int) -> list[int]:
    """Real (unpadded) prompt length of each row, from the 4-D mask a prefill's attention function gets
    (`[rows, 1|heads, q, >= width]`, boolean keep-mask or additive float): the keys its last query sees. Rows
    must be left padded (their real tokens last); no mask: every row is `width` long."""
    if attention_mask is None:
        return [width] * rows
    last = attention_mask[:, 0, -1, :width]
    visible = last if last.dtype == torch.bool else last == 0
    lengths = visible.sum(dim=1)
    left_padded = torch.arange(width, device=visible.device)[None, :] >= (width - lengths)[:, None]
    if not bool((visible == left_padded).all()):
        raise HeadscoreError("the head-wise cache needs left-padded batches (padding before each prompt)")
    return lengths.tolist()


@dataclass(frozen=True)
class PendingPrefill:
    """What a recording layer's `update` returns at prefill: the full `keys`/`values` `[rows, kv_heads, n, d]`
    for the exact output; `after_cached`: the pass runs after a seeded prefix (its mask is the lower-right
    causal one). The attention function calls `finish` with the pass's queries once the output is computed."""

    keys: torch.Tensor
    values: torch.Tensor
    after_cached: bool
    layer: PrefillLayer

    def finish(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
               module: Any = None) -> None:
        self.layer.finish(query, attention_mask, scaling, module)


class PrefillLayer(CacheLayerMixin):
    """One layer of `HeadwiseCache` during its prefill (see the module docstring)."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, index: int, window: int, queries: int, on_prefill: PrefillHook) -> None:
        super().__init__()
        self.index = index
        self.window = window
        self.queries = max(queries, window)  # the last prompt queries kept for the scorers
        self.on_prefill = on_prefill
        self.scaling: float | None = None
        self.module: Any = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None
        self.recorded = False
        self.prompt_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def seed(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Start the prefill from already computed states `[1, kv_heads, s, d]` of the prompt's first s tokens
        (a shared prefix): the prefill pass then runs only the rest, and the layer holds all n."""
        self.lazy_initialization(keys, values)
        self.prefix = (keys, values)
        self.prompt_length = keys.shape[2]

    def update(  # type: ignore[override]  # hands the attention function the pending prefill, not tensors
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[PendingPrefill, PendingPrefill]:
        """Hold the full `[rows, kv_heads, n, d]` states (after the seeded prefix, if any) until the attention
        function has computed the output; returns the `PendingPrefill` it reads (as key and value)."""
        if self.recorded:
            raise HeadscoreError("this head-wise cache only recorded a prefill; build a compressed cache from "
                                 "it (headscore.compression.generation.compress_state) to decode")
        if self.pending is not None:
            raise HeadscoreError("the head-wise cache got a second forward pass before the prefill was compressed "
                                 "(is the model using headscore's attention function?)")
        self.lazy_initialization(key_states, value_states)
        prefix = self.prefix
        after_cached = prefix is not None
        if prefix is not None:
            if key_states.shape[0] != 1:
                raise HeadscoreError("a seeded prefix takes one row")
            keys, values = prefix
            key_states, value_states = torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)
            self.prefix = None
        # contiguous, as DynamicCache's copy makes them (projections arrive transposed; sdpa and the gather of
        # the kept entries are faster on contiguous states)
        self.pending = (key_states.contiguous(), value_states.contiguous())
        self.prompt_length = key_states.shape[2]
        pending = PendingPrefill(*self.pending, after_cached=after_cached, layer=self)
        return pending, pending

    def finish(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
               module: Any = None) -> None:
        """Keep each row's last `queries` real queries (`[rows, q_heads, q, d]` are the pass's; at least the
        observation window must be in the pass, so a pass after a seeded prefix must hold it), then the prefill
        hook keeps or records."""
        start = time.perf_counter()
        if self.pending is None:
            raise HeadscoreError("the head-wise cache has no pending prefill to finish")
        keys, values = self.pending
        rows, width = keys.shape[0], keys.shape[2]
        lengths = prompt_lengths(attention_mask, rows, width)
        kept = []
        for row, length in enumerate(lengths):  # rows, not heads or tokens: each row's own real queries
            window = min(self.window, length)
            if window > query.shape[2]:
                raise HeadscoreError(f"the prefill pass after a shared prefix has {query.shape[2]} tokens, fewer "
                                     f"than the observation window ({window})")
            count = min(self.queries, length, query.shape[2])
            kept.append(query[row, :, query.shape[2] - count:].clone())
        self.pending = None
        self.scaling, self.module = scaling, module
        self.on_prefill(self, keys, values, kept, lengths, start)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.prompt_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise HeadscoreError("a head-wise cache cannot be reset; build a new one")

    def crop(self, tokens_to_remove: int) -> None:
        raise HeadscoreError("a head-wise cache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise HeadscoreError("a head-wise cache cannot repeat rows before its prefill")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise HeadscoreError("a head-wise cache cannot select rows before its prefill")


class HeadwiseLayer(CacheLayerMixin):
    """One compressed layer of `HeadwiseCache` (see the module docstring for the storage)."""

    keys: torch.Tensor  # always set: built compressed
    values: torch.Tensor

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, width: int,
                 lengths: Sequence[int], tail_keys: torch.Tensor, tail_values: torch.Tensor,
                 selection_seconds: float = 0.0, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.kept = kept
        self.heads = kept.shape[1]
        self.width = width
        self.lengths = list(lengths)
        # the tail lives in buffers [rows, kv_heads, capacity, d] grown in place (`core.kv_cache.extend_buffer`);
        # `tail_keys`/`tail_values` are views of their first `generated` tokens
        self._tail = (tail_keys, tail_values)
        self.generated = tail_keys.shape[2]
        self.selection_seconds = selection_seconds
        self.bias = bias  # float32 [total] logit bias of summary entries (a press's `summary_entries`), or None
        # CPU int64 [rows]: where each row's entries start in `keys` (row-major when built; rows that leave or
        # repeat move nothing, `batch_select_indices`)
        totals = kept.sum(dim=1)
        self.row_starts = totals.cumsum(0) - totals
        self.buckets = plan_segments(kept, keys.device)
        self.flex_masks: dict[int, Any] = {}  # the flex decode kernel's block masks, for these rows
        self.kernel = decode_kernel(keys.device)  # chosen once, not per step
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    @classmethod
    def build(cls, rows: Sequence[tuple[ScorerInputs, Press]], geometry: Geometry, width: int,
              counts: Sequence[torch.Tensor | None] | None = None, selection_seconds: float = 0.0
              ) -> HeadwiseLayer:
        """Keep each row's press's selection: `rows` of (the row's scorer inputs of this layer (its real tokens),
        press); `width` the padded prompt length; `counts`: per row the positions each head keeps before the
        window, where an allocation spanning layers chose them (None: the press's own per layer)."""
        keys, values, kept, biases = [], [], [], []
        for row, (inputs, press) in enumerate(rows):
            row_keys, row_values, index = inputs.keys[0], inputs.values[0], inputs.layer
            head, position, counts_row = select_entries(inputs, press, geometry, counts[row] if counts else None)
            source = head // (counts_row.shape[0] // row_keys.shape[0])
            row_kept_keys, row_kept_values = row_keys[source, position], row_values[source, position]
            bias = torch.zeros(position.shape[0], device=row_keys.device)
            extra = press.summary_entries(index, row_keys, row_values, counts_row, counts_row.shape[0])
            if extra is not None:  # merged head-major: each head's extra entries after its selection
                order = torch.argsort(torch.cat([head, extra.head]), stable=True)
                row_kept_keys = torch.cat([row_kept_keys, extra.keys])[order]
                row_kept_values = torch.cat([row_kept_values, extra.values])[order]
                bias = torch.cat([bias, extra.log_weight])[order]
                counts_row = counts_row + torch.bincount(extra.head.cpu(), minlength=counts_row.shape[0])
            keys.append(row_kept_keys)
            values.append(row_kept_values)
            kept.append(counts_row)
            biases.append((bias, extra is not None))
        first = rows[0][0].keys
        tail = first.new_empty(len(rows), first.shape[1], 0, first.shape[-1])
        summary = torch.cat([b for b, _ in biases]) if any(has for _, has in biases) else None
        return cls(torch.cat(keys), torch.cat(values), torch.stack(kept), width, [r[0].length for r in rows],
                   tail, tail.clone(), selection_seconds, summary)

    @property
    def rows(self) -> int:
        return self.kept.shape[0]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(  # type: ignore[override]  # hands decode attention the kept entries, not dense tensors
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[HeadwiseEntries, HeadwiseEntries]:
        """Append the new tokens `[rows, kv_heads, q, d]` to the tails (in place, in their buffers); returns what
        decode attention reads."""
        if key_states.shape[0] != self.rows:
            raise HeadscoreError(f"the head-wise cache holds {self.rows} rows, the forward pass has "
                                 f"{key_states.shape[0]}")
        keys, values = self._tail
        end = self.generated + key_states.shape[2]
        room = max(TAIL_ROOM, end)  # doubling: a compressed cache's tail may outgrow its prompt entries
        self._tail = (extend_buffer(keys, self.generated, key_states, room),
                      extend_buffer(values, self.generated, value_states, room))
        self.generated = end
        entries = HeadwiseEntries(self.keys, self.values, self.buckets, self.heads, self.tail_keys,
                                  self.tail_values, self.bias, self.flex_masks, self.kernel)
        return entries, entries

    @property
    def tail_keys(self) -> torch.Tensor:
        """The generated tail's keys `[rows, kv_heads, generated, d]` (a view of its buffer)."""
        return self._tail[0][:, :, :self.generated]

    @tail_keys.setter
    def tail_keys(self, keys: torch.Tensor) -> None:
        self._tail, self.generated = (keys, self._tail[1]), keys.shape[2]

    @property
    def tail_values(self) -> torch.Tensor:
        return self._tail[1][:, :, :self.generated]

    @tail_values.setter
    def tail_values(self, values: torch.Tensor) -> None:
        self._tail = (self._tail[0], values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        """The uncompressed (padded) length, prompt + generated, so new tokens get the right cache positions."""
        return self.width + self.generated

    def get_max_length(self) -> int:
        return -1

    def kv_bytes(self, row: int | None = None) -> int:
        """Bytes of the stored keys and values (kept prompt entries plus generated tail), of one row or all."""
        per_entry = self.keys.shape[-1] * self.keys.element_size() * 2
        tail = self.tail_keys.shape[1] * self.generated * per_entry
        if row is None:
            return int(self.kept.sum()) * per_entry + self.rows * tail
        return int(self.kept[row].sum()) * per_entry + tail

    def index_bytes(self, row: int | None = None) -> int:
        """Bytes of the bookkeeping (per-segment counts, the gather index of segments decoded from a padded
        block), of one row or all."""
        count = self.kept.element_size() * (self.kept.numel() if row is None else self.heads)
        if self.bias is not None:  # summary entries' logit bias
            count += self.bias.element_size() * (self.bias.numel() if row is None else int(self.kept[row].sum()))
        for bucket in self.buckets:
            if bucket.index is None:
                continue
            segments = bucket.host if row is None else bucket.host[bucket.host // self.heads == row]
            slot = bucket.index.element_size() + (1 if bucket.padding is not None else 0)
            count += int(segments.shape[0]) * bucket.width * slot
        return count

    def offsets(self) -> torch.Tensor:
        """CPU int64 `[rows, heads]`: where each (row, cache head)'s entries start in `keys`."""
        return self.row_starts[:, None] + self.kept.cumsum(dim=1) - self.kept

    def entries(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row `row`'s kept prompt keys and values `[Σ kept[row], d]` (head-major, each head's positions in order,
        as built): views of the storage."""
        start, count = int(self.row_starts[row]), int(self.kept[row].sum())
        return self.keys[start:start + count], self.values[start:start + count]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (in that order; repeats allowed). The kept entries are not moved (a
        repeated row reads the same storage; a row gone is no longer read, its storage freed with the layer) and
        the plan is remapped (`select_plan`, no new plan); the tails keep their generated tokens of those rows
        (and their room; rows leaving: moved up in place). CPU `indices` read nothing back from the device
        (`HeadwiseCache.batch_select_indices` hands every layer CPU indices)."""
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        self.buckets = select_plan(self.buckets, self.kept, self.offsets(), indices, self.keys.device)
        self.kept, self.row_starts = self.kept[indices], self.row_starts[indices]
        self.lengths = [self.lengths[i] for i in indices.tolist()]
        order = indices.tolist()
        if all(first < second for first, second in zip(order, order[1:], strict=False)):  # rows leaving
            self._tail = tuple(keep_rows(part, self.generated, order) for part in self._tail)  # type: ignore[assignment]
        else:  # repeated or reordered rows: new buffers
            on_device = to_device(indices, self._tail[0].device)
            self._tail = tuple(select_rows(part, self.generated, on_device)  # type: ignore[assignment]
                               for part in self._tail)
        self.flex_masks = {}

    def fork(self) -> HeadwiseLayer:
        """An independent layer over the same rows: the kept prompt entries, plan and bookkeeping shared (no
        copy; nothing modifies them in place), the tail its own (a copy of this one's, empty after
        compression)."""
        forked = copy.copy(self)
        rows = torch.arange(self.rows, device=self._tail[0].device)
        forked._tail = tuple(select_rows(part, self.generated, rows) for part in self._tail)  # type: ignore[assignment]
        forked.flex_masks = dict(self.flex_masks)
        return forked

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.rows).repeat_interleave(repeats))

    def reset(self) -> None:
        raise HeadscoreError("a head-wise cache cannot be reset; build a new one")

    def crop(self, tokens_to_remove: int) -> None:
        raise HeadscoreError("a head-wise cache cannot be cropped")


class HeadwiseCache(DynamicCache):
    """Per-head variable-length cache for every full-attention layer, compressed at prefill (see the module
    docstring). With the model's `config`, a hybrid model's sliding-window layers get transformers' own
    sliding-window layer (bounded by the window, never compressed; `make_layer`); without it every layer is
    full attention.

    `press`: one press for every row, or one per row (a list as long as the batch). With `press=None` the cache
    records instead: each full-attention layer's full keys/values and window scores of every row's real tokens
    go to `recorded` (indexed like `geometry`'s compressed layers, then by row, for
    `headscore.compression.generation.prefill`) and the cache cannot decode.
    """

    def __init__(self, geometry: Geometry, press: Press | Sequence[Press] | None, *, window: int | None = None,
                 queries: int | None = None, config=None, rope: Rope | None = None) -> None:
        self.geometry = geometry
        self.presses = None if press is None else list(press) if isinstance(press, Sequence) else [press]
        if self.presses is not None and not self.presses:
            raise HeadscoreError("the head-wise cache got an empty press list")
        windows = {p.window for p in self.presses or ()}
        if len(windows) > 1:
            raise HeadscoreError(f"the presses of one head-wise cache need one observation window, got "
                                 f"{sorted(windows)}")
        self.window = windows.pop() if windows else (8 if window is None else window)
        # the last prompt queries each layer keeps for the scorers (at least the window)
        self.queries = max([p.query_count() for p in self.presses or ()] + [queries or 0, self.window])
        self.rope = rope
        # per compressed layer, per row: the row's real tokens (recording: `press=None`)
        self.recorded: list[list[LayerRecord] | None] = [None] * geometry.layers
        config = cache_config(config)  # a model whose every layer is sliding: full attention within its window
        if config is None:
            if geometry.compressed_layers is not None:
                raise HeadscoreError("a hybrid model's head-wise cache needs its config (sliding-window layers)")
            self.layer_kwargs: list[dict] = [{} for _ in range(geometry.layers)]
            types = [FULL_ATTENTION] * geometry.layers
        else:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            types, self.layer_kwargs = get_layer_types_and_kwargs(text)
        if tuple(i for i, kind in enumerate(types) if kind == FULL_ATTENTION) != geometry.model_layers:
            raise HeadscoreError("the geometry's compressed layers are not the model's full-attention layers")
        self.positions = geometry.model_layers  # compressed slot -> model layer
        self.slots = {layer: slot for slot, layer in enumerate(self.positions)}
        Cache.__init__(self, layers=[self.make_layer(index, kind) for index, kind in enumerate(types)])

    @property
    def press(self) -> Press | None:
        """The press of every row (None when recording; the first row's with a per-row list)."""
        return None if self.presses is None else self.presses[0]

    def make_layer(self, index: int, layer_type: str) -> CacheLayerMixin:
        """Model layer `index`'s cache before its prefill: a `PrefillLayer` (at its compressed slot) for full
        attention, transformers' own (sliding-window) layer otherwise, whose `update` returns plain tensors."""
        if layer_type == FULL_ATTENTION:
            return PrefillLayer(self.slots[index], self.window, self.queries, self._on_prefill)
        return DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**self.layer_kwargs[index])

    @property
    def compressed(self) -> list[HeadwiseLayer]:
        """The compressed (head-wise) layers, in compressed-slot order."""
        return [layer for layer in self.layers if isinstance(layer, HeadwiseLayer)]

    def row_presses(self, rows: int) -> list[Press]:
        presses = self.presses or []
        if len(presses) == 1:
            return presses * rows
        if len(presses) != rows:
            raise HeadscoreError(f"the head-wise cache has {len(presses)} presses for a batch of {rows}")
        return presses

    def _on_prefill(self, layer: PrefillLayer, keys: torch.Tensor, values: torch.Tensor,
                    queries: list[torch.Tensor], lengths: list[int], started: float) -> None:
        width = keys.shape[2]
        records = [LayerRecord(keys[row, :, width - length:], values[row, :, width - length:], queries[row],
                               layer.scaling, layer.module) for row, length in enumerate(lengths)]
        if self.presses is None:
            self.recorded[layer.index] = records
            layer.recorded = True
            return
        rows = []
        for record, length, press in zip(records, lengths, self.row_presses(keys.shape[0]), strict=True):
            if press.spans_layers or press.extra_pass:
                raise HeadscoreError(f"method {press.name} needs the whole prompt before it selects (every layer's "
                                     "scores, or an extra pass): prefill, then compress_state")
            rows.append((record.inputs(layer.index, press.cache_heads(self.geometry), min(self.window, length),
                                       self.rope), press))
        compressed = HeadwiseLayer.build(rows, self.geometry, width)
        compressed.selection_seconds = time.perf_counter() - started
        self.layers[self.positions[layer.index]] = compressed

    @classmethod
    def from_prefill(cls, geometry: Geometry, press: Press | Sequence[Press], prompt: RecordedPrompt, *,
                     config=None, windowed: dict[int, CacheLayerMixin] | None = None) -> HeadwiseCache:
        """A compressed cache built from one recorded prompt: one row per press (`press` a list), or one row. A
        hybrid model's sliding-window layers start from copies of `windowed` (model index -> the prefilled
        one-row layer, repeated for every row; its tensors are shared, never modified: an update replaces
        them)."""
        presses = list(press) if isinstance(press, Sequence) else [press]
        cache = cls.from_rows(geometry, [(prompt, p) for p in presses], config=config)
        for index, layer in (windowed or {}).items():
            copied: Any = copy.copy(layer)
            if len(presses) > 1:
                copied.batch_repeat_interleave(len(presses))
            cache.layers[index] = copied
        return cache

    @classmethod
    def from_rows(cls, geometry: Geometry, rows: Sequence[tuple[RecordedPrompt, Press]], *,
                  config=None) -> HeadwiseCache:
        """A compressed cache with one row per `(recorded prompt, press)`. Rows may hold different prompts: they
        are left padded to the longest (nothing is stored for the padding; decode them with per-row positions).
        No sliding-window layers (`from_prefill` copies a hybrid model's). The prompts' scorer inputs are shared:
        each scorer's scores are computed once per prompt, whatever the number of presses and budgets."""
        cache = cls(geometry, [press for _, press in rows], config=config)
        width = max(prompt.length for prompt, _ in rows)
        for prompt, press in rows:
            if press.extra_pass and press.extra_pass not in prompt.extra:
                raise HeadscoreError(f"method {press.name} needs the extra pass '{press.extra_pass}' over the prompt "
                                     "(headscore.compression.generation.run_extra_passes)")
        spanning = [layer_counts(prompt, press, geometry) if press.spans_layers else None for prompt, press in rows]
        for slot in range(geometry.layers):
            layer_rows = [(prompt.layer_inputs(slot, press.cache_heads(geometry)), press) for prompt, press in rows]
            counts = [None if given is None else given[slot] for given in spanning]
            cache.layers[cache.positions[slot]] = HeadwiseLayer.build(layer_rows, geometry, width, counts)
        return cache

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (in that order; repeats allowed) in every layer; the compressed layers
        get them on the CPU, read back once."""
        host = torch.as_tensor(indices, dtype=torch.long).cpu()
        layers: list[Any] = self.layers  # compressed and transformers' own (sliding-window) layers
        for layer in layers:
            layer.batch_select_indices(host if isinstance(layer, HeadwiseLayer) else indices)

    def fork(self) -> HeadwiseCache:
        """An independent cache of the same compressed rows: the kept prompt entries shared (no copy), each
        layer's tail its own (`HeadwiseLayer.fork`), a hybrid model's sliding-window layers copied (their
        updates replace their tensors). One compressed context then serves several questions, each on a fork,
        without a new prefill (`generation.answer_after`)."""
        forked = copy.copy(self)
        forked.layers = [layer.fork() if isinstance(layer, HeadwiseLayer) else copy.copy(layer)
                         for layer in self.layers]
        return forked

    @property
    def rows(self) -> int:
        compressed = self.compressed
        return compressed[0].rows if compressed else 0

    def kept(self, row: int = 0) -> torch.Tensor:
        """Entries kept per head of the compressed layers by one row, window included: int64 `[layers, heads]`."""
        compressed = self.compressed
        if len(compressed) != self.geometry.layers:
            raise HeadscoreError("the head-wise cache is not compressed yet (no prefill)")
        return torch.stack([layer.kept[row] for layer in compressed])

    def kv_bytes(self, row: int | None = None) -> int:
        """Keys and values stored (all rows, or one): the compressed layers' plus the sliding-window layers'."""
        window = window_kv_bytes(self)
        if row is not None and self.rows:
            window //= self.rows
        return sum(layer.kv_bytes(row) for layer in self.compressed) + window

    def index_bytes(self, row: int | None = None) -> int:
        return sum(layer.index_bytes(row) for layer in self.compressed)

    @property
    def selection_seconds(self) -> float:
        """Time spent at prefill on window scores and selection, all compressed layers (CPU wall time)."""
        return sum(layer.selection_seconds for layer in self.compressed)


def window_kv_bytes(cache: Cache) -> int:
    """Bytes of keys and values held by a cache's sliding-window layers (0 when it has none)."""
    total = 0
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if getattr(layer, "is_sliding", False) and keys is not None and values is not None:
            total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
    return total
