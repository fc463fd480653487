"""The question after the compressed context: several tokens prefilled on a compressed cache are exact, forks
share the compressed context, several questions of different lengths as rows equal each asked alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from headscore.compression.attention import HEADWISE_ATTENTION, HeadwiseEntries, headwise_attention, plan_segments
from headscore.compression.cache import HeadwiseCache
from headscore.compression.generation import (
    _forward,
    answer_after,
    compress_rows,
    compress_state,
    decode_rows,
    fork,
    prefill,
    prefill_compressed,
)
from headscore.compression.presses import make_press
from headscore.core.attention import use_attention
from headscore.core.decoding import StopRule
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry, with_cache


@pytest.fixture
def model(tiny_llama):
    return tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8).double()


def press_of(method: str, geometry: Geometry, budget: int, random_scores):
    scores = random_scores(geometry.layers, geometry.query_heads) if method == "headkv" else None
    return make_press(method, geometry, settings={"budget": budget, "window": 4, "scores": scores})


def all_logits(model, ids, cache, **extra):
    """Logits of every position of `ids` `[rows, q]` run on `cache` with the head-wise attention."""
    with torch.inference_mode(), use_attention(model, HEADWISE_ATTENTION):
        return model(input_ids=ids, **with_cache(model, cache), use_cache=True, **extra).logits


REFERENCE_MASKS: dict[int, torch.Tensor] = {}  # layer -> bool [q_heads, q, keys] of the running reference


def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention with the explicit per-layer mask `REFERENCE_MASKS[layer]` (keys repeated per
    query head)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    logits = (query @ key.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~REFERENCE_MASKS[module.layer_idx][None], float("-inf"))
    return (torch.softmax(logits, -1) @ value).transpose(1, 2), None


AttentionInterface.register("test_masked_reference", masked_attention)


def reference_logits(model, cache: HeadwiseCache, question: torch.Tensor) -> torch.Tensor:
    """The plain model run on the compressed cache's kept entries: each layer's KV heads padded to its longest
    head in a DynamicCache, an explicit mask `[q_heads, q, longest + q]` per layer showing each query head its
    KV head's kept entries and the question causally, positions after the context."""
    q_len, context = question.shape[0], cache.get_seq_length()
    plain = DynamicCache()
    for index, layer in enumerate(cache.layers):
        kept = layer.kept[0]
        longest = int(kept.max())
        keys = layer.keys.new_zeros(1, kept.shape[0], longest, layer.keys.shape[1])
        values = keys.clone()
        visible = torch.zeros(kept.shape[0], longest, dtype=torch.bool)
        start = 0
        for head, count in enumerate(kept.tolist()):  # heads, in the reference only
            keys[0, head, :count] = layer.keys[start:start + count]
            values[0, head, :count] = layer.values[start:start + count]
            visible[head, :count] = True
            start += count
        plain.update(keys, values, index)
        prompt = visible.repeat_interleave(model.config.num_attention_heads // kept.shape[0], 0)
        causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()[None].expand(prompt.shape[0], -1, -1)
        REFERENCE_MASKS[index] = torch.cat([prompt[:, None, :].expand(-1, q_len, -1), causal], dim=-1)
    with torch.inference_mode(), use_attention(model, "test_masked_reference"):
        return model(input_ids=question[None], **with_cache(model, plain), use_cache=True,
                     position_ids=torch.arange(context, context + q_len)[None]).logits


@pytest.mark.parametrize("method", ["snapkv", "headkv"])
def test_a_question_prefilled_on_the_compressed_cache_equals_the_plain_model_on_its_entries(model, method,
                                                                                              random_scores):
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(3)
    context, question = torch.randint(3, 128, (1, 60)), torch.randint(3, 128, (7,))
    cache, _, _ = prefill_compressed(model, context, press_of(method, geometry, 16, random_scores))
    if method == "headkv":
        assert bool((cache.kept() != cache.kept()[0, 0]).any())  # head-level budgets: ragged heads
    got = all_logits(model, question[None], fork(cache))
    torch.testing.assert_close(got, reference_logits(model, cache, question), atol=1e-10, rtol=1e-10)


def test_a_question_after_a_cache_keeping_everything_equals_one_prefill_of_context_and_question(model,
                                                                                              random_scores):
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(4)
    context, question = torch.randint(3, 128, (1, 40)), torch.randint(3, 128, (6,))
    with torch.inference_mode():
        whole = model(input_ids=torch.cat([context, question[None]], 1)).logits[:, -6:]
        plain = model.generate(torch.cat([context, question[None]], 1), max_new_tokens=8, min_new_tokens=8,
                               do_sample=False, eos_token_id=None, pad_token_id=0)[0, 46:].tolist()
    for method in ("snapkv", "headkv", "full"):
        cache, _, _ = prefill_compressed(model, context, press_of(method, geometry, 200, random_scores))
        torch.testing.assert_close(all_logits(model, question[None], fork(cache)), whole, atol=1e-10, rtol=1e-10)
        tokens, seconds = answer_after(model, cache, [question], StopRule(8))
        assert tokens == [plain] and seconds > 0, method


@pytest.mark.parametrize("method", ["snapkv", "headkv", "full"])
def test_questions_of_different_lengths_as_rows_equal_each_asked_alone(model, method, random_scores):
    """Three questions left padded after the compressed context (a mask hides the padding), decoded as rows:
    each one's tokens equal its own one-row run; the compressed context is shared and never modified."""
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(5)
    context = torch.randint(3, 128, (1, 70))
    questions = [torch.randint(3, 128, (n,)) for n in (3, 9, 5)]
    cache, _, _ = prefill_compressed(model, context, press_of(method, geometry, 20, random_scores))
    before = [(layer.keys.data_ptr(), layer.keys.clone()) for layer in cache.layers]
    rules = [StopRule(6), StopRule(10), StopRule(3)]
    together, _ = answer_after(model, cache, questions, rules)
    alone = [answer_after(model, cache, [question], rule)[0][0] for question, rule in zip(questions, rules,
                                                                                             strict=True)]
    assert together == alone and [len(t) for t in together] == [6, 10, 3]
    assert cache.get_seq_length() == 70
    for layer, (pointer, keys) in zip(cache.layers, before, strict=True):
        assert layer.keys.data_ptr() == pointer and torch.equal(layer.keys, keys)
    # the first question alone, prefilled on the cache itself (no fork): the same answer
    fresh, _, _ = prefill_compressed(model, context, press_of(method, geometry, 20, random_scores))
    logits, _ = _forward(model, questions[0][None], fresh)
    assert decode_rows(model, fresh, logits, [rules[0]])[0][0] == together[0]


def test_a_fork_shares_the_compressed_entries_and_has_its_own_tail(model, random_scores):
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(6)
    cache, _, _ = prefill_compressed(model, torch.randint(3, 128, (1, 50)), press_of("headkv", geometry, 12,
                                                                                    random_scores))
    first, second = fork(cache), fork(cache)
    for ours, theirs in zip(first.layers, cache.layers, strict=True):
        assert ours.keys.data_ptr() == theirs.keys.data_ptr() and ours.generated == 0
    all_logits(model, torch.randint(3, 128, (1, 4)), first)
    all_logits(model, torch.randint(3, 128, (1, 2)), second)
    assert first.get_seq_length() == 54 and second.get_seq_length() == 52 and cache.get_seq_length() == 50
    assert all(layer.generated == 0 for layer in cache.layers)
    two = fork(cache)
    two.batch_select_indices(torch.tensor([0, 0]))
    with pytest.raises(HeadscoreError, match="2 compressed contexts for 1 questions"):
        answer_after(model, two, [torch.tensor([5])], StopRule(1))
    with pytest.raises(HeadscoreError, match="one stop rule per question"):
        answer_after(model, cache, [torch.tensor([5]), torch.tensor([6])], [StopRule(1)])


@pytest.mark.parametrize("full", [False, True])
def test_one_question_per_row_of_a_batch_of_contexts_equals_each_alone(model, full, random_scores):
    """A cache of rows (two methods on one context, then contexts of different lengths, left padded): row i
    asked question i answers as its own one-row cache does."""
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(7)
    contexts = [torch.randint(3, 128, (n,)) for n in (48, 61)]
    questions = [torch.randint(3, 128, (n,)) for n in (6, 4)]
    presses = ([press_of("full", geometry, 0, random_scores)] * 2 if full else
               [press_of("snapkv", geometry, 12, random_scores), press_of("headkv", geometry, 20, random_scores)])
    rules = [StopRule(5), StopRule(7)]
    states = [prefill(model, context[None], window=4) for context in contexts]
    alone = [answer_after(model, compress_state(state, press), [question], rule)[0][0]
             for state, press, question, rule in zip(states, presses, questions, rules, strict=True)]
    if not full:  # two methods as rows of one cache of the first context
        one = [answer_after(model, compress_state(states[0], press), [question], rule)[0][0]
               for press, question, rule in zip(presses, questions, rules, strict=True)]
        assert answer_after(model, compress_state(states[0], presses), questions, rules)[0] == one
    padded = compress_rows(list(zip(states, presses, strict=True)))
    got, _ = answer_after(model, padded, questions, rules, lengths=[state.length for state in states])
    assert got == alone


def test_a_query_that_sees_nothing_gets_zeros_not_nan():
    """A left-padding query over an empty segment, its tail hidden: no NaN reaches the other queries."""
    kept = torch.tensor([[0, 3]])
    keys, values = torch.randn(3, 4), torch.randn(3, 4)
    tail = torch.randn(1, 2, 2, 4)
    entries = HeadwiseEntries(keys, values, plan_segments(kept), 2, tail, tail.clone())
    visible = torch.tensor([[False, False], [False, True]])[None, None]  # query 0: padding; query 1 sees itself
    out = headwise_attention(torch.randn(1, 2, 2, 4), entries, 0.5, tail_visible=visible)
    assert torch.isfinite(out).all() and torch.equal(out[0, 0, 0], torch.zeros(4))
