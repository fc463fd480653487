"""The authors' compression behaviour (docs/fidelity.md, items 1, 7, 8, 9, 11), each against a plain
re-implementation of their step written here (HeadKV `headkv/snapkv_utils.py` at 0862a09, KVCache-Factory
`pyramidkv/pyramidkv_utils.py` `PyramidKVCluster`)."""

from __future__ import annotations

import pytest
import torch

from headscore.compression.allocation import adaptive_budgets_official, pyramid_official_budgets
from headscore.compression.cache import select_entries
from headscore.compression.presses import make_press
from headscore.compression.scorers import ScorerInputs
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry

GQA = Geometry(layers=4, query_heads=8, kv_heads=2, head_dim=8)


def authors_pyramid(layers, base_capacity, window, q_len, layer, pyram_beta=20, kvcache_factory=False):
    """(keys kept before the window, or None: layer uncompressed), HeadKV SnapKVCluster L130–168 /
    KVCache-Factory PyramidKVCluster.update_kv, line for line in Python integers."""
    min_num = base_capacity // pyram_beta
    max_num = base_capacity * 2 - min_num
    if max_num >= q_len - window:
        max_num = q_len - window
        min_num = base_capacity * 2 - max_num
    steps = (max_num - min_num) // (layers - 1)
    capacity = max_num - layer * steps
    if kvcache_factory:
        if q_len < base_capacity + window:
            return None
        return base_capacity if q_len < base_capacity * 2 else capacity
    if q_len < capacity + window:
        return None
    return capacity


@pytest.mark.parametrize("schedule", ["headkv", "kvcache-factory"])
@pytest.mark.parametrize("budget", [16, 40, 64, 128, 1000])
@pytest.mark.parametrize("q_len", [20, 60, 100, 137, 300, 4000])
def test_pyramid_schedule_is_the_authors(schedule, budget, q_len):
    window, layers = 8, 32
    budgets, whole = pyramid_official_budgets(layers, budget - window, 20.0, q_len, window, schedule)
    for layer in range(layers):
        want = authors_pyramid(layers, budget - window, window, q_len, layer,
                               kvcache_factory=schedule == "kvcache-factory")
        assert (None if whole[layer] else int(budgets[layer])) == want


def test_pyramid_press_official_schedule_at_prefill():
    press = make_press("pyramidkv", GQA, budget=24, window=4, pyramid_beta=4.0, pyramid_schedule="headkv",
                       granularity="query")
    m = 200
    got = [press.prompt_counts(layer, torch.rand(8, m), GQA) for layer in range(4)]
    want = [authors_pyramid(4, 20, 4, m + 4, layer, pyram_beta=4) for layer in range(4)]
    assert [int(g[0]) for g in got] == want and all(g.shape == (8,) for g in got)
    # the official total exceeds the uniform one: whole-number steps leave the low layers higher
    assert sum(want) >= 4 * 20
    with pytest.raises(HeadscoreError, match="pyramid schedule"):
        make_press("pyramidkv", GQA, pyramid_schedule="steps")


def authors_ada(attn_score, base_capacity, floor_ratio=0.2):
    """HeadKV AdaptiveSnapKVCluster.update_kv L262–276 with normalize=True, skip=0, bsz=1."""
    num_heads, length = attn_score.shape
    floor_capacity = int(base_capacity * floor_ratio)
    sorted_attn_score, _ = attn_score[None].sort(dim=-1, descending=True)
    ratio_weight = (sorted_attn_score[..., :base_capacity].sum(dim=-1, keepdim=True)
                    / sorted_attn_score.sum(dim=-1, keepdim=True))
    adaptive = (sorted_attn_score * ratio_weight).reshape(1, length * num_heads)
    sorted_indices = torch.topk(adaptive, k=num_heads * base_capacity, dim=-1).indices // length
    capacity = torch.zeros((1, num_heads), dtype=sorted_indices.dtype)
    capacity.scatter_add_(-1, sorted_indices, torch.ones_like(sorted_indices))
    return torch.round(capacity * (1 - floor_ratio) + floor_capacity).int()[0]


