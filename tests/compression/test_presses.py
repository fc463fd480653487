"""Selection at prefill: window scores, pooling, grouping, per-head top-k, AdaKV budgets, presses."""

from __future__ import annotations

import pytest
import torch

from headscore.compression.presses import (
    HeadKVPress,
    adaptive_budgets,
    group_scores,
    kept_positions,
    make_press,
    pool_scores,
    streaming_scores,
    window_scores,
)
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry

GEOMETRY = Geometry(layers=2, query_heads=4, kv_heads=2, head_dim=8)


def reference_window_scores(query, keys, scaling, window):
    """Full n × n attention with repeated KV heads, then the window rows (what the official code does)."""
    heads, n, _ = query.shape
    full_keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)
    logits = query @ full_keys.transpose(1, 2) * scaling
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)[:, n - window:, : n - window].mean(1)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_window_scores_match_full_attention(kv_heads):
    torch.manual_seed(0)
    query, keys = torch.randn(4, 40, 8), torch.randn(kv_heads, 40, 8)
    got = window_scores(query, keys, 0.3, 6)
    assert got.shape == (4, 34)
    torch.testing.assert_close(got, reference_window_scores(query, keys, 0.3, 6))
    # only the window's query rows matter
    torch.testing.assert_close(window_scores(query[:, -6:], keys, 0.3, 6), got)


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_pool_scores_is_a_same_length_max_filter(kernel):
    torch.manual_seed(1)
    scores = torch.rand(3, 20)
    got = pool_scores(scores, kernel)
    half = kernel // 2
    want = torch.stack([scores[:, max(0, i - half): i + half + 1].max(-1).values for i in range(20)], dim=1)
    torch.testing.assert_close(got, want)


def test_group_scores_average_each_kv_group():
    scores = torch.arange(24, dtype=torch.float32).view(6, 4)
    got = group_scores(scores, 2)
    torch.testing.assert_close(got, torch.stack([scores[:3].mean(0), scores[3:].mean(0)]))
    assert group_scores(scores, 6) is scores


def test_kept_positions_are_each_heads_top_budget_plus_window_in_order():
    torch.manual_seed(2)
    scores = torch.rand(5, 30)
    budgets = torch.tensor([0, 1, 7, 30, 50])
    head, position, kept = kept_positions(scores, budgets, 3)
    assert kept.tolist() == [3, 4, 10, 33, 33]
    assert head.tolist() == sum(([h] * k for h, k in enumerate(kept.tolist())), [])
    for h, budget in enumerate(budgets.clamp(max=30).tolist()):
        top = sorted(scores[h].argsort(descending=True)[:budget].tolist())
        assert position[head == h].tolist() == top + [30, 31, 32]
    head, position, kept = kept_positions(scores, torch.zeros(5, dtype=torch.int64), 2)
    assert position.tolist() == [30, 31] * 5 and kept.tolist() == [2] * 5


def test_adaptive_budgets_joint_topk_with_floor():
    torch.manual_seed(3)
    scores = torch.rand(4, 50)
    scores[1] *= 10  # head 1 dominates the joint top-k
    budgets = adaptive_budgets(scores, 20, 0.25)
    floor = 5
    order = scores.flatten().argsort(descending=True)[: (20 - floor) * 4]
    counts = torch.bincount(order // 50, minlength=4)
    assert budgets.tolist() == (counts + floor).clamp(max=50).tolist()
    assert int(budgets.sum()) == 80 and int(budgets.min()) >= floor and int(budgets[1]) > 40
    assert adaptive_budgets(scores, 100, 0.2).tolist() == [50] * 4  # more budget than positions


def test_streaming_keeps_sinks_and_recent():
    scores = streaming_scores(2, 20, 4)
    head, position, _ = kept_positions(scores, torch.tensor([10, 3]), 0)
    assert position[head == 0].tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]
    assert position[head == 1].tolist() == [0, 1, 2]


def test_headkv_press_rejects_another_geometry():
    from headscore.compression.budgets import allocate

    other = Geometry(layers=3, query_heads=4, kv_heads=2, head_dim=8)
    budgets = allocate("uniform", other, 16, window=4)
    with pytest.raises(HeadscoreError, match="budgets are for 3 layers"):
        HeadKVPress(budgets=budgets).check(GEOMETRY)
    HeadKVPress(budgets=allocate("uniform", GEOMETRY, 16, window=4)).check(GEOMETRY)
    with pytest.raises(HeadscoreError, match="needs budgets"):
        HeadKVPress()


def test_make_press_errors():
    with pytest.raises(HeadscoreError, match="unknown method 'nope'"):
        make_press("nope", GEOMETRY)
    with pytest.raises(HeadscoreError, match="needs head scores"):
        make_press("headkv", GEOMETRY)
    with pytest.raises(HeadscoreError, match="must exceed the observation window"):
        make_press("snapkv", GEOMETRY, budget=8, window=8)
    with pytest.raises(HeadscoreError, match="kernel"):
        make_press("snapkv", GEOMETRY, kernel=0)
    with pytest.raises(HeadscoreError, match="alpha"):
        make_press("ada-snapkv", GEOMETRY, alpha=2.0)
