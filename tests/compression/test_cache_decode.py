"""The head-wise cache's decode side: rows leaving or repeating remap the plan (no new plan), the flex block mask
from device tensors, the tail grown in place, the kernel chosen once."""

from __future__ import annotations

import pytest
import torch

from headscore.compression import cache as cache_module
from headscore.compression.attention import (
    HeadwiseEntries,
    headwise_attention,
    plan_segments,
    segment_block_mask,
    segment_spans,
)
from headscore.compression.cache import HeadwiseLayer


def reference_attention(query, keys, values, kept, offsets, tail_keys, tail_values, scaling):
    """Loops over rows, query heads and queries: one softmax over the (row, head)'s own kept entries (stored
    from `offsets`) and the row's tail up to the query (the last q tail tokens are the queries'), in float64."""
    rows, q_heads, q_len, _ = query.shape
    heads, kv_heads, t_len = kept.shape[1], tail_keys.shape[1], tail_keys.shape[2]
    out = torch.empty(query.shape, dtype=torch.float64)
    for row in range(rows):
        for h in range(q_heads):
            start, count = int(offsets[row, h // (q_heads // heads)]), int(kept[row, h // (q_heads // heads)])
            for i in range(q_len):
                seen = t_len - q_len + i + 1
                k = torch.cat([keys[start:start + count], tail_keys[row, h // (q_heads // kv_heads), :seen]])
                v = torch.cat([values[start:start + count], tail_values[row, h // (q_heads // kv_heads), :seen]])
                out[row, h, i] = torch.softmax(k.double() @ query[row, h, i].double() * scaling, -1) @ v.double()
    return out

# [rows, heads]: head-level budgets (ragged), a uniform row (a view bucket), empty heads, a lone long head
KEPT = torch.tensor([[5, 0, 12, 1, 30, 2, 9, 9],
                     [7, 7, 7, 7, 7, 7, 7, 7],
                     [40, 3, 9, 2, 0, 1, 64, 17],
                     [3, 3, 4, 3, 3, 3, 3, 3],
                     [11, 11, 11, 11, 11, 11, 11, 11]])
SELECTIONS = [[0, 2, 3, 4], [2, 4], [4, 1, 0, 3, 2], [2, 2, 0, 2, 4, 4], [3], [1, 1]]


def layer_of(kept: torch.Tensor, kv_heads: int = 4, tail: int = 3, dim: int = 16, seed: int = 0) -> HeadwiseLayer:
    generator = torch.Generator().manual_seed(seed)
    total, rows = int(kept.sum()), kept.shape[0]
    keys, values = (torch.randn(total, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    tail_keys, tail_values = (torch.randn(rows, kv_heads, tail, dim, generator=generator, dtype=torch.float64)
                              for _ in range(2))
    return HeadwiseLayer(keys, values, kept, 100, [100] * rows, tail_keys, tail_values)


def entries_of(layer: HeadwiseLayer, buckets=None) -> HeadwiseEntries:
    return HeadwiseEntries(layer.keys, layer.values, layer.buckets if buckets is None else buckets, layer.heads,
                           layer.tail_keys, layer.tail_values)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_rows_leaving_repeating_or_reordered_remap_the_plan_exactly(selection, kernel, monkeypatch):
    """After `batch_select_indices` (drops, repeats, a new order), the remapped plan gives the attention of a
    fresh plan of the new rows and of a plain per-(row, head) loop; the dynamic program does not run."""
    layer = layer_of(KEPT)
    before = {row: layer.keys[int(KEPT[:row].sum()):int(KEPT[:row + 1].sum())] for row in range(KEPT.shape[0])}

    def no_plan(*args, **kwargs):
        raise AssertionError("plan_segments ran on a row selection")

    monkeypatch.setattr(cache_module, "plan_segments", no_plan)
    layer.batch_select_indices(torch.tensor(selection))
    kept = KEPT[selection]
    assert torch.equal(layer.kept, kept) and layer.keys.shape[0] == int(KEPT.sum())  # nothing copied
    for position, row in enumerate(selection):
        assert torch.equal(layer.entries(position)[0], before[row])
    # every non-empty segment in exactly one bucket; widths are their longest segment's; views read in place
    covered = torch.cat([b.host for b in layer.buckets]).sort().values
    assert covered.tolist() == [s for s in range(kept.numel()) if int(kept.reshape(-1)[s]) > 0]
    lengths, offsets = kept.reshape(-1), layer.offsets().reshape(-1)
    for bucket in layer.buckets:
        assert torch.equal(bucket.segments.cpu(), bucket.host)
        assert bucket.width == int(lengths[bucket.host].max())
        if bucket.start >= 0:
            assert bucket.host.tolist() == list(range(bucket.first, bucket.first + bucket.host.shape[0]))
            assert bucket.start == int(offsets[bucket.first]) and bool((lengths[bucket.host] == bucket.width).all())
        else:
            assert bucket.index is not None and bucket.host.shape[0] > 1
            slots = torch.arange(bucket.width)[None, :]
            real = slots < lengths[bucket.host][:, None]
            want = (offsets[bucket.host][:, None] + slots).masked_fill(~real, 0)
            assert torch.equal(bucket.index.view(-1, bucket.width), want)
            assert (bucket.padding is None) == bool(real.all())
            if bucket.padding is not None:
                assert torch.equal(bucket.padding, ~real)
    starts, spans = segment_spans(layer.buckets, kept.numel(), "cpu")
    assert torch.equal(spans, lengths) and torch.equal(starts[lengths > 0], offsets[lengths > 0])
    generator = torch.Generator().manual_seed(len(selection))
    for q_len in (1, 2):
        query = torch.randn(len(selection), 8, q_len, 16, generator=generator, dtype=torch.float64)
        got = headwise_attention(query, entries_of(layer), 0.25)
        fresh = headwise_attention(query, entries_of(layer, plan_segments(kept, offsets=layer.offsets())), 0.25)
        want = reference_attention(query, layer.keys, layer.values, kept, layer.offsets(), layer.tail_keys,
                                   layer.tail_values, 0.25)
        torch.testing.assert_close(got, fresh, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_repeated_selections_keep_remapping_exactly():
    """Plans remapped again and again (rows leaving one by one after repeats) still equal a fresh plan."""
    layer = layer_of(KEPT, seed=3)
    rows = list(range(KEPT.shape[0]))
    for selection in ([0, 1, 2, 3, 4, 2, 0], [6, 0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [0, 2, 3, 4], [3, 1], [1]):
        layer.batch_select_indices(torch.tensor(selection))
        rows = [rows[i] for i in selection]
        kept = KEPT[rows]
        query = torch.randn(len(rows), 8, 1, 16, dtype=torch.float64)
        fresh = plan_segments(kept, offsets=layer.offsets())
        torch.testing.assert_close(headwise_attention(query, entries_of(layer), 0.3),
                                   headwise_attention(query, entries_of(layer, fresh), 0.3), atol=1e-12, rtol=1e-12)
    assert layer.rows == 1 and torch.equal(layer.kept, KEPT[[rows[0]]])


def test_flex_block_mask_from_device_tensors_equals_the_loop_after_a_selection():
    """The block mask built from the remapped plan's segment spans (device ops, nothing read back) lists, per
    query head, exactly the blocks its segment overlaps and keeps only its entries (rows sharing entries, a
    row's storage no longer read)."""
    kept = torch.tensor([[130, 0, 5, 300], [1, 256, 127, 129], [64, 64, 64, 64]])
    layer = layer_of(kept, kv_heads=2, tail=1)
    layer.batch_select_indices(torch.tensor([2, 1, 1]))  # row 0 gone, row 1 twice: shared, not copied
    kept = kept[[2, 1, 1]]
    starts, lengths = segment_spans(layer.buckets, kept.numel(), "cpu")
    offsets = layer.offsets().reshape(-1)
    assert torch.equal(lengths, kept.reshape(-1)) and torch.equal(starts[lengths > 0], offsets[lengths > 0])
    total = layer.keys.shape[0]
    mask = segment_block_mask(starts.view(kept.shape), lengths.view(kept.shape), 8, 1, total)
    counts, indices = mask.kv_num_blocks[0, :, 0], mask.kv_indices[0, :, 0]
    blocks = (total + 127) // 128
    for head in range(kept.shape[0] * 8):
        start, count = int(offsets[head // 2]), int(lengths[head // 2])
        want = [b for b in range(blocks) if count and b * 128 < start + count and (b + 1) * 128 > start]
        assert indices[head, :int(counts[head])].tolist() == want, head
        keep = mask.mask_mod(0, torch.tensor(head), 0, torch.arange(total))
        assert keep.nonzero().flatten().tolist() == list(range(start, start + count))


def test_the_tail_grows_in_place_bit_identical_to_concatenation():
    """Decode-sized and question-sized appends across the buffer's reserve, with rows leaving and repeating in
    between: the tail equals torch.cat growth bit for bit, and its buffer is reused while it has room."""
    from headscore.compression.cache import TAIL_ROOM

    layer = layer_of(torch.tensor([[4, 2], [3, 3], [1, 6]]), kv_heads=2, tail=0, dim=8)
    want_keys, want_values = layer.tail_keys.clone(), layer.tail_values.clone()
    generator = torch.Generator().manual_seed(1)
    pointers = set()
    for step in range(300):
        new = 5 if step == 0 else 1
        keys, values = (torch.randn(layer.rows, 2, new, 8, generator=generator, dtype=torch.float64)
                        for _ in range(2))
        entries, _ = layer.update(keys, values)
        want_keys, want_values = torch.cat([want_keys, keys], 2), torch.cat([want_values, values], 2)
        assert torch.equal(entries.tail_keys, want_keys) and torch.equal(entries.tail_values, want_values)
        pointers.add(layer.tail_keys.data_ptr())
        if step in (7, 100):
            selection = torch.tensor([2, 0, 0]) if step == 7 else torch.tensor([1, 2])
            pointer = layer.tail_keys.data_ptr()
            layer.batch_select_indices(selection)
            want_keys, want_values = want_keys[selection], want_values[selection]
            assert torch.equal(layer.tail_keys, want_keys) and torch.equal(layer.tail_values, want_values)
            assert (layer.tail_keys.data_ptr() == pointer) == (step == 100)  # rows leaving: moved in place
    # reallocated at the two selections and when the room ran out (doubling from TAIL_ROOM): a few times
    assert len(pointers) <= 2 + 2 + (300 // TAIL_ROOM).bit_length()
    assert layer.generated == want_keys.shape[2] == 304


def test_the_kernel_is_chosen_once_per_cache(monkeypatch):
    """The decode kernel is read when the layer is built, not at every step: changing the environment after
    (even to an invalid value) does not change it."""
    monkeypatch.setenv("HEADSCORE_DECODE_KERNEL", "flex")
    layer = layer_of(KEPT, tail=0)
    assert layer.kernel == "flex"
    monkeypatch.setenv("HEADSCORE_DECODE_KERNEL", "not-a-kernel")
    keys = torch.randn(KEPT.shape[0], 4, 1, 16, dtype=torch.float64)
    entries, _ = layer.update(keys, keys)
    headwise_attention(torch.randn(KEPT.shape[0], 8, 1, 16, dtype=torch.float64), entries, 0.25)
    assert entries.kernel == "flex" and 1 in layer.flex_masks  # flex ran: its block mask was built


def test_rows_leaving_and_the_flex_mask_read_nothing_back_from_the_device():
    """The decode side's device tensors on the `meta` device (shapes, no values: any read of a value raises):
    a row selection (remapped plan, tails) and the flex block mask of its plan run on the bookkeeping kept on
    the host, reading back no device tensor (what would be a synchronization on CUDA)."""
    kept = KEPT
    total, rows = int(kept.sum()), kept.shape[0]
    keys = torch.empty(total, 16, device="meta")
    tail = torch.empty(rows, 4, 3, 16, device="meta")
    layer = HeadwiseLayer(keys, keys.clone(), kept, 100, [100] * rows, tail, tail.clone())
    assert layer.kernel == "buckets" and all(b.segments.device.type == "meta" for b in layer.buckets)
    layer.batch_select_indices(torch.tensor([4, 2, 2, 0]))
    layer.batch_select_indices(torch.tensor([3, 1, 0]))
    token = torch.empty(3, 4, 1, 16, device="meta")
    entries, _ = layer.update(token, token)
    assert entries.tail_keys.shape == (3, 4, 4, 16) and layer.keys.shape[0] == total
    starts, lengths = segment_spans(layer.buckets, 3 * 8, "meta")
    mask = segment_block_mask(starts.view(3, 8), lengths.view(3, 8), 16, 1, total)
    assert mask.kv_num_blocks.shape == (1, 48, 1)
    host = torch.cat([b.host for b in layer.buckets]).sort().values  # the same plan on the CPU, checked
    assert host.tolist() == [s for s in range(24) if int(KEPT[[0, 2, 4]].reshape(-1)[s]) > 0]
