"""The head-wise cache: decode attention against a per-head reference, storage, kept entries."""

from __future__ import annotations

import pytest
import torch

from headscore.compression.allocation import allocate
from headscore.compression.attention import HEADWISE_ATTENTION, HeadwiseEntries, headwise_attention, plan_segments
from headscore.compression.cache import HeadwiseCache, select_entries
from headscore.compression.generation import compress_state, generate_ids, prefill, prefill_compressed
from headscore.compression.presses import make_press
from headscore.core.attention import use_attention
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry, with_cache


def reference_attention(query, keys, values, kept, tail_keys, tail_values, scaling, softcap=None, sinks=None):
    """Loops over rows, query heads and query rows: one softmax over the (row, head)'s own kept entries plus the
    row's visible tail (and the head's sink logit), in float64."""
    rows, q_heads, q_len, _ = query.shape
    heads, kv_heads, t_len = kept.shape[1], tail_keys.shape[1], tail_keys.shape[2]
    offsets = (kept.reshape(-1).cumsum(0) - kept.reshape(-1)).view(rows, heads)
    out = torch.empty(query.shape, dtype=torch.float64)
    for row in range(rows):
        for h in range(q_heads):
            cache_head, kv = h // (q_heads // heads), h // (q_heads // kv_heads)
            start, count = int(offsets[row, cache_head]), int(kept[row, cache_head])
            for i in range(q_len):
                visible = t_len - q_len + i + 1
                k = torch.cat([keys[start:start + count], tail_keys[row, kv, :visible]]).double()
                v = torch.cat([values[start:start + count], tail_values[row, kv, :visible]]).double()
                logits = k @ query[row, h, i].double() * scaling
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
                if sinks is not None:
                    logits = torch.cat([logits, sinks[h:h + 1].double()])
                probs = torch.softmax(logits, -1)[:k.shape[0]]
                out[row, h, i] = probs @ v
    return out


