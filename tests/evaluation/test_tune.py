"""tune: split determinism, the tie rule, and picking the known best β on a constructed case (tiny model)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import headscore.evaluation.evaluate as evaluate_module
from headscore.compression.allocation import allocate
from headscore.compression.budgets_file import read_budget_sweep, read_budgets
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry
from headscore.evaluation.tasks import get_task
from headscore.evaluation.tune import TuneOptions, choose_beta, split_samples, tune
from headscore.scoring.head_scores import HeadScores, read_head_scores, write_head_scores


def fake_samples(counts: dict[str, int]) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=f"{task}-{i}", task=task) for task, n in counts.items() for i in range(n)]


def test_split_is_deterministic_and_stratified():
    samples = fake_samples({"niah": 9, "twohop": 4, "multikey": 1})
    val, test = split_samples(samples, 0.5, seed=3)
    ids = lambda group: [s.id for s in group]  # noqa: E731
    assert sorted(ids(val) + ids(test)) == sorted(ids(samples)) and not set(ids(val)) & set(ids(test))
    assert ids(val) == [s.id for s in samples if s.id in set(ids(val))]  # input order kept
    per_task = {task: sum(s.task == task for s in val) for task in ("niah", "twohop", "multikey")}
    assert per_task == {"niah": 5, "twohop": 2, "multikey": 1}  # round(0.5 n), one-sample task to validation
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    assert set(ids(split_samples(shuffled, 0.5, seed=3)[0])) == set(ids(val))  # depends on ids, not order
    assert ids(split_samples(samples, 0.5, seed=3)[0]) == ids(val)
    assert any(set(ids(split_samples(samples, 0.5, seed=s)[0])) != set(ids(val)) for s in range(4, 8))
    small, _ = split_samples(fake_samples({"niah": 5}), 0.01, seed=0)
    assert len(small) == 1  # at least one sample on each side
    with pytest.raises(HeadscoreError, match="empty test split"):
        split_samples(fake_samples({"niah": 1}), 0.5, seed=0)


def test_ties_go_to_the_pool_closest_to_the_default():
    budget, window, default = 64, 8, 1.01
    scores = {1.005: 0.5, 1.01: 0.4, 1.1: 0.5, 2.0: 0.5, 1.5: 0.5}
    inner = budget - window
    tied = [b for b, v in scores.items() if v == max(scores.values())]
    expected = min(tied, key=lambda b: abs(int(inner // b) - int(inner // default)))
    assert choose_beta(scores, budget, window, default) == expected
    assert choose_beta({1.2: 0.7, 2.0: 0.9}, budget, window, default) == 2.0  # a clear best wins
    # equal pools (56 // 1.005 == 56 // 1.01): the β closer to the default on a log scale
    assert choose_beta({1.005: 0.5, 1.02: 0.5}, budget, window, default) == 1.005


def test_tune_picks_the_known_best_beta(tiny_llama, tokenizer, tmp_path, monkeypatch, no_plots):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=len(tokenizer))
    geometry = Geometry.from_config(model.config)
    per_trial = torch.rand(6, geometry.layers, geometry.query_heads, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64)
    write_head_scores(tmp_path / "r2.json", HeadScores.from_tensor(per_trial))
    samples = get_task("niah", lengths=[160, 220], depths=[0, 50, 100], num_needles=1,
                       max_new_tokens=4).samples(tokenizer)
    best = {16: 1.2, 32: 2.0}  # the constructed case: this β scores 1 on every sample, any other β 0.25
    calls = []
    real = evaluate_module.evaluate_sample

    def scored(model, tokenizer, sample, conditions, *args, **kwargs):
        calls.append(sample.id)
        rows = real(model, tokenizer, sample, conditions, *args, **kwargs)
        for row in rows:
            if row["beta"] is not None:
                row["score"] = 1.0 if row["beta"] == best[row["budget"]] else 0.25
        return rows

    monkeypatch.setattr(evaluate_module, "evaluate_sample", scored)
    write_head_scores(tmp_path / "r.json", HeadScores.from_tensor(per_trial.flip(0)))
    options = TuneOptions(methods=["headkv-r2"], budgets=[16, 32],
                          scores={"r2": str(tmp_path / "r2.json"), "r": str(tmp_path / "r.json")},
                          betas=[1.01, 1.2, 2.0], val_fraction=0.5, seed=1,
                          baselines=["snapkv", "ada-snapkv", "razor-k1"], params={"compensation": True})
    out = tmp_path / "tune"
    result = tune(model, tokenizer, samples, out, options=options, model_name="tiny")
    val, test = split_samples(samples, 0.5, seed=1)
    assert (result.val_samples, result.test_samples) == (len(val), len(test))
    chosen = {r["budget"]: r["beta"] for r in result.validation if r["chosen"]}
    assert chosen == best
    # the tuned budgets file: one entry per budget, the chosen β, the rule; equal to a plain allocate
    entries = read_budget_sweep(out / "tuned_budgets.json", geometry)
    assert [(b.budget, b.beta) for b in entries] == [(16, 1.2), (32, 2.0)]
    scores = read_head_scores(tmp_path / "r2.json")
    for entry in entries:
        single = read_budgets(out / f"tuned_budgets_headkv-r2_B{entry.budget}.json", geometry)
        plain = allocate("headkv", geometry, entry.budget, beta=best[entry.budget], scores=scores)
        assert torch.equal(single.matrix, plain.matrix) and torch.equal(entry.matrix, plain.matrix)
        assert single.tuning["chosen_beta"] == best[entry.budget]
        assert single.tuning["validation_samples"] == len(val)
        assert single.tuning["validation_scores"][f"{best[entry.budget]:g}"] == 1.0
    # validation ran only validation samples over the whole grid; test only test samples
    val_rows = pd.read_csv(out / "validation" / "results.csv")
    assert set(val_rows["sample"]) == {s.id for s in val}
    assert sorted(val_rows["beta"].dropna().unique()) == [1.01, 1.2, 2.0]
    test_rows = pd.read_csv(out / "test" / "results.csv")
    assert set(test_rows["sample"]) == {s.id for s in test}
    assert set(test_rows["method"]) == {"snapkv", "ada-snapkv", "razor-k1", "headkv-r2 default", "headkv-r2 tuned"}
    razor = test_rows[test_rows["method"] == "razor-k1"]  # a baseline without a budget: once per sample
    assert len(razor) == len(test) and razor["budget"].isna().all() and razor["compensation"].all()
    # the held-out comparison: tuned scores 1, default 0.25
    for row in result.comparison:
        assert (row["test_tuned"], row["test_default"]) == (1.0, 0.25)
        assert row["test_gain"] == pytest.approx(0.75)
        plain = test_rows[(test_rows["method"] == "snapkv") & (test_rows["budget"] == row["budget"])]["score"].mean()
        assert row["test[snapkv]"] == pytest.approx(plain)
        assert row["test[razor-k1]"] == pytest.approx(razor["score"].mean())
    for name in ("validation.csv", "validation_vs_beta.png", "comparison.csv", "tune.md", "metadata.json"):
        assert (out / name).is_file()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["split"]["validation"] == [s.id for s in val]
    # rerun: both phases resume from their journals, no sample is run again
    calls.clear()
    again = tune(model, tokenizer, samples, out, options=options, model_name="tiny")
    assert calls == [] and again.comparison == result.comparison


def test_bad_tune_options(tmp_path, headscore_cli):
    with pytest.raises(HeadscoreError, match="no β to tune"):
        TuneOptions(methods=["snapkv"]).check()
    with pytest.raises(HeadscoreError, match="needs --scores r2=FILE"):
        TuneOptions().check()
    scores = {"r2": "x.json"}
    with pytest.raises(HeadscoreError, match="val-fraction"):
        TuneOptions(scores=scores, val_fraction=1.0).check()
    with pytest.raises(HeadscoreError, match="beta must be"):
        TuneOptions(scores=scores, betas=[1.01, 0.9]).check()
    with pytest.raises(HeadscoreError, match="unknown baseline 'headkv-r'"):
        TuneOptions(scores=scores, baselines=["headkv-r"]).check()
    with pytest.raises(HeadscoreError, match="unknown baseline 'razor-k05'.*razor-kN"):
        TuneOptions(scores=scores, baselines=["razor-k05"]).check()
    TuneOptions(scores=scores, baselines=["full", "razor-k3"]).check()  # methods without a β
    run = headscore_cli("tune", "--scores", f"r2={tmp_path / 'absent.json'}", "--val-fraction", "1.5", "--out",
                        tmp_path / "t")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "val-fraction" in run.stderr
    assert not (tmp_path / "t").exists()
