"""evaluate --batch-size: several samples prefilled together (left padded) and decoded as one batch of
(sample, condition) rows give the rows, results and journal of one sample at a time."""

from __future__ import annotations

import pytest
import torch

from headscore.compression.generation import compress_rows, compress_state, decode, prefill, prefill_batch
from headscore.compression.presses import make_press
from headscore.core.decoding import StopRule
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry
from headscore.evaluation.evaluate import (
    Condition,
    EvaluateOptions,
    batch_groups,
    decode_pairs,
    evaluate,
    prefill_groups,
)
from headscore.evaluation.tasks import get_task
from headscore.scoring.head_scores import write_head_scores


@pytest.fixture
def model(tiny_llama, tokenizer):
    """float64, so padding's rounding cannot flip a greedy choice or a top-k selection."""
    return tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=len(tokenizer)).double()


@pytest.fixture
def scores_file(tmp_path, random_scores, model):
    geometry = Geometry.from_config(model.config)
    path = tmp_path / "r.json"
    write_head_scores(path, random_scores(geometry.layers, geometry.query_heads, trials=5, seed=3,
                                          dtype=torch.float64))
    return str(path)


def mixed_samples(tokenizer):
    """Prompts of very different lengths (80 to 260 tokens) and different stop rules and token limits."""
    niah = get_task("niah", lengths=[80, 260], depths=[0, 100], num_needles=1, max_new_tokens=7)
    twohop = get_task("twohop", lengths=[150], samples_per_length=2, max_new_tokens=4)
    samples = niah.samples(tokenizer) + twohop.samples(tokenizer)
    assert len({s.length for s in samples}) >= 3 and len({s.max_new_tokens for s in samples}) == 2
    return samples


def run(model, tokenizer, samples, out, scores_file, **kwargs):
    options = EvaluateOptions(methods=["full", "snapkv", "headkv-r", "pyramidkv", "razor", "razor-k1"],
                              budgets=[12, 400], scores={"r": scores_file}, params={"window": 4})
    result = evaluate(model, tokenizer, samples, out, options=options, model_name="tiny", figures=False, **kwargs)
    return result, (out / "journal.jsonl").read_text(), (out / "results.csv").read_bytes()


def test_batch_sizes_change_no_row_result_or_journal(model, tokenizer, tmp_path, scores_file):
    samples = mixed_samples(tokenizer)
    one, journal, csv = run(model, tokenizer, samples, tmp_path / "one", scores_file)
    for size, decode_batch in ((2, None), (3, None), (3, 4)):
        batched, batched_journal, batched_csv = run(model, tokenizer, samples, tmp_path / f"b{size}-{decode_batch}",
                                                    scores_file, batch_size=size, decode_batch=decode_batch)
        assert batched.rows == one.rows
        assert batched_journal == journal and batched_csv == csv
    assert len({row["prediction"] for row in one.rows}) > 1
    # budget 400 is above every prompt: each row keeps exactly its own real tokens, never padding
    wide = [row for row in one.rows if row["budget"] == 400 and row["method"] == "snapkv"]
    assert len({row["kv_ratio"] for row in wide}) == 1 and wide[0]["kv_ratio"] == pytest.approx(1.0)
    with pytest.raises(HeadscoreError, match="batch-size"):
        run(model, tokenizer, samples, tmp_path / "bad", scores_file, batch_size=0)


def test_resume_with_a_batch_size(model, tokenizer, tmp_path, scores_file):
    """A journal cut after two samples (and half a line) resumes under --batch-size 3: the outputs of an
    uninterrupted one-at-a-time run."""
    samples = mixed_samples(tokenizer)
    one, journal, csv = run(model, tokenizer, samples, tmp_path / "one", scores_file)
    lines = journal.splitlines(keepends=True)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "journal.jsonl").write_text("".join(lines[:3]) + lines[3][:40])
    resumed, resumed_journal, resumed_csv = run(model, tokenizer, samples, tmp_path / "cut", scores_file,
                                                batch_size=3)
    assert resumed.rows == one.rows and resumed_csv == csv
    assert resumed_journal == journal


