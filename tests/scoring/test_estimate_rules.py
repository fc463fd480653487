"""Several score rules from one pass: the scored decode runs on the one decode loop and equals a plain loop;
a multi-rule run writes, per rule, exactly the files of that rule's own run; it resumes folder by folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from headscore.core.errors import HeadscoreError
from headscore.core.model import eos_ids
from headscore.core.prompts import encode_prompt
from headscore.scoring import estimate as estimate_module
from headscore.scoring.capture import attention_capture
from headscore.scoring.estimate import (
    JOURNAL,
    EstimateOptions,
    answer_token_count,
    decode_rules,
    encode_trial,
    estimate,
    estimate_rules,
    official_newline_ids,
    stop_criteria,
)

RULES = ("r2", "retrieval")




def plain_stops(model, tokenizer, trial, stop_rule: str, max_new_tokens: int):
    """Each rule's stop test on the generated ids, written out: r2 after A tokens, retrieval after N ("newline":
    also at EOS or a token holding a newline); "official": the authors' ids, r2 also at config EOS, retrieval
    only after `max_new_tokens`."""
    ids = encode_prompt(tokenizer, trial.prompt, trial.template)["input_ids"]
    n = trial.answer_span[1] - trial.answer_span[0]
    a = len(tokenizer(trial.answer, add_special_tokens=False)["input_ids"])
    if stop_rule == "official":
        ends = official_newline_ids(tokenizer)
        eos = {model.config.eos_token_id} if isinstance(model.config.eos_token_id, int) else set()
        return ids, {"r2": lambda g: len(g) >= min(a, max_new_tokens) or g[-1] in ends | eos,
                     "retrieval": lambda g: len(g) >= max_new_tokens or g[-1] in ends}
    stops = eos_ids(model, tokenizer)

    def ended(g):
        return g[-1] in stops or "\n" in tokenizer.decode([g[-1]])

    return ids, {"r2": lambda g: len(g) >= min(a, max_new_tokens) or ended(g),
                 "retrieval": lambda g: len(g) >= min(n, max_new_tokens) or ended(g)}


def plain_decode(eager, tokenizer, trial, stop_rule: str, max_new_tokens: int):
    """Full recompute with eager `output_attentions` at every step, loops over layers and heads: per rule
    (scores [layers, heads] float64, generated ids), each rule scoring its steps up to its own stop."""
    ids, stops = plain_stops(eager, tokenizer, trial, stop_rule, max_new_tokens)
    start, end = trial.answer_span
    n = end - start
    a = len(tokenizer(trial.answer, add_special_tokens=False)["input_ids"])
    config = eager.config
    scores = {rule: torch.zeros(config.num_hidden_layers, config.num_attention_heads, dtype=torch.float64)
              for rule in RULES}
    lengths: dict[str, int] = {}
    sequence, generated = list(ids), []
    with torch.no_grad():
        while len(lengths) < len(RULES):
            out = eager(torch.tensor([sequence]), output_attentions=True)
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            for rule in RULES:
                if rule in lengths:
                    continue
                for layer, attention in enumerate(out.attentions):
                    for head in range(config.num_attention_heads):
                        row = attention[0, head, -1].tolist()
                        ranked = sorted(range(len(row)), key=lambda i: -row[i])
                        if rule == "r2":
                            for position in ranked[:n]:
                                if start <= position < end:
                                    scores[rule][layer, head] += 10 * row[position] / (n * a)
                        elif start <= ranked[0] < end and ids[ranked[0]] == token:
                            scores[rule][layer, head] += 1 / n
                if stops[rule](generated):
                    lengths[rule] = len(generated)
            sequence.append(token)
    return {rule: (scores[rule], generated[:lengths[rule]]) for rule in RULES}


@pytest.mark.parametrize("stop_rule", ["newline", "official"])
def test_one_decode_scores_every_rule_as_a_plain_loop(tiny, tokenizer, trials, stop_rule):
    """One greedy decode on the shared loop gives each rule the scores and ids of a plain per-rule loop, also
    where the rules stop at different steps ("official": retrieval runs to max_new_tokens, r2 to A)."""
    model, eager = tiny(), tiny("eager")
    for trial in trials[:2]:
        ids, span = encode_trial(trial, tokenizer)
        a = answer_token_count(tokenizer, trial.answer)
        options = EstimateOptions(mode="decode", max_new_tokens=a + 3, stop_rule=stop_rule)
        stops = {rule: stop_criteria(model, tokenizer, replace(options, rule=rule), a, span[1] - span[0])
                 for rule in RULES}
        with attention_capture(model, 2) as capture:
            found = decode_rules(model, ids, span, capture, stops, answer_tokens=a)
        expected = plain_decode(eager, tokenizer, trial, stop_rule, a + 3)
        for rule in RULES:
            scores, generated, bad = found[rule]
            assert generated == expected[rule][1] and not bad
            torch.testing.assert_close(scores.double(), expected[rule][0], atol=1e-5, rtol=1e-4)
        if stop_rule == "official":
            assert len(found["retrieval"][1]) == a + 3 > len(found["r2"][1])  # different stops, one decode


def journal_lines(folder: Path) -> tuple[str, list[dict]]:
    lines = (folder / JOURNAL).read_text().splitlines()
    return lines[0], [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines[1:]]


def same_as_alone(together: Path, alone: Path, journal_order: bool = True) -> None:
    """The folder a multi-rule run wrote equals the one-rule run's: files, metadata (timing aside), journal
    (its records in the same order unless not `journal_order`: a resumed run appends in the order it ran)."""
    for name in ("head_scores.json", "trials.csv", "heatmap.png"):  # no heatmap where every score is 0
        found = [(folder / name).read_bytes() if (folder / name).exists() else None for folder in (together, alone)]
        assert found[0] == found[1], name
    assert (together / "head_scores.json").is_file()
    metadata = [json.loads((folder / "metadata.json").read_text()) for folder in (together, alone)]
    for found in metadata:
        found.pop("timing")
    assert metadata[0] == metadata[1]
    (header, records), (header_alone, records_alone) = journal_lines(together), journal_lines(alone)
    assert header == header_alone
    if not journal_order:
        records, records_alone = (sorted(r, key=lambda record: record["index"]) for r in (records, records_alone))
    assert records == records_alone


@pytest.mark.parametrize("mode, stop_rule", [("teacher-forced", "newline"), ("decode", "newline"),
                                             ("decode", "official")])
def test_a_multi_rule_run_writes_each_rules_own_files(tiny, tokenizer, trials, tmp_path, mode, stop_rule):
    model = tiny()
    options = EstimateOptions(mode=mode, f1_threshold=-1, rouge_threshold=-1, max_new_tokens=12,
                              stop_rule=stop_rule)
    chosen = trials[:3]
    lines: list[str] = []
    results = estimate_rules(model, tokenizer, chosen, {rule: tmp_path / "together" / rule for rule in RULES},
                             options=options, model_name="tiny", log=lines.append)
    assert set(results) == set(RULES) and all(r.counted == 3 for r in results.values())
    assert any("one " + mode in line for line in lines)
    for rule in RULES:
        alone = estimate(model, tokenizer, chosen, tmp_path / "alone" / rule, options=replace(options, rule=rule),
                         model_name="tiny")
        assert alone.top_heads == results[rule].top_heads
        same_as_alone(tmp_path / "together" / rule, tmp_path / "alone" / rule)
    with pytest.raises(HeadscoreError, match="own output folder"):
        estimate_rules(model, tokenizer, chosen, {"r2": tmp_path / "x", "retrieval": tmp_path / "x"},
                       options=options, model_name="tiny")


def test_a_multi_rule_run_resumes_each_folder_on_its_own(tiny, tokenizer, trials, tmp_path, monkeypatch):
    """A folder already holding some trials (or all) is not scored again for them; an interrupted multi-rule
    run (and a write cut off by the kill) continues to the files of an uninterrupted one."""
    model = tiny()
    options = EstimateOptions(mode="teacher-forced")
    fresh = {rule: tmp_path / "fresh" / rule for rule in RULES}
    resumed = {rule: tmp_path / "resumed" / rule for rule in RULES}
    estimate_rules(model, tokenizer, trials, fresh, options=options, model_name="tiny")

    calls: list[tuple[int, list[str]]] = []
    score = estimate_module.score_trial_rules

    def spy(model, tokenizer, trial, index, options, *args):
        calls.append((index, [option.rule for option in options]))
        return score(model, tokenizer, trial, index, options, *args)

    monkeypatch.setattr(estimate_module, "score_trial_rules", spy)
    estimate(model, tokenizer, trials, resumed["r2"], options=options, model_name="tiny", limit=2)
    assert [index for index, _ in calls] and {index for index, _ in calls} == {0, 1}
    calls.clear()

    def interrupt(done, total, record):
        if record is not None and len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        estimate_rules(model, tokenizer, trials, resumed, options=options, model_name="tiny", progress=interrupt)
    assert len(calls) == 3
    with open(resumed["retrieval"] / JOURNAL, "a") as handle:  # a write cut off by the kill
        handle.write('{"index": 99, "id": "half')
    results = estimate_rules(model, tokenizer, trials, resumed, options=options, model_name="tiny")
    assert sorted(index for index, _ in calls) == list(range(len(trials)))  # each trial run once
    assert {index: rules for index, rules in calls} == {
        index: ["retrieval"] if index < 2 else ["r2", "retrieval"] for index in range(len(trials))}
    for rule in RULES:
        assert results[rule].run == len(trials)
        same_as_alone(resumed[rule], fresh[rule], journal_order=False)

    journals = {rule: (resumed[rule] / JOURNAL).read_bytes() for rule in RULES}
    calls.clear()
    estimate_rules(model, tokenizer, trials, resumed, options=options, model_name="tiny")
    assert calls == [] and journals == {rule: (resumed[rule] / JOURNAL).read_bytes() for rule in RULES}


def test_a_rule_whose_first_trials_fail_stops_alone(tiny, tokenizer, trials, tmp_path):
    """Decode mode: retrieval fails its success check on the tiny model (r2's threshold lets every trial pass):
    retrieval stops after K trials as its own run does, r2 finishes and is written, then the error is raised."""
    model = tiny()
    options = EstimateOptions(mode="decode", f1_threshold=-1, rouge_threshold=2.0, max_new_tokens=6)
    out = {rule: tmp_path / "together" / rule for rule in RULES}
    with pytest.raises(HeadscoreError, match=r"^retrieval: stopped: the first 2 trials all failed"):
        estimate_rules(model, tokenizer, trials, out, options=options, model_name="tiny", stop_after_failures=2)
    assert (out["r2"] / "head_scores.json").is_file() and not (out["retrieval"] / "head_scores.json").exists()
    estimate(model, tokenizer, trials, tmp_path / "alone" / "r2", options=options, model_name="tiny",
             stop_after_failures=2)
    same_as_alone(out["r2"], tmp_path / "alone" / "r2")
    with pytest.raises(HeadscoreError, match="first 2 trials"):
        estimate(model, tokenizer, trials, tmp_path / "alone" / "retrieval",
                 options=replace(options, rule="retrieval"), model_name="tiny", stop_after_failures=2)
    assert journal_lines(out["retrieval"]) == journal_lines(tmp_path / "alone" / "retrieval")


def test_cli_several_rules_write_one_folder_each(tiny_folder, trials, tmp_path):
    from headscore.cli import app
    from headscore.scoring.trials import write_trials

    path = tmp_path / "trials.jsonl"
    write_trials(path, trials[:2])
    runner = CliRunner()
    common = ["estimate", "--trials", str(path), "--mode", "teacher-forced", "--model", str(tiny_folder)]
    done = runner.invoke(app, [*common, "--rule", "r2,retrieval", "--out", str(tmp_path / "both")])
    assert done.exit_code == 0, done.output
    assert "one teacher-forced pass" in done.output
    done = runner.invoke(app, [*common, "--rule", "retrieval", "--out", str(tmp_path / "one")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "both" / "scores-r2" / "head_scores.json").is_file()
    assert json.loads((tmp_path / "both" / "scores-r2" / "metadata.json").read_text())["method"] == "r2"
    assert ((tmp_path / "both" / "scores-retrieval" / "head_scores.json").read_bytes()
            == (tmp_path / "one" / "head_scores.json").read_bytes())
    done = runner.invoke(app, [*common, "--rule", "r2,r2", "--out", str(tmp_path / "dup")])
    assert done.exit_code != 0 and "distinct" in str(done.exception)
