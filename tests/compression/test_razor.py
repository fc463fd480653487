"""The razor press (RazorAttention as the HeadKV authors ran it): kept positions against a plain construction,
the equal-total-KV rule against the authors' worked example, stored bytes, and the compensation token."""

from __future__ import annotations

import math

import pytest
import torch

from headscore.compression.attention import HeadwiseEntries, headwise_attention
from headscore.compression.cache import HeadwiseCache, select_entries
from headscore.compression.generation import generate_ids
from headscore.compression.presses import RazorPress, equal_kv_full_heads, make_press
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry

GEOMETRY = Geometry(layers=3, query_heads=4, kv_heads=2, head_dim=8)


def test_equal_total_kv_rule_gives_the_authors_k():
    # the HeadKV authors: (B − 8 − 4) · L · H entries over full heads of the 8,640-token average -> k ≈ 14
    assert equal_kv_full_heads(128, 32 * 32, 8640, sinks=4, window=8) == 14
    for budget, heads, length in [(128, 1024, 8640), (1024, 1024, 8640), (64, 270, 3000), (20, 6, 50)]:
        exact = (budget - 12) * heads / length
        assert equal_kv_full_heads(budget, heads, length, 4, 8) == min(math.floor(exact + 0.5), heads)
    assert equal_kv_full_heads(12, 100, 500, 4, 8) == 0  # nothing beyond sinks + window
    assert equal_kv_full_heads(10_000, 100, 50, 4, 8) == 100  # at most every head


def plain_razor_positions(importance, k, length, sinks, window):
    """Per (layer, head): every position for the k highest heads over all layers (ties: lower flat index
    first), else the first `sinks` and the last `window` positions."""
    flat = sorted(range(importance.numel()), key=lambda i: (-float(importance.flatten()[i]), i))
    full = set(flat[:k])
    heads = importance.shape[1]
    return {(layer, head): list(range(length)) if layer * heads + head in full
            else list(range(min(sinks, length - window))) + list(range(length - window, length))
            for layer in range(importance.shape[0]) for head in range(heads)}


@pytest.mark.parametrize("granularity", ["kv", "query"])
@pytest.mark.parametrize("full_heads", [None, 0, 3, 6])
def test_kept_positions_match_a_plain_construction(random_scores, recorded, granularity, full_heads):
    scores = random_scores(GEOMETRY.layers, GEOMETRY.query_heads, trials=4, seed=7)
    scores.trials[1][2] = [0.0] * 4  # a zero and a tie do not break the order
    scores.trials[2][0] = list(scores.trials[0][3])
    press = make_press("razor", GEOMETRY, budget=24, window=4, sinks=4, scores=scores, granularity=granularity,
                       full_heads=full_heads)
    length = 60
    mean = scores.mean()
    importance = mean if granularity == "query" else mean.view(3, 2, 2).sum(-1)
    k = full_heads if full_heads is not None else math.floor((24 - 8) * importance.numel() / length + 0.5)
    want = plain_razor_positions(importance, k, length, 4, 4)
    heads = importance.shape[1]
    for layer in range(GEOMETRY.layers):
        prompt = recorded(torch.randn(GEOMETRY.kv_heads, length, 8), torch.randn(GEOMETRY.kv_heads, length, 8),
                          GEOMETRY.query_heads, 4)
        inputs = prompt.layer_inputs(0, press.cache_heads(GEOMETRY))
        inputs.layer = layer
        head, position, kept = select_entries(inputs, press, GEOMETRY)
        for h in range(heads):
            assert position[head == h].tolist() == want[(layer, h)], (layer, h)
    assert press.describe_at(length)["full_heads"] == k


def test_stored_bytes_are_full_prompts_plus_twelve_entries(tiny_llama, random_scores):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(3)
    n = 90
    ids = torch.randint(3, 128, (1, n))
    scores = random_scores(2, 4, seed=1)
    for k in (0, 1, 3):
        press = make_press("razor", geometry, budget=64, window=8, scores=scores, full_heads=k)
        tokens, report = generate_ids(model, ids, press, max_new_tokens=4)
        kept = torch.tensor(report.kept)
        assert sorted(kept.flatten().tolist()) == [12] * (4 - k) + [n] * k
        tail = geometry.layers * geometry.kv_heads * (len(tokens) - 1)
        assert report.kv_bytes == (k * n + (4 - k) * 12 + tail) * geometry.head_dim * 2 * 4
        assert report.press["full_heads"] == k
    # the rule: (64 − 12) · 4 heads / 90 tokens = 2.3 -> 2 full heads
    tokens, report = generate_ids(model, ids, make_press("razor", geometry, budget=64, window=8, scores=scores),
                                  max_new_tokens=2)
    assert report.press["full_heads"] == 2 and "equal total KV" in report.press["full_heads_rule"]
    assert sorted(torch.tensor(report.kept).flatten().tolist()) == [12, 12, n, n]