def test_padded_rows_keep_only_their_prompt_and_decode_as_alone(model, random_scores):
    """Two prompts prefilled as one padded batch, then rows of both under several presses (a head-level one,
    a budget above the prompts) and the full cache: each row's states, kept entries and greedy tokens equal its
    own batch-1 run."""
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(5)
    prompts = [torch.randint(3, 100, (n,)) for n in (23, 40)]
    states = prefill_batch(model, prompts, window=4)
    alone = [prefill(model, prompt, window=4) for prompt in prompts]
    for state, single in zip(states, alone, strict=True):
        assert state.length == single.length
        queries = [layer.queries for layer in state.layers], [layer.queries for layer in single.layers]
        for ours, theirs in zip(state.keys + queries[0], single.keys + queries[1], strict=True):
            torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(state.logits, single.logits)
    scores = random_scores(geometry.layers, geometry.query_heads)
    presses = [make_press("headkv", geometry, budget=10, window=4, beta=1.5, scores=scores),
               make_press("snapkv", geometry, budget=100, window=4)]
    which = [(index, press) for press in presses for index in range(len(states))]
    rows = [(states[index], press) for index, press in which]
    cache = compress_rows(rows)
    assert cache.rows == 4 and cache.compressed[0].width == 40
    for position, (index, press) in enumerate(which):
        assert torch.equal(cache.kept(position), compress_state(alone[index], press).kept())
    assert cache.kept(2).max() == 23 and cache.kept(3).max() == 40  # above the prompt: its tokens, no padding
    full = make_press("full", geometry)
    which += [(index, full) for index in range(len(states))]
    rows += [(state, full) for state in states]
    rules = [get_rule(6 + index % 3) for index in range(len(rows))]
    decoded = decode_pairs(model, rows[:4], rules[:4]) + decode_pairs(model, rows[4:], rules[4:])
    for (index, press), rule, (tokens, report) in zip(which, rules, decoded, strict=True):
        single = alone[index]
        expected, _ = decode(model, compress_state(single, press), single.logits, rule.max_new_tokens)
        assert tokens == expected
        assert report.context_tokens == single.length
        assert report.full_kv_bytes == (2 * geometry.layers * geometry.kv_heads * geometry.head_dim * 8
                                        * (single.length + len(tokens) - 1))


def get_rule(max_new_tokens):
    return StopRule(max_new_tokens, frozenset(), frozenset())


def test_prefill_groups_put_similar_lengths_together():
    assert prefill_groups([100, 40, 90, 60, 20]) == [[0, 2, 3], [1, 4]]
    assert prefill_groups([10]) == [[0]]
    assert prefill_groups([50, 50]) == [[0, 1]]


def test_batch_groups_order_and_cap():
    geometry = Geometry(layers=2, query_heads=4, kv_heads=2, head_dim=16)
    full, snap = make_press("full", geometry), make_press("snapkv", geometry, budget=16)
    plan = [Condition(m, 8, None, p, m) for m, p in [("full", full), ("a", snap), ("b", snap)]]
    assert batch_groups(plan, 2, None) == [[(0, 0), (1, 0)], [(0, 1), (0, 2), (1, 1), (1, 2)]]
    assert batch_groups(plan, 2, 3) == [[(0, 0), (1, 0)], [(0, 1), (0, 2), (1, 1)], [(1, 2)]]


def test_a_study_stage_does_not_depend_on_its_batch_size():
    """reproduce's `evaluate.batch_size` changes how the stage runs, not what it writes: same fingerprint."""
    from pathlib import Path

    from headscore.study.reproduce import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "quick.yaml")
    before = config.fingerprint("evaluate")
    assert config.section("evaluate")["batch_size"] == 1
    config.values["evaluate"]["batch_size"] = 4
    assert config.fingerprint("evaluate") == before
    config.values["evaluate"]["window"] += 1
    assert config.fingerprint("evaluate") != before


@pytest.mark.slow
def test_smollm2_batched_samples_agree_with_one_at_a_time(smollm2, tmp_path, random_scores):
    """The real model (in float64: in float32 padded prefill differs from a lone one by ~3e-5 in keys and
    logits, enough to flip a near-tie greedy choice; bench_batch (d) counts float32 agreement): three samples
    of different lengths prefilled as one padded batch and decoded as one batch of rows give exactly the
    predictions and KV sizes of one sample at a time."""
    import copy

    from headscore.core.model import eos_ids
    from headscore.evaluation.evaluate import evaluate_batch, evaluate_sample, newline_token_ids, plan_conditions

    model, tokenizer = smollm2
    model = copy.deepcopy(model).double()
    geometry = Geometry.from_config(model.config)
    path = tmp_path / "r2.json"
    write_head_scores(path, random_scores(geometry.layers, geometry.query_heads, trials=5, seed=2,
                                          dtype=torch.float64))
    options = EvaluateOptions(methods=["full", "snapkv", "headkv-r2"], budgets=[32, 128], scores={"r2": str(path)})
    conditions = plan_conditions(geometry, options)
    samples = get_task("niah", lengths=[300, 600], depths=[50], num_needles=1, max_new_tokens=12,
                       template="chat").samples(tokenizer)
    samples += get_task("twohop", lengths=[450], samples_per_length=1, max_new_tokens=8,
                        template="chat").samples(tokenizer)
    stops, line_end = eos_ids(model, tokenizer), newline_token_ids(tokenizer)
    batched = evaluate_batch(model, tokenizer, samples, conditions, stops, options.window, line_end)
    for sample, rows in zip(samples, batched, strict=True):
        alone = evaluate_sample(model, tokenizer, sample, conditions, stops, options.window, line_end)
        assert [r["prediction"] for r in rows] == [r["prediction"] for r in alone]
        assert [r["kv_bytes"] for r in rows] == [r["kv_bytes"] for r in alone]
    assert any(row["score"] > 0 for rows in batched for row in rows)