def random_entries(kept, kv_heads, tail, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = int(kept.sum())
    keys, values = torch.randn(total, dim, generator=generator), torch.randn(total, dim, generator=generator)
    tail_keys = torch.randn(kept.shape[0], kv_heads, tail, dim, generator=generator)
    tail_values = torch.randn(kept.shape[0], kv_heads, tail, dim, generator=generator)
    entries = HeadwiseEntries(keys, values, plan_segments(kept), kept.shape[1], tail_keys, tail_values)
    return entries, generator


KEPT = {  # [rows, heads]: ragged rows (head-level budgets), an empty head, a uniform row (a view bucket)
    "kv": torch.tensor([[5, 0, 12, 1], [7, 7, 7, 7], [40, 3, 9, 2]]),
    "query": torch.tensor([[5, 0, 12, 1, 7, 3, 9, 2], [4, 4, 4, 4, 4, 4, 4, 4]]),
}


@pytest.mark.parametrize("granularity,q_len", [("kv", 1), ("kv", 3), ("query", 1), ("query", 2)])
def test_batched_attention_matches_a_per_row_and_head_loop(granularity, q_len, kernel):
    kept = KEPT[granularity]
    rows, q_heads, kv_heads = kept.shape[0], 8, 4 if granularity == "kv" else 2
    entries, generator = random_entries(kept, kv_heads, tail=4, seed=q_len)
    query = torch.randn(rows, q_heads, q_len, 16, generator=generator)
    got = headwise_attention(query, entries, 0.25)
    want = reference_attention(query, entries.keys, entries.values, kept, entries.tail_keys, entries.tail_values,
                               0.25)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert got.shape == query.shape and got.dtype == query.dtype


def test_softcap_and_sinks_match_the_plain_softmax(kernel):
    kept = KEPT["kv"]
    entries, generator = random_entries(kept, 4, tail=3, seed=7)
    query = torch.randn(3, 8, 1, 16, generator=generator) * 3
    sinks = torch.randn(8, generator=generator)
    got = headwise_attention(query, entries, 0.5, softcap=2.0, sinks=sinks)
    want = reference_attention(query, entries.keys, entries.values, kept, entries.tail_keys, entries.tail_values,
                               0.5, softcap=2.0, sinks=sinks)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    plain = headwise_attention(query, entries, 0.5)
    assert not torch.allclose(got, plain, atol=1e-3)  # both terms change the result


def test_flex_block_mask_lists_exactly_the_blocks_each_segment_overlaps():
    from headscore.compression.attention import FLEX_BLOCK, segment_block_mask

    kept = torch.tensor([[130, 0, 5, 300], [1, 256, 127, 129]])  # segments across block edges, one empty
    q_heads = 8  # 2 query heads per cache head
    starts = (kept.reshape(-1).cumsum(0) - kept.reshape(-1)).view(kept.shape)
    mask = segment_block_mask(starts, kept, q_heads, 1, int(kept.sum()))
    counts, indices = mask.kv_num_blocks[0, :, 0], mask.kv_indices[0, :, 0]  # per flattened query head
    lengths = kept.reshape(-1)
    offsets = lengths.cumsum(0) - lengths
    blocks = (int(lengths.sum()) + FLEX_BLOCK - 1) // FLEX_BLOCK
    for head in range(kept.shape[0] * q_heads):
        segment = head // 2
        start, count = int(offsets[segment]), int(lengths[segment])
        want = [b for b in range(blocks) if count and b * FLEX_BLOCK < start + count and (b + 1) * FLEX_BLOCK > start]
        assert indices[head, :int(counts[head])].tolist() == want, head
    keep = mask.mask_mod(0, torch.tensor(6), 0, torch.arange(int(lengths.sum())))  # query head 6: segment 3
    assert keep.nonzero().flatten().tolist() == list(range(135, 435))


def test_a_flex_kernel_that_disagrees_gives_way_to_the_buckets(monkeypatch):
    """The first flex result of a process is checked against the exact buckets: a wrong one (as a miscompiled
    kernel would give) is not used; one warning, and the buckets from then on."""
    from headscore.compression import attention

    kept = KEPT["kv"]
    entries, generator = random_entries(kept, 4, tail=3, seed=11)
    query = torch.randn(3, 8, 1, 16, generator=generator)
    want = headwise_attention(query, entries, 0.5)
    monkeypatch.delenv("HEADSCORE_DECODE_KERNEL", raising=False)
    monkeypatch.setattr(attention, "_flex_failed", False)
    monkeypatch.setattr(attention, "_flex_checked", False)
    monkeypatch.setattr(attention, "decode_kernel", lambda device: "auto")  # as on CUDA: flex unless it failed
    calls = []

    def wrong(*args, **kwargs):
        calls.append(1)
        out, lse = real(*args, **kwargs)
        return out + 1.0, lse

    real = attention.flex_prompt_part
    monkeypatch.setattr(attention, "flex_prompt_part", wrong)
    with pytest.warns(UserWarning, match="disagrees with the bucketed kernel"):
        got = headwise_attention(query, entries, 0.5)
    torch.testing.assert_close(got, want)
    assert attention._flex_failed and len(calls) == 1
    headwise_attention(query, entries, 0.5)
    assert len(calls) == 1  # not tried again
    monkeypatch.setattr(attention, "flex_prompt_part", real)
    monkeypatch.setattr(attention, "_flex_failed", False)
    torch.testing.assert_close(headwise_attention(query, entries, 0.5), want)  # the right one passes the check
    assert attention._flex_checked and not attention._flex_failed


def test_buckets_cover_each_segment_once_with_bounded_padding():
    kept = torch.tensor([[1, 2, 3, 500, 510, 520, 1000, 0], [8] * 8])
    buckets = plan_segments(kept, overhead=64)
    covered = torch.cat([b.segments for b in buckets]).sort().values
    assert covered.tolist() == [s for s in range(16) if s != 7]  # the empty segment is in none
    lengths = kept.reshape(-1)
    offsets = lengths.cumsum(0) - lengths
    views = [b for b in buckets if b.start >= 0]
    assert (int(kept[0].sum()), 8, list(range(8, 16))) in [(v.start, v.width, v.segments.tolist()) for v in views]
    for view in views:  # a view: consecutive segments of its width, read in place from `start`
        count = view.segments.shape[0]
        assert view.segments.tolist() == list(range(view.first, view.first + count))
        assert view.start == int(offsets[view.first]) and (lengths[view.segments] == view.width).all()
        assert view.index is None and view.padding is None
    gathered = [b for b in buckets if b.start < 0]
    assert gathered and all(b.segments.shape[0] > 1 for b in gathered)  # one segment is never copied
    assert any(v.segments.shape[0] == 1 and v.first // 8 == 0 for v in views)  # a ragged row's lone head
    for bucket in buckets:
        assert bucket.width == int(lengths[bucket.segments].max())
    padded = sum(b.segments.shape[0] * b.width for b in buckets if b.start < 0)
    assert padded < 1.2 * int(kept[0].sum())  # short and long heads are not padded together


@pytest.fixture
def model_and_ids(tiny_llama):
    model = tiny_llama(layers=3, heads=4, kv_heads=2, head_dim=8)
    torch.manual_seed(5)
    return model, torch.randint(3, 128, (1, 50))


def test_kept_entries_and_bytes_follow_the_budgets(model_and_ids):
    model, ids = model_and_ids
    geometry = Geometry.from_config(model.config)
    budgets = allocate("uniform", geometry, 16, window=4)
    budgets.matrix = torch.tensor([[3, 11], [0, 20], [46, 7]])  # head-level budgets, one above the prompt
    press = make_press("headkv", geometry, budgets=budgets)
    cache, _, _ = prefill_compressed(model, ids, press)
    want = (budgets.matrix.clamp(max=46) + 4)
    assert torch.equal(cache.kept(), want)
    element = cache.layers[0].keys.element_size()
    assert cache.kv_bytes() == int(want.sum()) * 8 * 2 * element
    assert cache.get_seq_length() == 50
    layer = cache.layers[0]
    assert layer.keys.shape == (int(want[0].sum()), 8) and layer.tail_keys.shape == (1, 2, 0, 8)


def test_kept_entries_are_the_selected_positions_of_the_right_head(model_and_ids):
    """Stored rows equal the full keys at the selected (head, position), window included, in order; also
    for query-granularity budgets, where each query head stores its own selection of its KV head."""
    model, ids = model_and_ids
    geometry = Geometry.from_config(model.config)
    state = prefill(model, ids, window=4)
    for granularity, heads in (("kv", 2), ("query", 4)):
        press = make_press("headkv", geometry, budgets=allocate("uniform", geometry, 12, window=4,
                                                                granularity=granularity))
        cache = HeadwiseCache.from_prefill(geometry, press, state)
        for index, layer in enumerate(cache.layers):
            head, position, kept = select_entries(state.layer_inputs(index, heads), press, geometry)
            assert kept.tolist() == [12] * heads
            assert position.view(heads, 12)[:, -4:].tolist() == [[46, 47, 48, 49]] * heads
            assert bool((position.view(heads, 12).diff(dim=1) > 0).all())
            source = head // (heads // 2)
            assert torch.equal(layer.keys, state.keys[index][source, position])
            assert torch.equal(layer.values, state.values[index][source, position])


def padded_batch(prompts):
    """Left-padded ids [rows, longest] and attention mask of 1-D prompts."""
    width = max(p.shape[0] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[0]:], mask[row, width - prompt.shape[0]:] = prompt, 1
    return ids, mask


def row_presses(geometry, random_scores):
    scores = random_scores(geometry.layers, geometry.query_heads)
    return [make_press("snapkv", geometry, budget=12, window=4),
            make_press("headkv", geometry, budget=10, window=4, beta=1.5, scores=scores),
            make_press("pyramidkv", geometry, budget=80, window=4)]  # above its prompt: keeps everything


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_generate_on_a_padded_batch_with_per_row_presses_equals_separate_runs(tiny_llama, tiny_qwen2,
                                                                             random_scores, architecture):
    """Rows of different lengths (left padding) and presses: each row's kept entries, stored keys and greedy
    tokens equal its batch-1 run (float64, so padding's rounding cannot flip a greedy choice)."""
    model = (tiny_llama(layers=3, heads=4, kv_heads=2, head_dim=8) if architecture == "llama"
             else tiny_qwen2()).double()
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(6)
    prompts = [torch.randint(3, model.config.vocab_size, (n,)) for n in (40, 52, 33)]
    presses = row_presses(geometry, random_scores)
    ids, mask = padded_batch(prompts)
    cache = HeadwiseCache(geometry, presses)
    with torch.inference_mode(), use_attention(model, HEADWISE_ATTENTION):
        out = model.generate(ids, attention_mask=mask, **with_cache(model, cache), max_new_tokens=8,
                             min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    for row, (prompt, press) in enumerate(zip(prompts, presses, strict=True)):
        single, _, _ = prefill_compressed(model, prompt[None], press)
        tokens, _ = generate_ids(model, prompt[None], press, max_new_tokens=8)
        assert out[row, ids.shape[1]:].tolist() == tokens
        assert torch.equal(cache.kept(row), single.kept())
        for ours, alone in zip(cache.layers, single.layers, strict=True):
            start = int(ours.kept[:row].sum())
            stored = ours.keys[start:start + int(ours.kept[row].sum())]
            torch.testing.assert_close(stored, alone.keys[0:stored.shape[0]])
    # a budget above the prompt keeps only the row's real tokens, never padding
    assert cache.kept(2)[0].tolist() == [33, 33] and int(cache.kept(2).max()) == 33
    assert out.shape[0] == 3 and cache.rows == 3


def test_selecting_rows_keeps_their_entries_and_tails(tiny_llama, random_scores):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(7)
    state = prefill(model, torch.randint(3, 128, (1, 50)), window=4)
    presses = row_presses(geometry, random_scores)
    cache = compress_state(state, presses)
    alone = [compress_state(state, press) for press in presses]
    cache.layers[0].tail_keys = torch.arange(3.0)[:, None, None, None].expand(3, 2, 1, 8).clone()
    cache.layers[0].tail_values = cache.layers[0].tail_keys.clone()
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert cache.rows == 2 and cache.layers[0].tail_keys[:, 0, 0, 0].tolist() == [2.0, 0.0]
    for position, row in enumerate([2, 0]):
        assert torch.equal(cache.kept(position), alone[row].kept())
        assert torch.equal(cache.layers[1].entries(position)[0], alone[row].layers[1].keys)
    assert cache.kv_bytes() == cache.kv_bytes(0) + cache.kv_bytes(1)


def test_a_model_without_full_attention_layers_is_rejected(tiny_llama):
    """Every layer chunked: nothing to compress, one clear error; every layer sliding (Mistral v0.1 style) is
    full attention within its window (tests/models/test_families.py); hybrids load."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig

    chunked = LlamaConfig(num_hidden_layers=2)
    chunked.attention_chunk_size = 16
    with pytest.raises(HeadscoreError, match="no full-attention layer .its layers are chunked_attention"):
        Geometry.from_config(chunked)
    sliding = Geometry.from_config(MistralConfig(sliding_window=16, num_hidden_layers=2))
    assert (sliding.layers, sliding.compressed_layers, sliding.sliding_window) == (2, None, 16)
    assert Geometry.from_dict(sliding.to_dict()) == sliding
    assert Geometry.from_config(tiny_llama().config).compressed_layers is None
    hybrid = Geometry.from_config(Gemma2Config(num_hidden_layers=4, sliding_window=16))
    assert (hybrid.layers, hybrid.compressed_layers) == (2, (1, 3))


def test_a_recording_cache_cannot_decode(model_and_ids):
    model, ids = model_and_ids
    cache = HeadwiseCache(Geometry.from_config(model.config), None, window=4)
    with torch.inference_mode(), use_attention(model, HEADWISE_ATTENTION):
        model(input_ids=ids, **with_cache(model, cache), use_cache=True)
        assert [[record.queries.shape for record in rows] for rows in cache.recorded] == [[(4, 4, 8)]] * 3
        with pytest.raises(HeadscoreError, match="only recorded a prefill"):
            model(input_ids=ids[:, :1], **with_cache(model, cache), use_cache=True)
