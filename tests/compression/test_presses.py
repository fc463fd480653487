"""Selection at prefill: window scores, pooling, grouping, per-head top-k, AdaKV budgets, presses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from headscore.compression.allocation import allocate
from headscore.compression.presses import (
    PRESSES,
    HeadKVPress,
    SnapKVPress,
    StreamingPress,
    adaptive_budgets,
    check_count,
    group_scores,
    kept_positions,
    make_press,
    pool_scores,
    register_press,
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


def test_registry_names_every_method_and_describe_keeps_the_report_layout(random_scores):
    assert list(PRESSES) == ["full", "snapkv", "streaming", "pyramidkv", "ada-snapkv", "headkv", "razor"]
    params = {"budget": 16, "window": 4, "budgets": allocate("uniform", GEOMETRY, 16, window=4),
              "scores": random_scores(GEOMETRY.layers, GEOMETRY.query_heads)}
    described = {name: list(make_press(name, GEOMETRY, **params).describe()) for name in PRESSES}
    assert described == {
        "full": ["method", "window", "kernel"],
        "snapkv": ["method", "window", "kernel", "budget"],
        "streaming": ["method", "window", "kernel", "budget", "sinks"],
        "pyramidkv": ["method", "window", "kernel", "budget", "pyramid_beta"],
        "ada-snapkv": ["method", "window", "kernel", "budget", "alpha"],
        "headkv": ["method", "window", "kernel", "budget", "beta", "granularity", "budget_method", "source_scores"],
        "razor": ["method", "window", "budget", "sinks", "full_heads", "average_length", "full_heads_rule",
                  "compensation", "granularity", "source_scores"],
    }
    assert all(make_press(name, GEOMETRY, **params).name == name for name in PRESSES)


def test_make_press_takes_one_set_of_parameters():
    # parameters of other methods are ignored, as the CLI passes all of them to every method
    press = make_press("snapkv", GEOMETRY, budget=32, window=4, kernel=3, alpha=0.9, sinks=2, beta=2.0, scores=None)
    assert (press.budget, press.window, press.kernel) == (32, 4, 3)
    with pytest.raises(HeadscoreError, match="no method takes the parameter 'budgett'"):
        make_press("snapkv", GEOMETRY, budgett=32)
    # every press checks its own parameters, whichever way it is built
    with pytest.raises(HeadscoreError, match="sinks must be a non-negative integer"):
        StreamingPress(sinks=-1)
    with pytest.raises(HeadscoreError, match="pyramid beta must be"):
        make_press("pyramidkv", GEOMETRY, pyramid_beta=0.5)
    with pytest.raises(HeadscoreError, match="window must be a non-negative integer"):
        make_press("full", GEOMETRY, window=-1)


def test_budget_presses_differ_only_in_their_budgets():
    """snapkv, streaming and pyramidkv budgets are the allocation module's uniform and pyramid matrices."""
    uniform = allocate("uniform", GEOMETRY, 24, window=4, granularity="kv").matrix
    pyramid = allocate("pyramid", GEOMETRY, 24, window=4, granularity="kv", pyramid_beta=3.0).matrix
    for name, want in (("snapkv", uniform), ("streaming", uniform), ("pyramidkv", pyramid)):
        press = make_press(name, GEOMETRY, budget=24, window=4, pyramid_beta=3.0)
        assert torch.equal(torch.stack([press.layer_budgets(layer, torch.rand(2, 50), GEOMETRY)
                                        for layer in range(GEOMETRY.layers)]), want)
        press.check(GEOMETRY)


@pytest.fixture
def recent_press():
    """The example press of docs/compress.md, registered for one test."""

    @register_press("snapkv-recent")
    @dataclass
    class RecentSnapKVPress(SnapKVPress):
        recent: int = 16

        def __post_init__(self) -> None:
            super().__post_init__()
            check_count(self.recent, "recent", 0)

        def head_scores(self, scores: torch.Tensor, heads: int) -> torch.Tensor:
            chosen = super().head_scores(scores, heads).clone()
            chosen[:, max(chosen.shape[1] - self.recent, 0):] = float("inf")
            return chosen

    yield RecentSnapKVPress
    del PRESSES["snapkv-recent"]


def test_a_registered_press_is_a_method(recent_press, tiny_llama):
    from headscore.compression.generation import generate_ids

    with pytest.raises(HeadscoreError, match="recent must be"):
        make_press("snapkv-recent", GEOMETRY, recent=-2)
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    press = make_press("snapkv-recent", GEOMETRY, budget=12, window=4, recent=8, sinks=3)
    assert isinstance(press, recent_press) and press.describe()["recent"] == 8
    torch.manual_seed(7)
    _, report = generate_ids(model, torch.randint(3, 128, (1, 40)), press, max_new_tokens=2)
    assert report.kept == [[12, 12]] * 2
    # the 8 positions before the window are kept by every head: check on the selection itself
    scores = press.head_scores(torch.rand(4, 36), 2)
    head, position, _ = kept_positions(scores, press.layer_budgets(0, scores, GEOMETRY), 4)
    assert all(set(range(28, 36)) <= set(position[head == h].tolist()) for h in range(2))