def attend(query, layer, tail_keys, tail_values):
    """Decode attention of `query` `[q_heads, 1, d]` over one compressed row of `layer` and a tail
    `[1, kv_heads, t, d]`."""
    entries = HeadwiseEntries(layer.keys, layer.values, layer.buckets, layer.heads, tail_keys, tail_values,
                              layer.bias)
    return headwise_attention(query[None], entries, 0.3)[0]


def test_compensation_token_is_exact_when_the_dropped_tokens_agree(random_scores, recorded, kernel):
    """A compressed head's compensation entry (mean key and value, weighted by the dropped count) gives exactly
    full attention when every dropped token has the same key and value."""
    torch.manual_seed(4)
    geometry = Geometry(layers=1, query_heads=4, kv_heads=2, head_dim=8)
    n, sinks, window = 40, 4, 8
    keys, values = torch.randn(2, n, 8), torch.randn(2, n, 8)
    keys[:, sinks:n - window] = torch.randn(2, 1, 8)
    values[:, sinks:n - window] = torch.randn(2, 1, 8)
    scores = random_scores(1, 4, seed=2)
    press = make_press("razor", geometry, budget=16, window=window, sinks=sinks, scores=scores, full_heads=1,
                       compensation=True)
    cache = HeadwiseCache.from_prefill(geometry, press, recorded(keys, values, 4, window))
    layer = cache.layers[0]
    assert sorted(layer.kept[0].tolist()) == [sinks + window + 1, n]  # one summary entry on the compressed head
    query = torch.randn(4, 1, 8)
    tail_key, tail_value = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)  # the query's own generated token
    got = attend(query, layer, tail_key, tail_value)
    every_key = torch.cat([keys, tail_key[0]], 1).repeat_interleave(2, 0)
    every_value = torch.cat([values, tail_value[0]], 1).repeat_interleave(2, 0)
    full = torch.softmax(query @ every_key.transpose(1, 2) * 0.3, -1) @ every_value
    torch.testing.assert_close(got, full)
    without = make_press("razor", geometry, budget=16, window=window, sinks=sinks, scores=scores, full_heads=1)
    plain = HeadwiseCache.from_prefill(geometry, without, recorded(keys, values, 4, window)).layers[0]
    assert plain.bias is None and not torch.allclose(attend(query, plain, tail_key, tail_value), full)


def test_compensation_entry_is_the_mean_of_the_dropped_tokens(random_scores, recorded):
    torch.manual_seed(5)
    geometry = Geometry(layers=1, query_heads=2, kv_heads=2, head_dim=4)
    keys, values = torch.randn(2, 30, 4), torch.randn(2, 30, 4)
    press = make_press("razor", geometry, budget=20, window=4, sinks=2, scores=random_scores(1, 2), full_heads=0,
                       compensation=True)
    layer = HeadwiseCache.from_prefill(geometry, press, recorded(keys, values, 2, 4)).layers[0]
    head = torch.repeat_interleave(torch.arange(2), layer.kept[0])
    for h in range(2):
        own = head == h
        kept_keys, bias = layer.keys[own], layer.bias[own]
        summary = bias != 0
        assert int(summary.sum()) == 1 and float(bias[summary]) == pytest.approx(math.log(30 - 4 - 2))
        torch.testing.assert_close(kept_keys[summary][0], keys[h, 2:26].mean(0))
        torch.testing.assert_close(layer.values[own][summary][0], values[h, 2:26].mean(0))
        torch.testing.assert_close(kept_keys[~summary], torch.cat([keys[h, :2], keys[h, 26:]]))


def test_razor_errors(random_scores):
    with pytest.raises(HeadscoreError, match="razor needs head scores"):
        make_press("razor", GEOMETRY)
    with pytest.raises(HeadscoreError, match="full heads"):
        make_press("razor", GEOMETRY, scores=random_scores(3, 4), full_heads=7)  # 3 layers × 2 KV heads
    with pytest.raises(HeadscoreError, match="head scores are for 2 layers"):
        make_press("razor", GEOMETRY, scores=random_scores(2, 4))
    with pytest.raises(HeadscoreError, match="full heads \\(k\\) must be a non-negative integer"):
        RazorPress(scores=random_scores(3, 4), full_heads=-1)


@pytest.mark.parametrize("args,message", [
    ([], "razor needs head scores"),
    (["--full-heads", "-2"], "full heads (k) must be a non-negative integer"),
])
def test_cli_razor_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    import sys

    from headscore.cli import main

    context = tmp_path / "doc.txt"
    context.write_text("Some text.", encoding="utf-8")
    scores = [] if not args else ["--scores", str(tmp_path / "s.json")]
    if scores:
        from headscore.scoring.head_scores import HeadScores, write_head_scores
        write_head_scores(scores[1], HeadScores.from_tensor(torch.rand(2, 30, 9)))
    monkeypatch.setattr(sys, "argv", ["headscore", "compress", "--context-file", str(context), "--question", "What?",
                                      "--method", "razor", *scores, *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("headscore: error: ") and message in err and "\n" not in err
