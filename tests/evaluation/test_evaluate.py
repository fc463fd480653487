"""evaluate: prefill once, compress many == separate runs; outputs, resume and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from headscore.compression.allocation import allocate
from headscore.compression.generation import compress_generate, generate_ids
from headscore.compression.presses import make_press
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry, eos_ids
from headscore.core.prompts import encode_prompt, render_prompt
from headscore.evaluation.evaluate import (
    Condition,
    EvaluateOptions,
    decode_groups,
    evaluate,
    evaluate_sample,
    newline_token_ids,
    plan_conditions,
    summary_markdown,
    summary_table,
)
from headscore.evaluation.tasks import get_task
from headscore.scoring.head_scores import HeadScores, read_head_scores, write_head_scores


@pytest.fixture
def model(tiny_llama, tokenizer):
    return tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=len(tokenizer))


@pytest.fixture
def score_files(tmp_path, random_scores):
    """Factory: random retrieval and r2 head-score files for `geometry`: {"r": path, "r2": path} (the names of
    headkv-r and headkv-r2)."""

    def make(geometry: Geometry) -> dict[str, str]:
        paths = {}
        for seed, kind in enumerate(("r", "r2"), start=3):
            paths[kind] = str(tmp_path / f"{kind}-{geometry.layers}.json")
            write_head_scores(paths[kind], random_scores(geometry.layers, geometry.query_heads, trials=5, seed=seed,
                                                         dtype=torch.float64))
        return paths

    return make


def small_samples(tokenizer):
    niah = get_task("niah", lengths=[160, 220], depths=[0, 50, 100], num_needles=1, max_new_tokens=6)
    twohop = get_task("twohop", lengths=[200], samples_per_length=1, max_new_tokens=6)
    return niah.samples(tokenizer) + twohop.samples(tokenizer)


def test_prefill_once_equals_separate_runs(model, tokenizer, score_files):
    geometry = Geometry.from_config(model.config)
    options = EvaluateOptions(methods=["full", "streaming", "snapkv", "pyramidkv", "ada-snapkv", "headkv-r",
                                       "headkv-r2"], budgets=[16, 48], scores=score_files(geometry))
    conditions = plan_conditions(geometry, options)
    assert len(conditions) == 1 + 6 * 2
    sweep = plan_conditions(geometry, EvaluateOptions(methods=["snapkv", "headkv-r2"], budgets=[16], betas=[1.01, 2],
                                                     scores=options.scores))
    assert [c.label for c in sweep] == ["snapkv", "headkv-r2 (β=1.01)", "headkv-r2 (β=2)"]
    matrices = [c.press.budgets_for(geometry).matrix for c in sweep[1:]]
    spread = [matrix.max() - matrix.min() for matrix in matrices]
    assert spread[0] > spread[1]  # a larger beta shares a smaller pool
    sample = small_samples(tokenizer)[1]
    sample.max_new_tokens = 5
    stops = eos_ids(model, tokenizer)  # no newline stop: more decode steps to compare
    rows = evaluate_sample(model, tokenizer, sample, conditions, stops, options.window)
    ids = torch.tensor([encode_prompt(tokenizer, sample.prompt, sample.template)["input_ids"]])
    outputs = set()
    for condition, row in zip(conditions, rows, strict=True):
        tokens, report = generate_ids(model, ids, condition.press, max_new_tokens=5, eos=stops)
        assert row["prediction"] == tokenizer.decode(tokens, skip_special_tokens=True).strip(), condition
        assert row["kv_bytes"] == report.kv_bytes
        outputs.add((row["method"], row["budget"], row["kv_bytes"]))
    assert len(outputs) == len(conditions)


def test_evaluate_writes_outputs(model, tokenizer, tmp_path, score_files):
    geometry = Geometry.from_config(model.config)
    options = EvaluateOptions(methods=["full", "snapkv", "headkv-r2"], budgets=[16, 32],
                              scores=score_files(geometry))
    samples = small_samples(tokenizer)
    out = tmp_path / "run"
    result = evaluate(model, tokenizer, samples, out, options=options, model_name="tiny")
    assert len(result.rows) == len(samples) * (1 + 2 * 2)
    assert {p.name for p in out.iterdir()} >= {"results.csv", "summary.md", "metadata.json", "score_vs_kv.png",
                                              "niah_full_full.png", "niah_snapkv_16.png", "niah_headkv-r2_32.png"}
    summary = (out / "summary.md").read_text()
    assert "| headkv-r2 | 32 |" in summary and "niah" in summary and "twohop" in summary
    means = {(e["method"], e["budget"]): e["score"] for e in result.summary}
    by_hand = [r["score"] for r in result.rows if r["method"] == "snapkv" and r["budget"] == 16]
    assert means[("snapkv", 16)] == pytest.approx(sum(by_hand) / len(by_hand))
    assert all(0 < r["kv_ratio"] < 1.0 for r in result.rows if r["method"] != "full")
    assert all(r["kv_ratio"] == 1.0 for r in result.rows if r["method"] == "full")
    # rerunning the finished command computes nothing and rewrites the same results
    before = (out / "results.csv").read_bytes()
    calls = []
    evaluate(model, tokenizer, samples, out, options=options, model_name="tiny",
             progress=lambda done, total: calls.append((done, total)))
    assert calls == [(len(samples), len(samples))]
    assert (out / "results.csv").read_bytes() == before
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["geometry"]["query_heads"] == 4 and len(metadata["conditions"]) == 5


def test_a_task_score_override_scores_its_samples(model, tokenizer, tmp_path):
    """`Task.score` is what scores a prediction: a task that overrides it gets its own scores in the results."""
    from dataclasses import dataclass

    from headscore.evaluation.tasks import task_samples
    from headscore.evaluation.tasks.niah import NiahTask

    @dataclass
    class LengthScoredNiah(NiahTask):
        def score(self, sample, prediction):
            return 0.375  # no metric gives this to the tiny random model's answer

    task = LengthScoredNiah(lengths=[160], depths=[50], num_needles=1, max_new_tokens=6)
    samples = task_samples(task, tokenizer)
    assert samples[0].task_scorer is task and "task_scorer" not in samples[0].to_dict()
    result = evaluate(model, tokenizer, samples, tmp_path / "run", model_name="tiny", figures=False,
                      options=EvaluateOptions(methods=["full"], budgets=[16], scores={}))
    assert [row["score"] for row in result.rows] == [0.375]
def test_decode_batch_changes_no_prediction_row_or_journal(tiny_llama, tokenizer, tmp_path, score_files):
    """All conditions of a sample decoded as one batch, in batches of 2, and one at a time: the same rows and
    journal (float64, so batching's rounding cannot flip a greedy choice)."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=len(tokenizer)).double()
    geometry = Geometry.from_config(model.config)
    options = EvaluateOptions(methods=["full", "snapkv", "pyramidkv", "ada-snapkv", "headkv-r"], budgets=[12, 32],
                              scores=score_files(geometry))
    samples = small_samples(tokenizer)[:3]
    runs = {}
    for batch in (None, 2, 1):
        out = tmp_path / f"batch-{batch}"
        runs[batch] = evaluate(model, tokenizer, samples, out, options=options, model_name="tiny", figures=False,
                               decode_batch=batch)
        runs[batch].journal = (out / "journal.jsonl").read_text()
        runs[batch].csv = (out / "results.csv").read_bytes()
    for batch in (2, 1):
        assert runs[batch].rows == runs[None].rows
        assert runs[batch].journal == runs[None].journal and runs[batch].csv == runs[None].csv
    assert len({r["prediction"] for r in runs[None].rows}) > 1
    with pytest.raises(HeadscoreError, match="decode-batch"):
        evaluate(model, tokenizer, samples, tmp_path / "bad", options=options, model_name="tiny", decode_batch=0)


def test_decode_groups_put_full_alone_and_cap_the_rest():
    full, snap = make_press("full", GEOMETRY), make_press("snapkv", GEOMETRY, budget=16)
    plan = [Condition(m, 8, None, p, m) for m, p in [("full", full), ("a", snap), ("b", snap), ("c", snap)]]
    assert decode_groups(plan, None) == [[0], [1, 2, 3]]
    assert decode_groups(plan, 2) == [[0], [1, 2], [3]]
    assert decode_groups(plan, 1) == [[0], [1], [2], [3]]


GEOMETRY = Geometry(layers=2, query_heads=4, kv_heads=2, head_dim=16)


def test_resume_continues_a_partial_journal(model, tokenizer, tmp_path):
    options = EvaluateOptions(methods=["full", "snapkv"], budgets=[16], scores={})
    samples = small_samples(tokenizer)[:4]
    calls = []
    full = evaluate(model, tokenizer, samples, tmp_path / "a", options=options, model_name="tiny", figures=False)
    journal = (tmp_path / "a" / "journal.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b").mkdir()
    # keep the header and two finished samples, plus half a line from a killed write
    (tmp_path / "b" / "journal.jsonl").write_text("".join(journal[:3]) + journal[3][:40])
    resumed = evaluate(model, tokenizer, samples, tmp_path / "b", options=options, model_name="tiny",
                       progress=lambda done, total: calls.append(done), figures=False)
    assert calls[0] == 2
    assert resumed.rows == full.rows
    assert (tmp_path / "a" / "results.csv").read_bytes() == (tmp_path / "b" / "results.csv").read_bytes()


def test_bad_plans(model, score_files):
    geometry = Geometry.from_config(model.config)
    with pytest.raises(HeadscoreError, match="unknown method 'magic'"):
        plan_conditions(geometry, EvaluateOptions(methods=["magic"]))
    with pytest.raises(HeadscoreError, match="needs --scores r2=FILE"):
        plan_conditions(geometry, EvaluateOptions(methods=["headkv-r2"], budgets=[32]))
    with pytest.raises(HeadscoreError, match="exceed the observation window"):
        plan_conditions(geometry, EvaluateOptions(methods=["snapkv"], budgets=[4]))
    other = score_files(Geometry(layers=3, query_heads=4, kv_heads=2, head_dim=8))
    with pytest.raises(HeadscoreError, match="are for 3 layers × 4 query heads, but the model has 2 layers"):
        plan_conditions(geometry, EvaluateOptions(methods=["headkv-r"], budgets=[32], scores=other))


def test_the_plan_takes_each_methods_needs_from_the_registries(model, score_files):
    """Head scores, budgets and β come from what each method declares: no method is special-cased by name."""
    geometry = Geometry.from_config(model.config)
    scores = score_files(geometry)
    options = EvaluateOptions(methods=["full", "snapkv", "random@headkv-r2", "headkv-r", "razor-k1", "random@global"],
                              budgets=[16, 24], ratios=[0.5], betas=[1.01, 2.0], scores=scores)
    plan = [(c.label, c.budget, c.ratio, c.beta) for c in plan_conditions(geometry, options)]
    sizes = [(16, None), (24, None), (None, 0.5)]
    assert plan == [("full", None, None, None),
                    *[("snapkv", b, r, None) for b, r in sizes],
                    *[(f"random@headkv-r2 (β={beta:g})", b, r, beta) for b, r in sizes for beta in (1.01, 2.0)],
                    *[(f"headkv-r (β={beta:g})", b, r, beta) for b, r in sizes for beta in (1.01, 2.0)],
                    ("razor-k1", None, None, None),
                    *[("random@global", b, r, None) for b, r in sizes]]
    with pytest.raises(HeadscoreError, match="method headkv needs head scores"):
        plan_conditions(geometry, EvaluateOptions(methods=["headkv"], budgets=[16], scores=scores))
    with pytest.raises(HeadscoreError, match="method headkv-er needs --scores er=FILE"):
        plan_conditions(geometry, EvaluateOptions(methods=["headkv-er"], budgets=[16], scores=scores))
    with pytest.raises(HeadscoreError, match="no method takes the parameter 'alphaa'"):
        plan_conditions(geometry, EvaluateOptions(methods=["snapkv"], budgets=[16], params={"alphaa": 1}))


def test_named_score_files_and_razor_at_matched_kv(model, tokenizer, tmp_path, score_files):
    """headkv-er from a score file named "er" runs beside headkv-r / headkv-r2 and razor; razor's rows state
    the k the equal-total-KV rule gave each prompt, and its KV is that budget's, up to the rounding of k."""
    geometry = Geometry.from_config(model.config)
    scores = score_files(geometry)
    scores["er"] = str(tmp_path / "er.json")
    write_head_scores(scores["er"], HeadScores.from_tensor(torch.rand(4, 2, 4, generator=torch.Generator()
                                                                         .manual_seed(9), dtype=torch.float64)))
    options = EvaluateOptions(methods=["razor", "headkv-r", "headkv-er", "headkv-r2"], budgets=[24], scores=scores)
    conditions = plan_conditions(geometry, options)
    er = next(c for c in conditions if c.method == "headkv-er")
    assert er.press.budgets_for(geometry).source_scores == read_head_scores(scores["er"]).fingerprint
    want = allocate("headkv", geometry, 24, window=8, scores=read_head_scores(scores["er"]))
    assert torch.equal(er.press.budgets_for(geometry).matrix, want.matrix)
    samples = small_samples(tokenizer)[:2]
    result = evaluate(model, tokenizer, samples, tmp_path / "run", options=options, model_name="tiny",
                      figures=False)
    assert [r["method"] for r in result.rows[:4]] == ["razor", "headkv-r", "headkv-er", "headkv-r2"]
    for row in result.rows:
        if row["method"] != "razor":
            assert row["full_heads"] is None
            continue
        heads = geometry.layers * geometry.kv_heads
        k = math.floor((24 - 12) * heads / row["length"] + 0.5)
        assert row["full_heads"] == k
        entries = k * row["length"] + (heads - k) * 12
        generated = row["kv_bytes"] // (geometry.head_dim * 2 * 4) - entries
        assert 0 <= generated <= heads * 6  # the generated tail, at most max_new_tokens − 1 steps
    assert "| headkv-er | 24 |" in (tmp_path / "run" / "summary.md").read_text()


def test_summary_table_is_the_markdown_table():
    summary = [{"method": "full", "budget": None, "score": 0.5, "kv_ratio": 1.0, "samples": 2, "score[niah]": 0.5},
               {"method": "snapkv", "budget": 32, "score": 0.25, "kv_ratio": 0.125, "samples": 2,
                "score[niah]": 0.0, "score[twohop]": 0.5}]
    header, rows = summary_table(summary)
    assert header == ["method", "budget", "KV ratio", "mean score", "niah", "twohop"]
    assert rows == [["full", "all", "1.000", "0.500", "0.500", ""],
                    ["snapkv", "32", "0.125", "0.250", "0.000", "0.500"]]
    assert summary_markdown(summary).splitlines()[2:] == ["| " + " | ".join(r) + " |" for r in rows]


def test_newline_tokens(tokenizer):
    ids = newline_token_ids(tokenizer)
    assert tokenizer("\n", add_special_tokens=False)["input_ids"][0] in ids
    assert tokenizer(" Mary", add_special_tokens=False)["input_ids"][0] not in ids


@pytest.mark.parametrize("args,message", [
    (["--tasks", "sudoku"], "unknown task 'sudoku'"),
    (["--methods", "full,magic"], "unknown method 'magic'"),
    (["--methods", "headkv-r2"], "needs --scores r2=FILE"),
    (["--scores", "r2"], "--scores 'r2' is not NAME=FILE"),
    (["--budgets", "64,lots"], "--budgets: 'lots' is not a valid number"),
    (["--methods", "razor-k05"], "unknown method 'razor-k05'"),
])
def test_cli_bad_input_one_line(tmp_path, args, message, headscore_cli):
    out = tmp_path / "evaluation"
    result = headscore_cli("evaluate", "--out", out, *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("template", ["raw", "chat"])
def test_answer_prefix_ends_the_prompt_inside_the_window(model, tokenizer, template):
    """--answer-prefix (compress and evaluate): the prompt ends with it, after the generation prompt; the
    observation window's tokens hold it; the model continues it (the same tokens as generating from the
    prefixed prompt by hand)."""
    prefix, window = " The secret ingredient is", 8
    geometry = Geometry.from_config(model.config)
    press = make_press("snapkv", geometry, budget=24, window=window)
    prompt = render_prompt(tokenizer, "Some context. " * 20, "What is the secret?", template, prefix)
    plain = render_prompt(tokenizer, "Some context. " * 20, "What is the secret?", template)
    assert prompt == plain + prefix and prompt.endswith(prefix)
    ids = encode_prompt(tokenizer, prompt, template)["input_ids"]
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    assert len(prefix_ids) <= window and ids[-len(prefix_ids):] == prefix_ids  # the window covers it
    stops = eos_ids(model, tokenizer)
    expected, _ = generate_ids(model, torch.tensor([ids]), press, max_new_tokens=5, eos=stops)
    result = compress_generate(model, tokenizer, "Some context. " * 20, "What is the secret?", press=press,
                               max_new_tokens=5, template=template, answer_prefix=prefix)
    assert result.tokens == expected

    sample = small_samples(tokenizer)[1]
    sample.max_new_tokens = 5
    condition = plan_conditions(geometry, EvaluateOptions(methods=["snapkv"], budgets=[24], params={"window": window}))
    row = evaluate_sample(model, tokenizer, sample, condition, stops, window, answer_prefix=prefix)[0]
    ids = encode_prompt(tokenizer, sample.prompt + prefix, sample.template)["input_ids"]
    assert ids[-len(prefix_ids):] == prefix_ids
    tokens, _ = generate_ids(model, torch.tensor([ids]), condition[0].press, max_new_tokens=5, eos=stops)
    assert row["prediction"] == tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert row["length"] == len(ids)


@pytest.mark.slow
def test_smollm2_batched_conditions_equal_one_at_a_time(smollm2, tmp_path, score_files):
    """The default study's methods on the real model: all compressed conditions of a sample decoded as one
    batch give the rows of `--decode-batch 1` (float32: a greedy tie could flip one; none does here)."""
    model, tokenizer = smollm2
    geometry = Geometry.from_config(model.config)
    options = EvaluateOptions(budgets=[32, 128], scores=score_files(geometry))
    conditions = plan_conditions(geometry, options)
    sample = get_task("niah", lengths=[600], depths=[50], num_needles=1, max_new_tokens=24,
                      template="chat").samples(tokenizer)[0]
    stops, line_end = eos_ids(model, tokenizer), newline_token_ids(tokenizer)
    batched = evaluate_sample(model, tokenizer, sample, conditions, stops, options.window, line_end)
    single = evaluate_sample(model, tokenizer, sample, conditions, stops, options.window, line_end,
                             decode_batch=1)
    assert batched == single
    assert any(row["score"] > 0 for row in batched)  # the model finds the needle under some conditions


def test_razor_k_resolves_for_any_k_when_used():
    """razor-kN is resolved from its name (no registry copy): razor on the retrieval scores with k = N."""
    from headscore.compression.presses import parse_method

    spec = parse_method("razor-k20")
    assert (spec.press, spec.head_scores, spec.full_heads) == ("razor", "r", 20)
    assert parse_method("razor-k0").full_heads == 0 and parse_method("razor-k12345").full_heads == 12345
    for bad in ("razor-k", "razor-k05", "razor-k-1", "razor-kx", "razor-k5 "):
        with pytest.raises(HeadscoreError, match=f"unknown method '{bad}'.*razor-kN"):
            parse_method(bad)


def test_razor_k_through_evaluate_equals_a_razor_press_compress(model, tokenizer, score_files):
    """A razor-kN condition is one RazorPress(full_heads=N) compress of the same sample: the same tokens, bytes
    and kept entries; it is planned once (budget None) whatever the budgets; its KV size is the plain count
    (k heads keep the prompt, the others 4 sinks + the window)."""
    geometry = Geometry.from_config(model.config)
    scores = score_files(geometry)
    options = EvaluateOptions(methods=["razor-k3", "razor"], budgets=[16, 24], scores=scores)
    conditions = plan_conditions(geometry, options)
    assert [(c.method, c.budget) for c in conditions] == [("razor-k3", None), ("razor", 16), ("razor", 24)]
    assert conditions[0].press.full_heads == 3 and conditions[1].press.full_heads is None
    assert conditions[0].press.describe()["budget"] is None  # a given k holds its own KV
    sample = small_samples(tokenizer)[1]
    sample.max_new_tokens = 5
    stops = eos_ids(model, tokenizer)
    row = evaluate_sample(model, tokenizer, sample, conditions, stops, options.window)[0]
    ids = torch.tensor([encode_prompt(tokenizer, sample.prompt, sample.template)["input_ids"]])
    press = make_press("razor", geometry, window=8, scores=read_head_scores(scores["r"]), full_heads=3)
    tokens, report = generate_ids(model, ids, press, max_new_tokens=5, eos=stops)
    assert row["prediction"] == tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert (row["kv_bytes"], row["full_heads"], row["compensation"], row["budget"]) == (report.kv_bytes, 3, False,
                                                                                      None)
    heads, n = geometry.layers * geometry.kv_heads, ids.shape[1]
    assert row["kv_size"] == pytest.approx((3 * n + (heads - 3) * (4 + 8)) / heads)
    assert row["kv_size"] == pytest.approx(sum(map(sum, report.kept)) / heads)


def test_razor_k_runs_once_per_sample_whatever_the_budgets(model, tokenizer, tmp_path, score_files):
    """razor-kN does not depend on the budget: one row per sample (budget empty), the same rows under other
    budgets, one summary entry, its own heatmap and a point on the KV curve; the journal resumes it."""
    geometry = Geometry.from_config(model.config)
    scores = score_files(geometry)
    samples = small_samples(tokenizer)
    runs = {}
    for name, budgets in (("two", [16, 24]), ("one", [24])):
        options = EvaluateOptions(methods=["snapkv", "razor-k2"], budgets=budgets, scores=scores)
        runs[name] = evaluate(model, tokenizer, samples, tmp_path / name, options=options, model_name="tiny")
    rows = {name: [r for r in result.rows if r["method"] == "razor-k2"] for name, result in runs.items()}
    assert len(rows["two"]) == len(samples) and all(r["budget"] is None for r in rows["two"])
    assert rows["two"] == rows["one"]
    assert len(runs["two"].rows) == len(samples) * 3
    entry = [e for e in runs["two"].summary if e["method"] == "razor-k2"]
    assert len(entry) == 1 and entry[0]["budget"] is None
    assert entry[0]["kv_ratio"] == pytest.approx(sum(r["kv_ratio"] for r in rows["two"]) / len(samples))
    assert (tmp_path / "two" / "niah_razor-k2_all.png").is_file()
    assert not (tmp_path / "two" / "niah_razor-k2_full.png").exists()
    calls = []
    again = evaluate(model, tokenizer, samples, tmp_path / "two", options=EvaluateOptions(
        methods=["snapkv", "razor-k2"], budgets=[16, 24], scores=scores), model_name="tiny",
        progress=lambda done, total: calls.append(done))
    assert calls == [len(samples)] and again.rows == runs["two"].rows


def test_compensation_reaches_every_razor_press(model, tokenizer, score_files):
    """razor_compensation: every razor condition stores one more entry per compressed head (the rows say so);
    the other methods are untouched."""
    geometry = Geometry.from_config(model.config)
    scores = score_files(geometry)
    sample = small_samples(tokenizer)[1]
    sample.max_new_tokens = 3
    stops = eos_ids(model, tokenizer)
    rows = {}
    for on in (False, True):
        options = EvaluateOptions(methods=["razor-k1", "razor", "snapkv"], budgets=[24], scores=scores,
                                  params={"compensation": on})
        conditions = plan_conditions(geometry, options)
        assert [c.press.compensation for c in conditions[:2]] == [on, on]
        rows[on] = evaluate_sample(model, tokenizer, sample, conditions, stops, options.window)
    heads = geometry.layers * geometry.kv_heads
    for off, on in zip(rows[False][:2], rows[True][:2], strict=True):
        assert (off["compensation"], on["compensation"]) == (False, True)
        assert on["full_heads"] == off["full_heads"]
        assert on["kv_size"] - off["kv_size"] == pytest.approx((heads - on["full_heads"]) / heads)
    assert rows[False][2]["kv_size"] == rows[True][2]["kv_size"] and rows[True][2]["compensation"] is None
    with pytest.raises(HeadscoreError, match="compensation must be true, false or both"):
        plan_conditions(geometry, EvaluateOptions(methods=["razor-k1"], scores=scores, params={"compensation": "yes"}))
    # "both": every razor method both ways, the compensated one labelled; its rows are the two runs' rows
    options = EvaluateOptions(methods=["razor-k1", "razor", "snapkv"], budgets=[24], scores=scores,
                              params={"compensation": "both"})
    conditions = plan_conditions(geometry, options)
    assert [c.label for c in conditions] == ["razor-k1", "razor-k1 (compensation)", "razor", "razor (compensation)",
                                             "snapkv"]
    assert [c.press.compensation for c in conditions[:4]] == [False, True, False, True]
    together = evaluate_sample(model, tokenizer, sample, conditions, stops, options.window)
    separate = [rows[False][0], rows[True][0], rows[False][1], rows[True][1], rows[False][2]]
    for got, expected in zip(together, separate, strict=True):
        assert {k: v for k, v in got.items() if k != "method"} == {k: v for k, v in expected.items() if k != "method"}


def test_razor_k_above_the_heads_is_one_error(model, score_files):
    geometry = Geometry.from_config(model.config)  # 2 layers × 2 KV heads
    scores = score_files(geometry)
    plan_conditions(geometry, EvaluateOptions(methods=["razor-k4"], scores=scores))
    with pytest.raises(HeadscoreError, match="method razor-k5: razor: 5 full heads, but the model has 4 kv heads"):
        plan_conditions(geometry, EvaluateOptions(methods=["razor-k5"], scores=scores))
    with pytest.raises(HeadscoreError, match="needs --scores r=FILE"):
        plan_conditions(geometry, EvaluateOptions(methods=["razor-k1"]))


def test_cli_razor_k_above_the_models_heads_is_one_line(tmp_path, random_scores, headscore_cli):
    """SmolLM2 has 30 layers × 3 KV heads: razor-k91 fails before any weight is loaded, in one line."""
    path = tmp_path / "r.json"
    write_head_scores(path, random_scores(30, 9))
    out = tmp_path / "evaluation"
    result = headscore_cli("evaluate", "--out", out, "--methods", "razor-k91", "--scores", f"r={path}",
                           "--compensation")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "method razor-k91: razor: 91 full heads, but the model has 90 kv heads" in lines[0]
    assert not out.exists()


@pytest.fixture
def counted_scorer():
    """A registered scorer (keys by norm) that counts its calls, for one test."""
    from dataclasses import dataclass

    from headscore.compression.scorers import SCORERS, Scorer, register_scorer

    calls: list[int] = []

    @register_scorer("counted")
    @dataclass(frozen=True)
    class CountedScorer(Scorer):
        summary = "keys by norm, counting calls"
        comparable = True

        def score(self, inputs):
            calls.append(inputs.layer)
            norms = inputs.keys.float().norm(dim=-1)
            return norms.repeat_interleave(inputs.heads // inputs.kv_heads, dim=1)

    yield calls
    del SCORERS["counted"]


def test_a_scorer_scores_each_prompt_once_for_every_allocation_and_budget(model, tokenizer, score_files,
                                                                           counted_scorer):
    geometry = Geometry.from_config(model.config)
    methods = ["counted", "counted@ada", "counted@pyramid", "counted@headkv-r2", "counted@global", "snapkv"]
    options = EvaluateOptions(methods=methods, budgets=[16, 24], ratios=[0.5], scores=score_files(geometry))
    conditions = plan_conditions(geometry, options)
    sample = small_samples(tokenizer)[0]
    sample.max_new_tokens = 2
    rows = evaluate_sample(model, tokenizer, sample, conditions, eos_ids(model, tokenizer), options.window,
                           decode_batch=4)  # several decode groups, each its own cache from the one prefill
    assert sorted(counted_scorer) == [0, 1]  # once per layer of the one prompt, for 15 conditions
    by_method = {(row["method"], row["budget"], row["ratio"]): row for row in rows}
    assert {(row["scorer"], row["allocation"]) for row in rows} == {
        ("counted", "uniform"), ("counted", "ada"), ("counted", "pyramid"), ("counted", "headkv-r2"),
        ("counted", "global"), ("snapkv", "uniform")}
    for method in methods:  # every allocation spends the same total at a KV size, the ratio its share
        assert by_method[(method, 16, None)]["kv_size"] == pytest.approx(16, abs=1.0)
        assert by_method[(method, None, 0.5)]["ratio_achieved"] == pytest.approx(0.5, abs=0.05)


def test_question_after_compression(model, tokenizer, score_files):
    """--question after: the context before the question is prefilled and compressed, the question asked on the
    compressed cache. With every entry kept it answers exactly as the whole prompt does; compressed, the
    selection is the context's alone (the window's last tokens are the context's, not the question's)."""
    from headscore.evaluation.evaluate import question_start, sample_ids

    geometry = Geometry.from_config(model.config)
    sample = small_samples(tokenizer)[1]
    sample.max_new_tokens = 4
    ids = sample_ids(tokenizer, sample)
    split = question_start(tokenizer, sample)
    asked = tokenizer.decode(ids[split:])
    assert sample.question in asked and sample.question not in tokenizer.decode(ids[:split])
    stops = eos_ids(model, tokenizer)
    options = EvaluateOptions(methods=["full", "snapkv", "headkv-r2"], budgets=[16, 4000],
                              scores=score_files(geometry))
    conditions = plan_conditions(geometry, options)
    inside = evaluate_sample(model, tokenizer, sample, conditions, stops, options.window)
    after = evaluate_sample(model, tokenizer, sample, conditions, stops, options.window, question="after")
    assert [row["question"] for row in after] == ["after"] * len(conditions)
    assert [row["question"] for row in inside] == ["in-prompt"] * len(conditions)
    for got, want in zip(after, inside, strict=True):
        if got["budget"] in (None, 4000):  # everything kept: one prefill of context and question, split
            assert got["prediction"] == want["prediction"] and got["length"] == want["length"]
    small = [row for row in after if row["budget"] == 16]
    assert all(row["kv_size"] == pytest.approx(16, abs=1) for row in small)
    no_question = small_samples(tokenizer)[0]
    no_question.question = ""
    with pytest.raises(HeadscoreError, match="has no question after its context"):
        question_start(tokenizer, no_question)


def test_old_names_give_the_rows_of_their_spelled_forms(model, tokenizer, score_files):
    """`snapkv`, `pyramidkv`, `ada-snapkv`, `headkv-r2` are `snapkv@uniform`, `snapkv@pyramid`, `snapkv@ada`,
    `snapkv@headkv-r2`: every column of their rows but the method's name is the same."""
    geometry = Geometry.from_config(model.config)
    sample = small_samples(tokenizer)[0]
    sample.max_new_tokens = 3
    stops = eos_ids(model, tokenizer)
    old, spelled = ["snapkv", "pyramidkv", "ada-snapkv", "headkv-r2"], ["snapkv@uniform", "snapkv@pyramid",
                                                                       "snapkv@ada", "snapkv@headkv-r2"]
    rows = {}
    for names in (old, spelled):
        options = EvaluateOptions(methods=names, budgets=[16, 24], scores=score_files(geometry))
        rows[names[0]] = evaluate_sample(model, tokenizer, sample, plan_conditions(geometry, options), stops,
                                         options.window)
    for a, b in zip(rows["snapkv"], rows["snapkv@uniform"], strict=True):
        assert {k: v for k, v in a.items() if k != "method"} == {k: v for k, v in b.items() if k != "method"}
    assert [r["method"] for r in rows["snapkv"]] == [m for m in old for _ in (16, 24)]