@pytest.mark.parametrize("seed", range(6))
def test_ada_official_allocation_is_the_authors(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(8, 300, generator=generator) ** 4  # peaked, like attention
    scores = scores / scores.sum(-1, keepdim=True)
    for budget in (10, 56, 120):
        assert torch.equal(adaptive_budgets_official(scores, budget, 0.2), authors_ada(scores, budget).long())
    press = make_press("ada-snapkv", GQA, budget=64, window=8, ada_allocation="official")
    assert torch.equal(press.prompt_counts(0, scores, GQA), authors_ada(scores, 56).long())


def test_every_press_takes_query_granularity():
    """The authors repeat the KV heads first: every method keeps one selection per query head."""
    torch.manual_seed(0)
    query, keys = torch.randn(1, 8, 4, 16), torch.randn(1, 2, 104, 16)
    for name in ("snapkv", "streaming", "pyramidkv", "ada-snapkv"):
        kv = make_press(name, GQA, budget=24, window=4)
        query_press = make_press(name, GQA, budget=24, window=4, granularity="query")
        assert kv.cache_heads(GQA) == 2 and query_press.cache_heads(GQA) == 8
        inputs = ScorerInputs(keys=keys, values=keys, queries=query, window=4, heads=8, layer=1)
        head, position, kept = select_entries(inputs, query_press, GQA)
        assert kept.shape == (8,)
        if name == "snapkv":  # per query head: each head's own top-k of its own (pooled) scores
            scores = inputs.window_attention()[0, :, :, :100].mean(dim=1)
            pooled = torch.nn.functional.max_pool1d(scores[:, None], 7, stride=1, padding=3)[:, 0]
            for h in range(8):
                want = sorted(pooled[h].topk(20).indices.tolist()) + list(range(100, 104))
                assert position[head == h].tolist() == want
    assert make_press("snapkv", GQA, granularity="query").describe()["granularity"] == "query"


def authors_keeps_whole(base_capacity, q_len, window):
    """HeadKV ReasonSnapKVCluster / AdaptiveSnapKVCluster: `if self.base_capacity > attn_score.size(-1)`."""
    return base_capacity > q_len - window


@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "headkv"])
def test_budget_beyond_the_prompt_keeps_the_layer_whole(name):
    from headscore.compression.allocation import allocate
    from headscore.scoring.head_scores import HeadScores

    scores = HeadScores.from_tensor(torch.rand(3, 4, 8))
    budgets = allocate("headkv", GQA, 128, window=8, beta=1.01, scores=scores, granularity="query")
    for m in (50, 119, 120, 121, 300):
        window_scores = torch.rand(8, m)
        settings = {"budget": 128, "window": 8, "granularity": "query",
                    "budgets": budgets if name == "headkv" else None}
        clamp = make_press(name, GQA, settings=settings)
        keep = make_press(name, GQA, settings=settings, beyond_prompt="keep")
        kept = keep.prompt_counts(2, window_scores, GQA)
        if authors_keeps_whole(120, m + 8, 8):
            assert kept.tolist() == [m] * 8
            clamped = clamp.prompt_counts(2, window_scores, GQA).clamp(max=m)
            if name == "headkv" and m == 119:  # clamping alone leaves the low-budget heads compressed
                assert clamped.min() < m
        else:
            assert torch.equal(kept, clamp.prompt_counts(2, window_scores, GQA))
    with pytest.raises(HeadscoreError, match="beyond-prompt"):
        make_press("snapkv", GQA, beyond_prompt="whole")


def test_score_dtype_breaks_ties_as_fp16_weights_do():
    """The authors round the softmax to fp16 (`.to(query_states.dtype)`), average, pool and take the top-k in
    fp16. With window rows exact in fp16, rounding the float32 mean is that same step."""
    generator = torch.Generator().manual_seed(3)
    rows = (torch.rand(8, 4, 64, generator=generator) / 40).half()  # [heads, window rows, m]
    rows[:, :, 10] = rows[:, :, 11] + torch.tensor(1e-6).half() * 0  # exact ties after rounding
    theirs = torch.nn.functional.max_pool1d(rows.mean(dim=1), 7, stride=1, padding=3)  # fp16 all along
    press = make_press("snapkv", GQA, budget=24, window=4, granularity="query", score_dtype="float16")
    attention = torch.cat([rows.float(), torch.zeros(8, 4, 4)], dim=2)[None]  # the window's own columns unread
    inputs = ScorerInputs(keys=torch.zeros(1, 2, 68, 4), values=torch.zeros(1, 2, 68, 4),
                          queries=torch.zeros(1, 8, 4, 4), window=4, heads=8, _window_attention=attention)
    ours = press.selection_scores(inputs)
    assert ours.dtype == torch.float16 and torch.equal(ours, theirs)
    assert torch.equal(ours.topk(20).indices, theirs.topk(20).indices)
    with pytest.raises(HeadscoreError, match="score dtype"):
        make_press("snapkv", GQA, score_dtype="int8")


@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "pyramidkv"])
def test_the_authors_setup_generates_end_to_end(tiny_llama, name):
    """Query granularity on a GQA model, the authors' rules, and a budget beyond the prompt kept whole: the
    cache holds one full copy per query head and generates exactly what the full cache does."""
    from headscore.compression.generation import generate_ids
    from headscore.compression.presses import FullPress

    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(11)
    ids = torch.randint(3, 128, (1, 40))
    full, _ = generate_ids(model, ids, FullPress(), max_new_tokens=6)
    authors = {"granularity": "query", "pyramid_schedule": "headkv", "ada_allocation": "official",
               "score_dtype": "float16"}
    press = make_press(name, geometry, settings=authors, budget=64, window=4, beyond_prompt="keep")
    tokens, report = generate_ids(model, ids, press, max_new_tokens=6)
    assert tokens == full and report.kept == [[40] * 4] * 2  # every query head keeps the whole prompt
    small = make_press(name, geometry, settings=authors, budget=12, window=4)
    _, report = generate_ids(model, ids, small, max_new_tokens=2)
    assert len(report.kept[0]) == 4 and sum(map(sum, report.kept)) < 2 * 4 * 40
