"""Methods as scorer × allocation: the shared selection, the SnapKV scorer, the allocations, method names,
parameters, and a scorer registered in a test becoming a method."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from headscore.compression.allocation import ALLOCATIONS, adaptive_budgets, allocate
from headscore.compression.cache import RecordedPrompt
from headscore.compression.presses import (
    METHOD_ALIASES,
    PRESSES,
    ScoredPress,
    kept_positions,
    make_press,
    parse_method,
)
from headscore.compression.scorers import (
    SCORERS,
    Scorer,
    ScorerInputs,
    SnapKVScorer,
    group_scores,
    pool_scores,
    register_scorer,
    streaming_scores,
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


def inputs_of(query, keys, window, heads, scaling=None, layer=0):
    return ScorerInputs(keys=keys[None], values=keys[None], queries=query[None], window=window, heads=heads,
                        scaling=scaling, layer=layer)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_snapkv_scores_are_the_window_rows_of_full_attention_pooled_and_grouped(kv_heads):
    torch.manual_seed(0)
    query, keys = torch.randn(4, 40, 8), torch.randn(kv_heads, 40, 8)
    want = group_scores(pool_scores(reference_window_scores(query, keys, 0.3, 6), 7), kv_heads)
    got = inputs_of(query, keys, 6, kv_heads, 0.3).scores(SnapKVScorer())
    assert got.shape == (1, kv_heads, 40)
    torch.testing.assert_close(got[0, :, :34], want)
    # only the window's query rows matter; the window's own scores are never read
    torch.testing.assert_close(inputs_of(query[:, -6:], keys, 6, kv_heads, 0.3).scores(SnapKVScorer()), got)


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_pool_scores_is_a_same_length_max_filter(kernel):
    torch.manual_seed(1)
    scores = torch.rand(3, 20)
    got = pool_scores(scores, kernel)
    half = kernel // 2
    want = torch.stack([scores[:, max(0, i - half): i + half + 1].max(-1).values for i in range(20)], dim=1)
    torch.testing.assert_close(got, want)


def test_group_scores_reduce_each_kv_group():
    scores = torch.arange(24, dtype=torch.float32).view(6, 4)
    torch.testing.assert_close(group_scores(scores, 2), torch.stack([scores[:3].mean(0), scores[3:].mean(0)]))
    torch.testing.assert_close(group_scores(scores, 2, "max"), torch.stack([scores[2], scores[5]]))
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


def test_method_names_parse_into_scorer_and_allocation():
    spec = parse_method("random@headkv-r2")
    assert (spec.scorer, spec.allocation, spec.head_scores) == ("random", "headkv", "r2")
    assert (parse_method("snapkv").scorer, parse_method("snapkv").allocation) == ("snapkv", "uniform")
    assert (parse_method("random").scorer, parse_method("random").allocation) == ("random", "uniform")
    assert (parse_method("pyramidkv").scorer, parse_method("pyramidkv").allocation) == ("snapkv", "pyramid")
    assert (parse_method("ada-snapkv").scorer, parse_method("ada-snapkv").allocation) == ("snapkv", "ada")
    headkv = parse_method("headkv-er")
    assert (headkv.scorer, headkv.allocation, headkv.head_scores) == ("snapkv", "headkv", "er")
    assert parse_method("razor").head_scores == "r" and parse_method("razor-k3").full_heads == 3
    assert parse_method("full").press == "full" and not parse_method("full").takes_budget
    assert not parse_method("razor-k3").takes_budget and parse_method("razor").takes_budget
    for bad, match in (("nope", "scorer 'nope'"), ("snapkv@nope", "allocation 'nope'"),
                       ("snapkv+nope", "modifier '\\+nope'"), ("snapkv@headkv-", "score name")):
        with pytest.raises(HeadscoreError, match=match):
            parse_method(bad)


def test_make_press_errors():
    with pytest.raises(HeadscoreError, match="unknown method 'nope'"):
        make_press("nope", GEOMETRY)
    with pytest.raises(HeadscoreError, match="needs head scores"):
        make_press("headkv", GEOMETRY)
    with pytest.raises(HeadscoreError, match="needs head scores"):
        make_press("random@headkv-r2", GEOMETRY)
    with pytest.raises(HeadscoreError, match="must exceed the observation window"):
        make_press("snapkv", GEOMETRY, budget=8, window=8)
    with pytest.raises(HeadscoreError, match="kernel"):
        make_press("snapkv", GEOMETRY, kernel=0)
    with pytest.raises(HeadscoreError, match="alpha"):
        make_press("ada-snapkv", GEOMETRY, alpha=2.0)
    with pytest.raises(HeadscoreError, match="compare"):
        make_press("streaming@global", GEOMETRY)  # positions ranked per head do not compare across layers
    with pytest.raises(HeadscoreError, match="compression ratio"):
        make_press("snapkv", GEOMETRY, ratio=1.0)


def test_parameters_that_do_not_apply_are_errors_and_settings_are_taken_where_they_apply():
    with pytest.raises(HeadscoreError, match="method snapkv takes no parameter 'alpha'"):
        make_press("snapkv", GEOMETRY, alpha=0.9)
    with pytest.raises(HeadscoreError, match="takes no parameter 'sinks'"):
        make_press("snapkv", GEOMETRY, sinks=99)
    with pytest.raises(HeadscoreError, match="no method takes the parameter 'budgett'"):
        make_press("snapkv", GEOMETRY, budgett=32)
    with pytest.raises(HeadscoreError, match="no method takes the parameter 'budgett'"):
        make_press("snapkv", GEOMETRY, settings={"budgett": 32})
    settings = {"budget": 32, "window": 4, "kernel": 3, "alpha": 0.9, "sinks": 2, "beta": 2.0, "temp": 0.5,
                "pyramid_beta": 3.0}
    snapkv = make_press("snapkv", GEOMETRY, settings=settings)
    assert isinstance(snapkv, ScoredPress) and isinstance(snapkv.scorer, SnapKVScorer)
    assert (snapkv.budget, snapkv.window, snapkv.scorer.kernel) == (32, 4, 3)
    assert make_press("ada-snapkv", GEOMETRY, settings=settings).allocation.alpha == 0.9
    assert make_press("streaming", GEOMETRY, settings=settings).scorer.sinks == 2
    assert make_press("pyramidkv", GEOMETRY, settings=settings).allocation.pyramid_beta == 3.0
    with pytest.raises(HeadscoreError, match="pyramid beta must be"):
        make_press("pyramidkv", GEOMETRY, pyramid_beta=0.5)
    with pytest.raises(HeadscoreError, match="window must be a non-negative integer"):
        make_press("full", GEOMETRY, window=-1)


def test_headkv_press_rejects_another_geometry():
    other = Geometry(layers=3, query_heads=4, kv_heads=2, head_dim=8)
    with pytest.raises(HeadscoreError, match="budgets are for 3 layers"):
        make_press("headkv", GEOMETRY, budgets=allocate("uniform", other, 16, window=4))
    press = make_press("headkv", GEOMETRY, budgets=allocate("uniform", GEOMETRY, 16, window=4))
    assert (press.budget, press.window) == (16, 4)


def test_every_method_names_itself_and_describes_scorer_and_allocation(random_scores):
    scores = random_scores(GEOMETRY.layers, GEOMETRY.query_heads)
    for name in ("snapkv", "streaming", "pyramidkv", "ada-snapkv", "headkv-r2", "random@global", "random@ada"):
        press = make_press(name, GEOMETRY, budget=16, window=4, scores={"r2": scores} if "headkv" in name else None)
        described = press.describe()
        assert press.name == name == described["method"]
        spec = parse_method(name)
        assert described["scorer"] == spec.scorer
        assert described["allocation"] == (f"headkv-{spec.head_scores}" if spec.head_scores else spec.allocation)
    assert list(make_press("razor", GEOMETRY, scores=scores).describe())[:2] == ["method", "window"]


def test_aliases_build_the_same_method_as_their_spelled_names(random_scores):
    scores = random_scores(GEOMETRY.layers, GEOMETRY.query_heads)
    assert set(METHOD_ALIASES) == {"snapkv", "streaming", "pyramidkv", "ada-snapkv", "headkv"}
    torch.manual_seed(4)
    prompt = RecordedPrompt([layer_record(torch.randn(4, 40, 8), torch.randn(2, 40, 8)) for _ in range(2)], 4)
    for alias, spelled in (("snapkv", "snapkv@uniform"), ("pyramidkv", "snapkv@pyramid"),
                           ("ada-snapkv", "snapkv@ada"), ("headkv-r", "snapkv@headkv-r"),
                           ("streaming", "streaming@uniform")):
        presses = [make_press(name, GEOMETRY, settings={"budget": 12, "window": 4, "scores": {"r": scores}})
                   for name in (alias, spelled)]
        kept = [selection(prompt, press) for press in presses]
        assert kept[0] == kept[1], alias


def layer_record(query, keys):
    from headscore.compression.cache import LayerRecord

    return LayerRecord(keys=keys, values=keys.clone(), queries=query)


def selection(prompt, press):
    from headscore.compression.cache import HeadwiseCache

    cache = HeadwiseCache.from_rows(GEOMETRY, [(prompt, press)])
    return [(layer.kept.tolist(), layer.keys.tolist()) for layer in cache.compressed]


def test_fixed_allocations_give_their_budgets_matrix_whatever_the_scorer():
    uniform = allocate("uniform", GEOMETRY, 24, window=4, granularity="kv").matrix
    pyramid = allocate("pyramid", GEOMETRY, 24, window=4, granularity="kv", pyramid_beta=3.0).matrix
    for name, want in (("snapkv", uniform), ("streaming", uniform), ("random", uniform), ("pyramidkv", pyramid),
                       ("random@pyramid", pyramid)):
        press = make_press(name, GEOMETRY, settings={"budget": 24, "window": 4, "pyramid_beta": 3.0})
        got = torch.stack([press.prompt_counts(layer, torch.rand(2, 50), GEOMETRY) for layer in range(2)])
        assert torch.equal(got, want), name


def test_global_allocation_keeps_the_top_scores_of_the_whole_model():
    torch.manual_seed(5)
    scores = [torch.rand(2, 30), torch.rand(2, 30) * 3]  # layer 1's scores dominate
    press = make_press("random@global", GEOMETRY, budget=10, window=4)
    counts = press.layer_counts(scores, GEOMETRY)
    flat = torch.stack(scores).flatten()
    top = flat.argsort(descending=True)[: 6 * 4]
    want = torch.bincount(top // 30, minlength=4).view(2, 2)
    assert torch.equal(torch.stack(counts), want) and int(want.sum()) == 24 and int(want[1].sum()) > 12


def test_a_ratio_keeps_that_fraction_of_every_prompt_per_layer(random_scores):
    press = make_press("snapkv", GEOMETRY, ratio=0.75, window=4)
    assert press.budget_at(400) == 100 and press.budget_at(10) == 5  # at least the window plus one
    scores = random_scores(GEOMETRY.layers, GEOMETRY.query_heads)
    headkv = make_press("headkv-r2", GEOMETRY, ratio=0.5, window=4, scores={"r2": scores})
    counts = torch.stack([headkv.prompt_counts(layer, torch.rand(2, 196), GEOMETRY) for layer in range(2)])
    assert counts.sum() + 4 * counts.numel() == pytest.approx(0.5 * 200 * counts.numel(), abs=counts.numel())


@pytest.fixture
def query_distance_scorer():
    """A scorer written here (keys closest to the window's mean query are kept), registered for one test."""

    @register_scorer("near-query")
    @dataclass(frozen=True)
    class NearQueryScorer(Scorer):
        summary = "keys closest to the window's mean query"
        power: int = 2

        def score(self, inputs: ScorerInputs) -> torch.Tensor:
            groups = inputs.query_heads // inputs.kv_heads
            window_queries = inputs.queries[:, :, -inputs.window:].float()
            mean = window_queries.mean(dim=2).view(inputs.keys.shape[0], inputs.kv_heads, groups, -1).mean(2)
            distance = (inputs.keys.float() - mean[:, :, None]).norm(dim=-1).pow(self.power)
            return -distance.repeat_interleave(inputs.heads // inputs.kv_heads, dim=1)

    yield NearQueryScorer
    del SCORERS["near-query"]


def test_a_registered_scorer_is_a_method_under_every_allocation(query_distance_scorer, tiny_llama):
    from headscore.compression.generation import generate_ids

    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    torch.manual_seed(7)
    ids = torch.randint(3, 128, (1, 40))
    for allocation in ("uniform", "ada", "pyramid"):
        press = make_press(f"near-query@{allocation}", GEOMETRY, budget=12, window=4, power=1)
        assert press.describe()["power"] == 1 and press.describe()["allocation"] == allocation
        _, report = generate_ids(model, ids, press, max_new_tokens=2)
        assert sum(map(sum, report.kept)) == 12 * 4
    with pytest.raises(HeadscoreError, match="takes no parameter 'alpha'"):
        make_press("near-query", GEOMETRY, alpha=0.5)
    assert {"uniform", "pyramid", "ada", "global", "headkv"} <= set(ALLOCATIONS)
    assert "full" in PRESSES and "razor" in PRESSES


def test_every_scorer_and_allocation_describes_itself_in_plain_values(random_scores):
    import json

    from headscore.compression.scorers import MODIFIERS

    scores = {"r2": random_scores(GEOMETRY.layers, GEOMETRY.query_heads)}
    modifiers = ("", *(f"+{m}" for m in MODIFIERS))
    names = [f"{scorer}{modifier}@{allocation}" for scorer in SCORERS for modifier in modifiers
             for allocation in ("uniform", "ada", "headkv-r2")]
    for name in names:
        described = make_press(name, GEOMETRY, settings={"budget": 16, "window": 4, "scores": scores}).describe()
        assert json.loads(json.dumps(described)) == described, name
