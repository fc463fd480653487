"""The head-wise cache: decode attention against a per-head reference, storage, kept entries."""

from __future__ import annotations

import pytest
import torch

from headscore.compression.allocation import allocate
from headscore.compression.attention import headwise_attention
from headscore.compression.cache import HeadwiseCache, select_entries
from headscore.compression.generation import prefill, prefill_compressed
from headscore.compression.presses import HeadKVPress, make_press
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry


def reference_attention(query, keys, values, head, heads, tail_keys, tail_values, scaling):
    """Loop over query heads and query rows: softmax over the head's own entries plus the visible tail."""
    q_heads, q_len, _ = query.shape
    kv_heads, t_len = tail_keys.shape[:2]
    out = torch.empty_like(query)
    for h in range(q_heads):
        own = head == h // (q_heads // heads)
        kv = h // (q_heads // kv_heads)
        for i in range(q_len):
            visible = t_len - q_len + i + 1
            k = torch.cat([keys[own], tail_keys[kv, :visible]])
            v = torch.cat([values[own], tail_values[kv, :visible]])
            out[h, i] = torch.softmax(k @ query[h, i] * scaling, -1) @ v
    return out


@pytest.mark.parametrize("heads,q_len", [(2, 1), (2, 3), (8, 1), (8, 2)])
def test_headwise_attention_matches_reference(heads, q_len):
    torch.manual_seed(heads + q_len)
    q_heads, kv_heads, dim = 8, 2, 16
    counts = torch.tensor([5, 0, 12, 1, 7, 3, 9, 2][:heads])
    head = torch.repeat_interleave(torch.arange(heads), counts)
    total = int(counts.sum())
    keys, values = torch.randn(total, dim), torch.randn(total, dim)
    tail_keys, tail_values = torch.randn(kv_heads, 4, dim), torch.randn(kv_heads, 4, dim)
    query = torch.randn(q_heads, q_len, dim)
    got = headwise_attention(query, keys, values, head.to(torch.int16), heads, tail_keys, tail_values, 0.25)
    want = reference_attention(query, keys, values, head, heads, tail_keys, tail_values, 0.25)
    torch.testing.assert_close(got, want)


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
    press = HeadKVPress(budgets=budgets)
    cache, _, _ = prefill_compressed(model, ids, press)
    want = (budgets.matrix.clamp(max=46) + 4)
    assert torch.equal(cache.kept(), want)
    element = cache.layers[0].keys.element_size()
    assert cache.kv_bytes() == int(want.sum()) * 8 * 2 * element
    assert cache.get_seq_length() == 50
    layer = cache.layers[0]
    assert layer.keys.shape == (int(want[0].sum()), 8) and layer.tail_keys.shape == (2, 0, 8)


def test_kept_entries_are_the_selected_positions_of_the_right_head(model_and_ids):
    """Stored rows equal the full keys at the selected (head, position), window included, in order; also
    for query-granularity budgets, where each query head stores its own selection of its KV head."""
    model, ids = model_and_ids
    geometry = Geometry.from_config(model.config)
    state = prefill(model, ids, window=4)
    for granularity, heads in (("kv", 2), ("query", 4)):
        press = HeadKVPress(budgets=allocate("uniform", geometry, 12, window=4, granularity=granularity))
        cache = HeadwiseCache.from_prefill(geometry, press,
                                           list(zip(state.keys, state.values, state.scores, strict=True)))
        for index, layer in enumerate(cache.layers):
            head, position, kept = select_entries(state.scores[index], press, index, geometry, 50)
            assert kept.tolist() == [12] * heads
            assert position.view(heads, 12)[:, -4:].tolist() == [[46, 47, 48, 49]] * heads
            assert bool((position.view(heads, 12).diff(dim=1) > 0).all())
            source = head // (heads // 2)
            assert torch.equal(layer.keys, state.keys[index][source, position])
            assert torch.equal(layer.values, state.values[index][source, position])


def test_batch_of_two_is_an_error(model_and_ids):
    model, ids = model_and_ids
    press = make_press("snapkv", Geometry.from_config(model.config), budget=16)
    with pytest.raises(HeadscoreError, match="batch size 1"):
        prefill_compressed(model, ids.repeat(2, 1), press)
    cache = HeadwiseCache(Geometry.from_config(model.config), press)
    with pytest.raises(HeadscoreError, match="batch size 1"):
        cache.update(torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8), 0)


def test_a_model_without_full_attention_layers_is_rejected(tiny_llama):
    """Every layer sliding (Mistral v0.1 style): nothing to compress, one clear error; hybrids load."""
    from transformers import Gemma2Config, MistralConfig

    with pytest.raises(HeadscoreError, match="no full-attention layer"):
        Geometry.from_config(MistralConfig(sliding_window=16, num_hidden_layers=2))
    assert Geometry.from_config(tiny_llama().config).compressed_layers is None
    hybrid = Geometry.from_config(Gemma2Config(num_hidden_layers=4, sliding_window=16))
    assert (hybrid.layers, hybrid.compressed_layers) == (2, (1, 3))


def test_a_recording_cache_cannot_decode(model_and_ids):
    from headscore.compression.attention import HEADWISE_ATTENTION
    from headscore.core.attention import use_attention

    model, ids = model_and_ids
    cache = HeadwiseCache(Geometry.from_config(model.config), None, window=4)
    with torch.inference_mode(), use_attention(model, HEADWISE_ATTENTION):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        assert [scores.shape for _, _, scores in cache.recorded] == [(4, 46)] * 3
        with pytest.raises(HeadscoreError, match="only recorded a prefill"):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
