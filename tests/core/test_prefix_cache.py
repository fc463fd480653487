"""Prefix sharing: the plan (shared lengths, order) against brute force; the cache against plain forwards."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from headscore.core.errors import HeadscoreError
from headscore.core.model import with_cache
from headscore.core.prefix_cache import (
    PrefixCache,
    PrefixOptions,
    common_prefix_length,
    extend_cache,
    pass_ends,
    plan_prefixes,
    stack_prefixes,
)


def lcp(first: list[int], second: list[int]) -> int:
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count


def haystack_sequences(seed: int = 0) -> tuple[list[torch.Tensor], list[str]]:
    """Needle-trial-like id sequences: two haystacks (each after its own template header), needles inserted
    at several depths, several lengths, a question after each; plus one prompt sharing nothing. Returns
    (sequences, (haystack, depth) of each)."""
    generator = torch.Generator().manual_seed(seed)
    hay = {name: torch.randint(10, 100, (90,), generator=generator) for name in ("a", "b")}
    header = {"a": torch.tensor([1, 2]), "b": torch.tensor([2, 1])}
    needles = [torch.tensor([3, 4, 5, 6]), torch.tensor([3, 4, 7])]  # the needles begin alike
    question = torch.tensor([8, 9, 8])
    sequences, labels = [], []
    for name, text in hay.items():
        for length in (40, 70, 90):
            for depth in (0.0, 0.3, 0.6, 1.0):
                for needle in needles:
                    cut = int(length * depth)
                    sequences.append(torch.cat([header[name], text[:cut], needle, text[cut:length], question]))
                    labels.append((name, depth))
    sequences.append(torch.tensor([0, 0, 2, 1]))
    labels.append(("alone", None))
    return sequences, labels


def trie_nodes(keys: list[list[int]]) -> int:
    """Distinct non-empty prefixes of the keys: the least number of tokens any prefill order must compute."""
    return len({tuple(key[:end]) for key in keys for end in range(1, len(key) + 1)})


def walk_cost(keys: list[list[int]], order: list[int]) -> int:
    """Tokens prefilled when one cache is cropped to what it shares with the next key and extended."""
    cost, cached = 0, []
    for index in order:
        cost += len(keys[index]) - lcp(cached, keys[index])
        cached = keys[index]
    return cost


@pytest.mark.parametrize("min_suffix, max_tokens", [(1, None), (5, None), (1, 30)])
def test_plan_shares_the_longest_common_prefix_and_prefills_each_token_once(min_suffix, max_tokens):
    sequences, labels = haystack_sequences()
    lists = [s.tolist() for s in sequences]
    plan = plan_prefixes(sequences, min_suffix=min_suffix, max_tokens=max_tokens)
    assert sorted(plan.order) == list(range(len(sequences)))
    for i, ids in enumerate(lists):
        longest = max(lcp(ids, other) for j, other in enumerate(lists) if j != i)
        cap = len(ids) if max_tokens is None else max_tokens
        assert plan.shared[i] == max(0, min(longest, len(ids) - min_suffix, cap))
    assert plan.shared[-1] == 0  # the unrelated prompt
    keys = [ids[:shared] for ids, shared in zip(lists, plan.shared, strict=True)]
    assert walk_cost(keys, plan.order) == trie_nodes(keys)  # every shared token prefilled once
    assert walk_cost(keys, list(range(len(keys)))) > trie_nodes(keys)  # file order would recompute
    ranks = {name: [r for r, i in enumerate(plan.order) if labels[i][0] == name] for name in ("a", "b", "alone")}
    assert all(r[-1] - r[0] + 1 == len(r) for r in ranks.values())  # one haystack after the other
    distinct = [tuple(p.tolist()) for p in plan.prefixes]  # each shared prefix once
    assert sorted(distinct) == sorted({tuple(key) for key in keys if key})


@pytest.mark.parametrize("chunk", [8, 1000])
def test_pass_ends_are_where_a_prefix_meets_the_others_on_its_own_path(chunk):
    sequences, _ = haystack_sequences()
    plan = plan_prefixes(sequences)
    planned = stack_prefixes(plan.prefixes)
    prefixes = [p.tolist() for p in plan.prefixes]
    for prefix in prefixes:
        ends = pass_ends(torch.tensor(prefix), planned, chunk)
        expected = {lcp(prefix, other) for other in prefixes} | set(range(chunk, len(prefix), chunk))
        assert ends == sorted((expected | {len(prefix)}) - {0})
    # two prefixes agreeing on their first k tokens end the same passes below k (so cropping either to an
    # end where they part recomputes nothing and finds the entries the other path computed)
    for first in prefixes:
        for second in prefixes:
            k = lcp(first, second)
            below = [[e for e in pass_ends(torch.tensor(p), planned, chunk) if e < k] for p in (first, second)]
            assert below[0] == below[1]
    # a depth-0 branch (needle first) is not split at the haystack's insertion points
    depth0 = next(prefix for prefix in prefixes if len(prefix) > 30 and prefix[2] == 3)
    hay = max((p for p in prefixes if p[:2] == depth0[:2] and p[2] != 3), key=len)
    assert len(pass_ends(torch.tensor(depth0), planned, 1000)) < len(pass_ends(torch.tensor(hay), planned, 1000))


def test_plan_runs_shallow_insertions_first():
    sequences, labels = haystack_sequences()
    plan = plan_prefixes(sequences)
    for name in ("a", "b"):
        # needles inside the haystack: the cached haystack prefix only grows (depth-0 needles are branches
        # of their own, sharing the needle)
        shared = [plan.shared[i] for i in plan.order if labels[i][0] == name and labels[i][1] > 0]
        assert shared == sorted(shared) and len(set(shared)) > 3


def test_common_prefix_length():
    assert common_prefix_length(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])) == 2
    assert common_prefix_length(torch.tensor([1, 2]), torch.tensor([1, 2, 4])) == 2
    assert common_prefix_length(torch.tensor([], dtype=torch.long), torch.tensor([1])) == 0
    assert common_prefix_length(torch.tensor([7]), torch.tensor([1])) == 0


@pytest.fixture
def model(tiny_llama):
    return tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8, vocab=128, seed=3)


@torch.no_grad()
def test_suffix_on_the_shared_prefix_equals_a_plain_forward(model):
    sequences, _ = haystack_sequences(seed=1)
    plan = plan_prefixes(sequences, min_suffix=3)
    prefixes = PrefixCache(model, plan.prefixes, chunk=16)
    for index in plan.order:
        ids, shared = sequences[index], plan.shared[index]
        expected = model(input_ids=ids[None]).logits[0, shared:]
        with prefixes.reuse(ids, shared) as (cache, start):
            assert start == shared
            if cache is None:
                assert shared == 0
                continue
            assert cache.get_seq_length() == shared
            before = [layer.keys.clone() for layer in cache.layers]
            logits = model(input_ids=ids[None, shared:], **with_cache(model, cache), use_cache=True).logits[0]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        assert cache.get_seq_length() == shared  # cropped back: the suffix is gone
        for layer, keys in zip(cache.layers, before, strict=True):
            assert torch.equal(layer.keys, keys)  # the prefix entries were not touched
    keys = [s[:n].tolist() for s, n in zip(sequences, plan.shared, strict=True)]
    assert prefixes.prefilled == trie_nodes(keys)
    assert prefixes.reused == sum(plan.shared) - prefixes.prefilled
    subset = plan.order[1::3]  # a shard or a resumed run: still no shared token computed twice
    prefixes = PrefixCache(model, plan.prefixes, chunk=16)
    for index in subset:
        with prefixes.reuse(sequences[index], plan.shared[index]):
            pass
    assert prefixes.prefilled == trie_nodes([keys[i] for i in subset])


@torch.no_grad()
@pytest.mark.parametrize("start, ends", [(0, (32, 64)), (5, (32, 64)), (5, (5, 20, 21, 32, 47, 64, 89, 95))])
def test_extend_cache_in_passes_equals_one_forward(model, start, ends):
    ids = torch.randint(0, 128, (90,), generator=torch.Generator().manual_seed(4))
    expected = DynamicCache(config=model.config)
    logits = model(input_ids=ids[None]).logits[0, -1]
    model(input_ids=ids[None], **with_cache(model, expected), use_cache=True)
    cache = DynamicCache(config=model.config)
    if start:
        model(input_ids=ids[None, :start], **with_cache(model, cache), use_cache=True)
    calls = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        extend_cache(model, cache, ids[:89], start, ends)
    finally:
        hook.remove()
    # passes end at the ends after start and before 89, the last at 89
    stops = [*(e for e in ends if start < e < 89), 89]
    assert calls == [b - a for a, b in zip([start, *stops], stops, strict=False)]
    assert cache.get_seq_length() == 89
    last = model(input_ids=ids[None, 89:], **with_cache(model, cache), use_cache=True).logits[0, -1]
    torch.testing.assert_close(last, logits, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(cache.layers, expected.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys[:, :, :90], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_cached_prefix_does_not_depend_on_what_ran_before(model):
    """Fixed cut points: the same prefix gets bit-identical keys whatever the cache held before."""
    sequences, _ = haystack_sequences(seed=2)
    plan = plan_prefixes(sequences)
    target = max(range(len(sequences)), key=lambda i: plan.shared[i])
    states = []
    for history in ([], plan.order[:7], plan.order[::-1][:9]):
        prefixes = PrefixCache(model, plan.prefixes, chunk=8)
        for index in history:
            with prefixes.reuse(sequences[index], plan.shared[index]):
                pass
        with prefixes.reuse(sequences[target], plan.shared[target]) as (cache, _):
            states.append([(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
    for other in states[1:]:
        for (keys, values), (keys2, values2) in zip(states[0], other, strict=True):
            assert torch.equal(keys, keys2) and torch.equal(values, values2)


@torch.no_grad()
def test_an_error_inside_drops_the_cache(model):
    sequences, _ = haystack_sequences()
    prefixes = PrefixCache(model)
    with pytest.raises(RuntimeError, match="boom"), prefixes.reuse(sequences[0], 20):
        raise RuntimeError("boom")
    assert prefixes.cache is None
    with prefixes.reuse(sequences[0], 20) as (cache, start):
        assert cache.get_seq_length() == start == 20


def test_sliding_window_models_and_bad_options_are_refused(tiny_llama):
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    tiny = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "sliding_window": 4}
    sliding = Gemma2ForCausalLM(Gemma2Config(**tiny, num_hidden_layers=2,
                                             layer_types=["sliding_attention", "full_attention"])).eval()
    assert not PrefixOptions().for_model(sliding).enabled  # estimate and evaluate run every prompt whole
    assert PrefixOptions().for_model(tiny_llama()).enabled
    # every layer sliding: run as full attention (within the window), so its prefixes are shared too
    assert PrefixOptions().for_model(MistralForCausalLM(MistralConfig(**tiny, num_hidden_layers=1))).enabled
    with pytest.raises(HeadscoreError, match="sliding-window"), PrefixCache(sliding).reuse(torch.arange(10), 6):
        pass
    with pytest.raises(HeadscoreError, match="at least 1"):
        PrefixOptions(max_tokens=0)
