"""Attention over `headscore.compression.cache.HeadwiseCache` (registered through transformers'
`AttentionInterface`): each (row, query head) reads only its own cache head's kept prompt entries and its row's
generated tail, exact, with no loops over heads.

Decode attention in two parts merged by their log-sum-exps (exactly one softmax over both):

- the prompt part over the flattened kept entries (`HeadwiseEntries.keys` `[total, d]`, one segment per
  (row, cache head)): the segments are grouped into buckets of similar length (`plan_segments`), each bucket one
  padded batched matmul; a bucket of one segment, or of one row's equal-length heads (every fixed-budget
  press), is a view of the storage (no copy, no padding), the others gather their entries into a transient
  padded block;
- the tail part, dense over the row's generated tokens `[rows, kv_heads, t, d]` (GQA without repeating keys).

The prompt part has a second kernel for CUDA: `torch.nn.attention.flex_attention` over the flattened entries
with a block mask built from the segments (`segment_block_mask`: each query head visits only the 128-entry
blocks its segment overlaps), compiled. `decode_kernel` picks it once per compressed layer when the cache is
built (`HeadwiseEntries.kernel`): `HEADSCORE_DECODE_KERNEL=auto` (default: flex on CUDA, buckets elsewhere),
`buckets` or `flex` (on CPU flex runs eagerly, for tests: it scores every entry). The first flex result of a
process is checked against the buckets; if compiling flex fails or the two disagree, the buckets take over with
one warning.

When rows leave or repeat (`select_plan`), nothing is copied and nothing planned again: the storage stays (a
repeated row reads the same entries, a row gone is no longer read), each bucket keeps its segments of the rows
still there; the flex block mask is rebuilt from device tensors. Neither reads anything back from the device.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headscore.core.attention import sdpa_forward
from headscore.core.errors import HeadscoreError

HEADWISE_ATTENTION = "headscore_headwise"
# a bucket costs about this many (segment, entry) logits of launch overhead: fewer, more padded buckets below it
BUCKET_OVERHEAD = 2048
# a gathered bucket copies its keys and values each step: measured (bench_batch.py (c), CPU) at about 1.5× the
# cost of reading them in the matmuls, so a gathered entry costs 2.5 read entries
GATHER_COST = 2.5


@dataclass(frozen=True)
class Bucket:
    """Segments attended in one padded batched matmul: `segments` int64 `[s]` (row · heads + head), padded to
    `width` entries. `start` >= 0: the segments are `first, first + 1, ...`, consecutive in storage, all
    `width` long, from entry `start` (the block, its queries and its outputs are views). Otherwise `index`
    int64 `[s · width]` gathers their entries and `padding` bool `[s, width]` marks the pad slots (None when
    none). `host`: the segments on the CPU (remapping a plan reads no device tensor)."""

    segments: torch.Tensor
    width: int
    start: int = -1
    first: int = -1
    index: torch.Tensor | None = None
    padding: torch.Tensor | None = None
    host: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        if self.host is None:
            object.__setattr__(self, "host", self.segments.cpu())


def plan_segments(kept: torch.Tensor, device: torch.device | str = "cpu",
                  overhead: int = BUCKET_OVERHEAD, offsets: torch.Tensor | None = None) -> list[Bucket]:
    """Buckets for the segments of `kept` (CPU int64 `[rows, heads]`, entries per (row, cache head), each
    segment's entries consecutive, a row's segments one after another), stored from `offsets` (CPU int64
    `[rows, heads]`; None: row-major then head-major from 0, as a cache is built).

    A row whose heads all keep the same count is one view bucket. The other segments, sorted by length, are
    cut where it minimizes the summed cost of the buckets (a dynamic program over the sorted lengths; a bucket
    spans at most 256 segments): `overhead` per bucket, plus its segments × padded width, × `GATHER_COST`
    when it gathers (a bucket of one segment is a view). Empty segments are in no bucket.
    """
    rows, heads = kept.shape
    lengths = kept.reshape(-1)
    starts = lengths.cumsum(0) - lengths if offsets is None else offsets.reshape(-1)
    offsets_of = starts.tolist()
    length_of = lengths.tolist()  # Python ints once, not one tensor read per segment
    buckets: list[Bucket] = []
    ragged: list[int] = []
    for row in range(rows):
        counts = kept[row]
        if int(counts[0]) > 0 and bool((counts == counts[0]).all()):
            segments = torch.arange(row * heads, (row + 1) * heads)
            buckets.append(Bucket(segments.to(device), int(counts[0]), start=offsets_of[row * heads], first=row * heads,
                                  host=segments))
        else:
            ragged.extend(s for s in range(row * heads, (row + 1) * heads) if length_of[s] > 0)
    if not ragged:
        return buckets
    ragged.sort(key=lambda s: length_of[s])
    sizes = [length_of[s] for s in ragged]
    best, cut = [0] + [0] * len(sizes), [0] * (len(sizes) + 1)
    for end in range(1, len(sizes) + 1):  # bucket ragged[begin:end] is padded to sizes[end - 1]
        best[end], cut[end] = min((best[begin] + overhead + (end - begin) * sizes[end - 1]
                                   * (GATHER_COST if end - begin > 1 else 1.0), begin)
                                  for begin in range(max(0, end - 256), end))
    ends = []
    end = len(sizes)
    while end > 0:
        ends.append((cut[end], end))
        end = cut[end]
    for begin, end in reversed(ends):
        width = sizes[end - 1]
        if end - begin == 1:  # one segment: a view of its entries
            segment = ragged[begin]
            buckets.append(Bucket(torch.tensor([segment], device=device), width, start=offsets_of[segment],
                                  first=segment, host=torch.tensor([segment])))
            continue
        segments = torch.tensor(ragged[begin:end])
        slots = torch.arange(width)[None, :]
        counts = lengths[segments][:, None]
        index = (starts[segments][:, None] + slots).masked_fill(slots >= counts, 0)
        padding = slots >= counts
        buckets.append(Bucket(segments.to(device), width, index=index.reshape(-1).to(device),
                              padding=padding.to(device) if bool(padding.any()) else None, host=segments))
    return buckets


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small CPU tensor on `device` without waiting for the device's queued work (pinned, non-blocking: a
    plain copy to CUDA would synchronize)."""
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def select_plan(buckets: list[Bucket], kept: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor,
                device: torch.device | str = "cpu") -> list[Bucket]:
    """The plan of rows `indices` (CPU int64 `[rows']`, any order, repeats allowed) of the segments `kept` (CPU
    int64 `[rows, heads]`, stored from `offsets`, CPU int64 `[rows, heads]`) that `buckets` plan; the storage
    is not moved (`HeadwiseLayer.batch_select_indices`): a repeated row reads the same entries.

    No dynamic program: a view bucket becomes one view per occurrence of its row; a gathered bucket keeps its
    segments of the chosen rows (each as often as its row is chosen) with their gather index, its width cut to
    its longest remaining segment (one remaining segment: a view). Host work is on `kept`, `offsets` and the
    buckets' CPU segments only; the device picks rows of the old index and padding (nothing is read back)."""
    heads = kept.shape[1]
    lengths, starts = kept.reshape(-1), offsets.reshape(-1)
    out: list[Bucket] = []
    gathered = []
    landing: dict[int, list[int]] = {}  # old row -> its positions in the selection
    for position, row in enumerate(indices.tolist()):
        landing.setdefault(row, []).append(position)
    for bucket in buckets:
        if bucket.start < 0:
            gathered.append(bucket)
            continue
        # views of one row's consecutive segments: consecutive wherever the row lands
        count, head = bucket.host.shape[0], bucket.first % heads
        for p in landing.get(bucket.first // heads, ()):
            first = p * heads + head
            out.append(Bucket(torch.arange(first, first + count, device=device), bucket.width,
                              start=bucket.start, first=first, host=torch.arange(first, first + count)))
    if not gathered:
        return out
    # every gathered bucket's segments at once: (i, p) = segment i (of all, bucket by bucket) lands in row p
    hosts = torch.cat([bucket.host for bucket in gathered])
    sizes_of = torch.tensor([bucket.host.shape[0] for bucket in gathered])
    owner = torch.repeat_interleave(torch.arange(len(gathered)), sizes_of)
    pairs = (indices[None, :] == (hosts // heads)[:, None]).nonzero()
    which = owner[pairs[:, 0]]
    segments = pairs[:, 1] * heads + hosts[pairs[:, 0]] % heads
    pick = pairs[:, 0] - (sizes_of.cumsum(0) - sizes_of)[which]  # the segment's row in its old bucket
    sizes = lengths[hosts[pairs[:, 0]]]
    counts = torch.bincount(which, minlength=len(gathered))
    widths = torch.zeros(len(gathered), dtype=torch.long).scatter_reduce_(0, which, sizes, "amax")
    padded = torch.zeros(len(gathered), dtype=torch.bool).scatter_reduce_(0, which, sizes < widths[which], "amax")
    on_device = to_device(torch.stack([segments, pick]), device)  # one copy to the device for the whole layer
    end = 0
    for bucket, count, width, has_padding in zip(gathered, counts.tolist(), widths.tolist(), padded.tolist(),
                                                 strict=True):
        begin, end = end, end + count
        if count == 0:
            continue
        if count == 1:  # one segment left: a view of its entries
            out.append(Bucket(on_device[0, begin:end], width, start=int(starts[hosts[pairs[begin, 0]]]),
                              first=int(segments[begin]), host=segments[begin:end]))
            continue
        assert bucket.index is not None  # a gathered bucket always has its index
        rows = on_device[1, begin:end]
        index = bucket.index.view(-1, bucket.width)[rows, :width]
        padding = None
        if has_padding:
            assert bucket.padding is not None  # shorter segments than the width were padded before
            padding = bucket.padding[rows, :width]
        out.append(Bucket(on_device[0, begin:end], width, index=index.reshape(-1), padding=padding,
                          host=segments[begin:end]))
    return out


@dataclass(frozen=True)
class HeadwiseEntries:
    """What a compressed layer hands the attention function at decode (its `update`'s return): the kept prompt
    entries `keys`/`values` `[total, d]` (one run of entries per (row, cache head); their `buckets` say where),
    the number of cache `heads` per row, and the generated tail `tail_keys`/`tail_values` `[rows, kv_heads, t,
    d]`. `bias`
    float32 `[total]` (or None): added to each entry's logits (a summary entry standing for c tokens carries
    log c: RazorAttention's compensation token)."""

    keys: torch.Tensor
    values: torch.Tensor
    buckets: list[Bucket]
    heads: int
    tail_keys: torch.Tensor
    tail_values: torch.Tensor
    bias: torch.Tensor | None = None
    # the layer's flex block masks (and empty-segment flags) by query length: the compressed layer passes its
    # own dict, so they are built once per layer and batch (`segment_block_mask`)
    flex_masks: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)
    # the prompt-part kernel (`decode_kernel`'s answer, chosen when the layer was built); "" reads it per call
    kernel: str = ""


DECODE_KERNELS = ("auto", "buckets", "flex")
_flex_failed = False  # set when flex failed (or disagreed with the buckets) once: auto then stays on the buckets
_flex_checked = False  # the first flex result of a process is checked against the buckets
FLEX_BLOCK = 128  # flex_attention's block size: a query head visits the blocks its segment overlaps


def decode_kernel(device: torch.device) -> str:
    """The prompt-part kernel for `device`, from env `HEADSCORE_DECODE_KERNEL` (auto, buckets, flex): `buckets`,
    `flex` (forced: a failure is raised) or, on CUDA only, `auto` (flex, unless it failed once in this
    process). Read once per compressed layer when the cache is built, not per step."""
    choice = os.environ.get("HEADSCORE_DECODE_KERNEL", "auto")
    if choice not in DECODE_KERNELS:
        raise HeadscoreError(f"HEADSCORE_DECODE_KERNEL={choice}: use one of {', '.join(DECODE_KERNELS)}")
    if choice == "auto" and torch.device(device).type != "cuda":
        return "buckets"
    return choice


try:  # how flex_attention is asked for the log-sum-exp: `return_aux` from torch 2.9, `return_lse` before
    from torch.nn.attention.flex_attention import AuxRequest

    _LSE_REQUEST: dict[str, Any] = {"return_aux": AuxRequest(lse=True)}
except ImportError:  # pragma: no cover  # older torch
    _LSE_REQUEST = {"return_lse": True}


@cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def segment_block_mask(starts: torch.Tensor, lengths: torch.Tensor, q_heads: int, q_len: int, total: int) -> Any:
    """The flex `BlockMask` of the prompt part, for segments (row, cache head) stored from `starts` with
    `lengths` entries (int64 `[rows, heads]` on the attention's device; `total` stored entries in all) and
    flattened query heads `rows · q_heads` (query head h of row r reads segment r · heads + h // (q_heads //
    heads)): each query head lists the `FLEX_BLOCK`-entry blocks its segment overlaps (its first to its last),
    and the mask keeps, inside them, only its segment's entries (rows may share entries, and entries of rows
    gone stay unread). Built on the device: nothing is read back."""
    from torch.nn.attention.flex_attention import BlockMask

    rows, heads = lengths.shape
    group = q_heads // heads
    start = starts.reshape(-1).repeat_interleave(group)  # [rows · q_heads]
    count_entries = lengths.reshape(-1).repeat_interleave(group)
    end = start + count_entries
    first, last = start // FLEX_BLOCK, (end - 1) // FLEX_BLOCK
    count = torch.where(count_entries > 0, last - first + 1, 0)
    # BlockMask's documented layout: one row of `kv_blocks` indices per query head, the first `count` listed
    widest = max((total + FLEX_BLOCK - 1) // FLEX_BLOCK, 1)
    blocks = (first[:, None] + torch.arange(widest, device=lengths.device)[None]).clamp(max=widest - 1)

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (kv_idx >= start[h]) & (kv_idx < end[h])

    return BlockMask.from_kv_blocks(count.view(1, -1, 1).to(torch.int32), blocks.view(1, -1, 1, widest).to(torch.int32),
                                    BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(q_len, max(total, 1)),
                                    compute_q_blocks=False)  # inference: no backward's query-block lists


def segment_spans(buckets: list[Bucket], segments: int, device: torch.device | str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 `[segments]` storage start and entries of each segment on `device`, read from its bucket (a view's
    start and width, a gathered segment's first index and unpadded slots; 0, 0: in no bucket); device ops only."""
    starts = torch.zeros(segments, dtype=torch.long, device=device)
    lengths = torch.zeros(segments, dtype=torch.long, device=device)
    for bucket in buckets:
        count = bucket.segments.shape[0]
        width = torch.full((count,), bucket.width, device=device)
        if bucket.start >= 0:
            first = bucket.start + torch.arange(count, device=device) * bucket.width
        else:
            assert bucket.index is not None  # a gathered bucket always has its index
            first = bucket.index.view(count, bucket.width)[:, 0]
        if bucket.padding is not None:
            width = width - bucket.padding.sum(-1)
        starts.index_copy_(0, bucket.segments, first)
        lengths.index_copy_(0, bucket.segments, width)
    return starts, lengths


def flex_prompt_part(query: torch.Tensor, entries: HeadwiseEntries, scale: float, softcap: float | None,
                     accumulate: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt part by flex_attention: `query` `[rows, q_heads, q, d]` → (out `[rows · q_heads, q, d]`,
    log-sum-exp `[rows · q_heads, q]`) in `accumulate`; computed in the entries' dtype (flex accumulates in
    float32), a query head of an empty segment gets lse −inf and out 0."""
    from torch.nn.attention.flex_attention import flex_attention

    rows, q_heads, q_len, dim = query.shape
    if q_len not in entries.flex_masks:
        starts, kept = segment_spans(entries.buckets, rows * entries.heads, query.device)
        empty = (kept == 0).repeat_interleave(q_heads // entries.heads)
        entries.flex_masks[q_len] = (segment_block_mask(starts.view(rows, -1), kept.view(rows, -1), q_heads, q_len,
                                                        entries.keys.shape[0]), empty)
    block_mask, empty = entries.flex_masks[q_len]
    bias = entries.bias

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        return score if bias is None else score + bias[kv_idx]

    keys, values = entries.keys.view(1, 1, -1, dim), entries.values.view(1, 1, -1, dim)
    run = _compiled_flex() if query.device.type == "cuda" else flex_attention
    with warnings.catch_warnings():  # eager flex (CPU, tests) warns that it is unfused: known
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out, lse = run(query.to(keys.dtype).reshape(1, rows * q_heads, q_len, dim), keys, values,
                       score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True, **_LSE_REQUEST)
        lse = getattr(lse, "lse", lse)  # AuxOutput (torch >= 2.9) or the tensor
    return (out[0].to(accumulate).masked_fill_(empty[:, None, None], 0.0),
            lse[0].to(accumulate).masked_fill_(empty[:, None], float("-inf")))


def bucket_prompt_part(flat: torch.Tensor, entries: HeadwiseEntries, scale: float, softcap: float | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt part bucket by bucket (`plan_segments`): `flat` `[rows, q_heads, q, d]` in the accumulation
    dtype → (out `[rows · heads, group · q, d]`, log-sum-exp `[rows · heads, group · q]`)."""
    rows, q_heads, q_len, dim = flat.shape
    heads = entries.heads
    group = q_heads // heads
    accumulate = flat.dtype
    # prompt part: per segment (row, cache head) its `group` query heads × q rows
    segment_queries = flat.reshape(rows * heads, group * q_len, dim)
    prompt_out = flat.new_zeros(rows * heads, group * q_len, dim)
    prompt_lse = flat.new_full((rows * heads, group * q_len), float("-inf"))
    for bucket in entries.buckets:
        count = bucket.segments.shape[0]
        if bucket.start >= 0:
            queries = segment_queries[bucket.first:bucket.first + count]
            stop = bucket.start + count * bucket.width
            keys = entries.keys[bucket.start:stop].view(count, bucket.width, dim)
            values = entries.values[bucket.start:stop].view(count, bucket.width, dim)
            bias = None if entries.bias is None else entries.bias[bucket.start:stop].view(count, 1, bucket.width)
        else:
            assert bucket.index is not None  # a gathered bucket always has its index (plan_segments)
            keys = entries.keys.index_select(0, bucket.index).view(count, bucket.width, dim)
            values = entries.values.index_select(0, bucket.index).view(count, bucket.width, dim)
            bias = (None if entries.bias is None
                    else entries.bias.index_select(0, bucket.index).view(count, 1, bucket.width))
            queries = segment_queries[bucket.segments]
        # keys × queries^T, then viewed transposed: measured faster on CPU than queries × keys^T for long buckets
        logits = _capped(torch.bmm(keys.to(accumulate), queries.transpose(1, 2)).transpose(1, 2).mul_(scale), softcap)
        if bias is not None:
            logits = logits.add_(bias)
        if bucket.padding is not None:
            logits = logits.masked_fill_(bucket.padding[:, None, :], float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        probs = logits.sub_(lse[..., None]).exp_()
        if bucket.start >= 0:  # consecutive segments: written in place
            torch.bmm(probs, values.to(accumulate), out=prompt_out[bucket.first:bucket.first + count])
            prompt_lse[bucket.first:bucket.first + count] = lse
        else:
            prompt_out.index_copy_(0, bucket.segments, torch.bmm(probs, values.to(accumulate)))
            prompt_lse.index_copy_(0, bucket.segments, lse)
    return prompt_out, prompt_lse


def _prompt_part(query: torch.Tensor, flat: torch.Tensor, entries: HeadwiseEntries, scale: float,
                 softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt part by the entries' kernel (`decode_kernel`'s choice), `[rows · heads, group · q, d]` and its
    lse."""
    global _flex_failed, _flex_checked
    rows, q_heads, q_len, dim = query.shape
    kernel = entries.kernel or decode_kernel(query.device)
    if kernel == "flex" or (kernel == "auto" and not _flex_failed):
        forced = kernel == "flex"
        try:
            out, lse = flex_prompt_part(query, entries, scale, softcap, flat.dtype)
            out, lse = out.view(rows * entries.heads, -1, dim), lse.view(rows * entries.heads, -1)
            if _flex_checked:
                return out, lse
            # once per process: the compiled kernel must agree with the exact buckets (it runs on hardware the
            # tests cannot reach); a disagreement beyond the kernels' rounding is treated as a failure
            want_out, want_lse = bucket_prompt_part(flat, entries, scale, softcap)
            tolerance = 1e-4 if entries.keys.dtype in (torch.float32, torch.float64) else 3e-2
            finite = torch.isfinite(want_lse)
            if not (torch.allclose(out, want_out, atol=tolerance, rtol=tolerance)
                    and torch.equal(finite, torch.isfinite(lse))
                    and torch.allclose(lse[finite], want_lse[finite], atol=tolerance, rtol=tolerance)):
                raise HeadscoreError("flex_attention's decode attention disagrees with the bucketed kernel")
            _flex_checked = True
            return out, lse
        except Exception as error:  # noqa: BLE001  # a compiler failure or disagreement: the exact buckets instead
            if forced:
                raise
            _flex_failed = True
            warnings.warn(f"flex_attention failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                          "decode attention uses the bucketed kernel", stacklevel=2)
    return bucket_prompt_part(flat, entries, scale, softcap)


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap).mul_(softcap)


def headwise_attention(query: torch.Tensor, entries: HeadwiseEntries, scaling: float | None = None, *,
                       softcap: float | None = None, sinks: torch.Tensor | None = None,
                       tail_visible: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of new queries over a head-wise cache.

    `query` `[rows, q_heads, q, d]` (the last q tokens of each row; query head `h` reads cache head
    `h // (q_heads // heads)` and KV head `h // (q_heads // kv_heads)` of the tail, whose last q tokens are the
    queries' own, causal among themselves). `tail_visible` bool `[rows, 1 | q_heads, q, t]`: which tail tokens
    each query sees instead (a padded batch's mask: tail tokens that are padding stay hidden). `softcap`:
    logits become `softcap · tanh(logits / softcap)` (Gemma 2). `sinks` `[q_heads]`: one extra logit per query
    head in the softmax denominator, with no value (gpt-oss). Logits and the merge in float32 (float64 for
    float64 queries). A query that sees nothing (a padding query over an empty segment) gets zeros. Returns
    `[rows, q_heads, q, d]` in the query's dtype.
    """
    rows, q_heads, q_len, dim = query.shape
    tail_keys, tail_values = entries.tail_keys, entries.tail_values
    kv_heads, t_len = tail_keys.shape[1], tail_keys.shape[2]
    scale = dim**-0.5 if scaling is None else scaling
    accumulate = torch.promote_types(query.dtype, torch.float32)
    flat = query.to(accumulate)
    prompt_out, prompt_lse = _prompt_part(query, flat, entries, scale, softcap)
    # tail part: dense over the row's generated tokens, query heads grouped by KV head
    grouped = flat.reshape(rows, kv_heads, (q_heads // kv_heads) * q_len, dim)
    tail = torch.matmul(grouped, tail_keys.to(accumulate).transpose(-1, -2)).mul_(scale)
    tail = _capped(tail.view(rows, q_heads, q_len, t_len), softcap)
    if tail_visible is not None:
        tail = tail.masked_fill_(~tail_visible, float("-inf"))
    elif q_len > 1:
        visible = torch.arange(q_len, device=query.device)[:, None] + (t_len - q_len)
        tail = tail.masked_fill_(torch.arange(t_len, device=query.device)[None, :] > visible, float("-inf"))
    tail_lse = torch.logsumexp(tail, dim=-1)
    # a query that sees no tail token (left padding of a question) has lse -inf: its probabilities are 0, not NaN
    tail_probs = tail.sub_(tail_lse.clamp(min=torch.finfo(accumulate).min)[..., None]).exp_()
    tail_probs = tail_probs.view(rows, kv_heads, -1, t_len)
    tail_out = torch.matmul(tail_probs, tail_values.to(accumulate)).view(rows, q_heads, q_len, dim)
    prompt_lse = prompt_lse.view(rows, q_heads, q_len)
    total = torch.logaddexp(prompt_lse, tail_lse)
    if sinks is not None:
        total = torch.logaddexp(total, sinks.to(accumulate).view(1, q_heads, 1))
    total = total.clamp(min=torch.finfo(accumulate).min)  # a query that sees nothing: weights 0, not NaN
    out = prompt_out.view(rows, q_heads, q_len, dim) * (prompt_lse - total).exp_()[..., None]
    out = out.add_(tail_out * (tail_lse - total).exp_()[..., None])
    return out.to(query.dtype)


def headwise_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: Any, value: Any,
                               attention_mask: torch.Tensor | None, scaling: float | None = None,
                               dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered function for `HeadwiseCache` (plain tensors, e.g. a DynamicCache: exactly sdpa).

    Prefill (`key` a `PendingPrefill`, what a recording layer's `update` returns): the exact sdpa output over
    the full keys/values, then the layer selects what it keeps. Decode (`key` a `HeadwiseEntries`):
    `headwise_attention`, with transformers' `softcap` and `s_aux` (sinks) arguments; the mask is not read (no
    kept entry is padding) for the prompt part, only its last t columns, the tail's, when it is given (a padded
    batch: tail tokens may be a question's left padding). A sliding-window layer of a hybrid model is
    transformers' own cache layer: its plain tensors go to sdpa with the model's sliding mask. Output
    `[b, q, q_heads, d]` as sdpa's.
    """
    if isinstance(key, torch.Tensor):
        return sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if isinstance(key, HeadwiseEntries):
        visible = None
        if isinstance(attention_mask, torch.Tensor):  # [rows, 1|heads, q, prompt width + t]: keep-mask or additive
            visible = attention_mask[..., attention_mask.shape[-1] - key.tail_keys.shape[2]:]
            visible = visible if visible.dtype == torch.bool else visible == 0
        out = headwise_attention(query, key, scaling, softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"),
                                 tail_visible=visible)
        return out.transpose(1, 2), None
    pending = key
    output = sdpa_forward(module, query, pending.keys, pending.values, attention_mask, dropout=dropout,
                          scaling=scaling, causal_suffix=pending.after_cached, **kwargs)
    pending.finish(query, attention_mask, scaling, module)
    return output


AttentionInterface.register(HEADWISE_ATTENTION, headwise_attention_forward)
# sdpa's masks: without a registered mask function transformers passes none, and sdpa's own causal flag is only
# right when the queries see no earlier cached keys (a prefill after a shared prefix does)
AttentionMaskInterface.register(HEADWISE_ATTENTION, sdpa_mask)
