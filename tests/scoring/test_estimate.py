"""The estimate loop: scores equal a plain eager loop, resume and shards give the same files, clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from headscore.core.errors import HeadscoreError
from headscore.core.model import eos_ids
from headscore.core.prefix_cache import plan_prefixes
from headscore.core.prompts import encode_prompt
from headscore.scoring.estimate import (
    JOURNAL,
    EstimateOptions,
    decode_trial,
    encode_trial,
    estimate,
    merge_runs,
    teacher_forced_trial,
)
from headscore.scoring.head_scores import read_head_scores


def reference_scores(eager, tokenizer, trial, method, mode, max_new_tokens=50):
    """Plain loop over steps, layers and heads on an eager model's `output_attentions` (full recompute).

    r2 is the official rule: 10 · weight / (N · A) per top-N hit, A = the answer's token count; r2 decoding
    stops after A tokens, retrieval decoding after N."""
    ids = encode_prompt(tokenizer, trial.prompt, trial.template)["input_ids"]
    start, end = trial.answer_span
    n = end - start
    a = len(tokenizer(trial.answer, add_special_tokens=False)["input_ids"])
    config = eager.config
    scores = torch.zeros(config.num_hidden_layers, config.num_attention_heads, dtype=torch.float64)

    def add(attentions, row_index, token):
        for layer, attention in enumerate(attentions):
            for head in range(config.num_attention_heads):
                row = attention[0, head, row_index].tolist()
                ranked = sorted(range(len(row)), key=lambda i: -row[i])
                if method == "r2":
                    for position in ranked[:n]:
                        if start <= position < end:
                            scores[layer, head] += 10 * row[position] / (n * a)
                elif start <= ranked[0] < end and ids[ranked[0]] == token:
                    scores[layer, head] += 1 / n

    generated = []
    with torch.no_grad():
        if mode == "teacher-forced":
            answer = ids[start:end]
            out = eager(torch.tensor([ids + answer[:-1]]), output_attentions=True)
            for i, token in enumerate(answer):
                add(out.attentions, len(ids) - 1 + i, token)
            return scores, out.logits[0, len(ids) - 1:].argmax(-1).tolist()
        sequence = list(ids)
        stops = eos_ids(eager, tokenizer)
        for _ in range(min(a if method == "r2" else n, max_new_tokens)):
            out = eager(torch.tensor([sequence]), output_attentions=True)
            token = int(out.logits[0, -1].argmax())
            add(out.attentions, -1, token)
            generated.append(token)
            if token in stops or "\n" in tokenizer.decode([token]):
                break
            sequence.append(token)
    return scores, generated


def read_journal_records(folder: Path):
    return [json.loads(line) for line in (folder / JOURNAL).read_text().splitlines()[1:]]


@pytest.mark.parametrize("method", ["r2", "retrieval"])
@pytest.mark.parametrize("mode", ["decode", "teacher-forced"])
def test_scores_equal_plain_eager_loop(tiny, tokenizer, trials, tmp_path, method, mode):
    model, eager = tiny(), tiny("eager")
    chosen = trials[:2]
    options = EstimateOptions(rule=method, mode=mode, f1_threshold=-1, rouge_threshold=-1, max_new_tokens=8)
    result = estimate(model, tokenizer, chosen, tmp_path, options=options, model_name="tiny")
    assert result.counted == result.run == 2
    records = read_journal_records(tmp_path)
    for trial, record in zip(chosen, records, strict=True):
        expected, generated = reference_scores(eager, tokenizer, trial, method, mode, max_new_tokens=8)
        assert record["steps"] == len(generated)
        torch.testing.assert_close(torch.tensor(record["scores"], dtype=torch.float64), expected,
                                   atol=1e-5, rtol=1e-4)
    if method == "r2":
        assert torch.tensor(records[0]["scores"]).sum() > 0
    saved = read_head_scores(tmp_path / "head_scores.json", layers=2, heads=4)
    assert saved.num_trials == 2
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["mode"] == mode and metadata["method"] == method
    assert metadata["geometry"]["kv_heads"] == 2 and metadata["trials_counted"] == 2


@pytest.mark.parametrize("method", ["r2", "retrieval"])
@torch.no_grad()
def test_teacher_forced_equals_decoding_the_answer(tiny, tokenizer, trials, method):
    """One teacher-forced pass scores exactly what step-by-step decoding of the answer tokens scores."""
    from headscore.scoring.capture import attention_capture

    model = tiny()
    ids = torch.tensor(encode_prompt(tokenizer, trials[1].prompt, "raw")["input_ids"])
    span = tuple(trials[1].answer_span)
    with attention_capture(model, 2) as capture:
        forced, _, bad_f = teacher_forced_trial(model, ids, span, capture, method)
        stepped, generated, bad_s = decode_trial(model, tokenizer, ids, span, capture, method, 50,
                                                 forced=ids[span[0]:span[1]])
    assert generated == ids[span[0]:span[1]].tolist()
    assert not bad_f and not bad_s
    torch.testing.assert_close(forced, stepped, atol=1e-5, rtol=1e-4)


def files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("head_scores.json", "trials.csv", "heatmap.png")}


def metadata_without_timing(folder: Path) -> dict:
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata.pop("timing")
    return metadata


def test_resume_after_interruption_gives_identical_files(tiny, tokenizer, trials, tmp_path):
    model = tiny()
    options = EstimateOptions(mode="teacher-forced")
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    estimate(model, tokenizer, trials, fresh, options=options, model_name="tiny")

    estimate(model, tokenizer, trials, resumed, options=options, model_name="tiny", limit=3)
    assert len(read_journal_records(resumed)) == 3
    with open(resumed / JOURNAL, "a") as handle:  # a write cut off by a kill
        handle.write('{"index": 3, "id": "half')
    seen = []
    result = estimate(model, tokenizer, trials, resumed, options=options, model_name="tiny",
                      progress=lambda done, total, record: seen.append((done, total, record is None)))
    assert seen[0] == (3, len(trials), True) and seen[-1] == (len(trials), len(trials), False)
    assert result.run == result.counted == len(trials)
    assert files(resumed) == files(fresh)
    assert metadata_without_timing(resumed) == metadata_without_timing(fresh)
    assert len(read_journal_records(resumed)) == len(trials)

    with pytest.raises(HeadscoreError, match="another run"):
        estimate(model, tokenizer, trials, resumed, options=EstimateOptions(mode="teacher-forced",
                                                                            rule="retrieval"),
                 model_name="tiny")


def test_shards_merge_into_the_unsharded_files(tiny, tokenizer, trials, tmp_path):
    model = tiny()
    options = EstimateOptions(mode="teacher-forced")
    estimate(model, tokenizer, trials, tmp_path / "full", options=options, model_name="tiny")
    for index in range(3):
        estimate(model, tokenizer, trials, tmp_path / f"s{index}", options=options, model_name="tiny",
                 shard=(index, 3))
    assert len(read_journal_records(tmp_path / "s1")) == len(range(1, len(trials), 3))
    result = merge_runs([tmp_path / "s2", tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert result.run == len(trials) and not result.warnings
    assert files(tmp_path / "merged") == files(tmp_path / "full")

    partial = merge_runs([tmp_path / "s0"], tmp_path / "partial")
    assert any("in none of the merged runs" in w for w in partial.warnings)
    estimate(model, tokenizer, trials, tmp_path / "other", options=EstimateOptions(), model_name="tiny",
             shard=(0, 3))  # decode mode: nothing counts, a shard only warns
    with pytest.raises(HeadscoreError, match="different run"):
        merge_runs([tmp_path / "s0", tmp_path / "other"], tmp_path / "bad")


def test_no_counted_trial_and_nan_are_reported(tiny, tokenizer, trials, tmp_path):
    model = tiny()
    result = estimate(model, tokenizer, trials[:1], tmp_path / "zero", model_name="tiny")
    assert result.counted == 0 and "no trial counted" in result.warnings[0]
    assert "success check" in result.warnings[0]
    assert (tmp_path / "zero" / "trials.csv").is_file() and not (tmp_path / "zero" / "heatmap.png").exists()
    with pytest.raises(HeadscoreError, match="all zero"):
        read_head_scores(tmp_path / "zero" / "head_scores.json").importance()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.fill_(float("nan"))
    result = estimate(model, tokenizer, trials[:1], tmp_path / "nan", options=EstimateOptions(mode="teacher-forced"),
                      model_name="tiny")
    assert result.counted == 0 and any("non-finite" in w for w in result.warnings)
    table = (tmp_path / "nan" / "trials.csv").read_text().splitlines()
    assert table[1].endswith(",True")  # the nan column
    metadata = json.loads((tmp_path / "nan" / "metadata.json").read_text())
    assert metadata["trials_nan"] == 1


def test_trials_of_another_tokenizer_are_refused(tiny, tokenizer, trials, tmp_path):
    other = [replace(t, tokenizer_fingerprint="0123456789abcdef") for t in trials]
    with pytest.raises(HeadscoreError, match="another tokenizer"):
        estimate(tiny(), tokenizer, other, tmp_path, model_name="tiny")
    shifted = [replace(t, length=t.length + 1) for t in trials]
    with pytest.raises(HeadscoreError, match="tokenizes to"):
        estimate(tiny(), tokenizer, shifted, tmp_path / "b", model_name="tiny")


def test_official_and_our_files_load_through_one_reader(data_dir, tiny, tokenizer, trials, tmp_path):
    estimate(tiny(), tokenizer, trials[:2], tmp_path, options=EstimateOptions(mode="teacher-forced"),
             model_name="tiny")
    ours = read_head_scores(tmp_path / "head_scores.json")
    assert (ours.layers, ours.heads, ours.num_trials) == (2, 4, 2)
    assert (tmp_path / "head_scores.json").read_text().count("\n") == 0
    paths = sorted((data_dir / "headkv").glob("*_heads.json"))
    assert len(paths) == 4
    for path in paths:
        official = read_head_scores(path)
        assert (official.layers, official.heads) == (32, 32)


def test_the_authors_full_files_load(reference_dir):
    """Extra, where the authors' full files exist: the one reader takes them as they are."""
    for path in sorted((reference_dir / "headkv").glob("*_heads.json")):
        official = read_head_scores(path)
        assert (official.layers, official.heads) == (32, 32) and official.num_trials > 50


@pytest.mark.slow
def test_cli_on_smollm2(tmp_path):
    """`headscore estimate` end to end on the real model: teacher-forced counts, decode mode says why not."""
    from typer.testing import CliRunner

    from headscore.cli import app
    from headscore.scoring.trials import build_needle_trials, write_trials

    trials_path = tmp_path / "trials.jsonl"
    write_trials(trials_path, build_needle_trials("smollm2-135m", min_length=250, max_length=250, lengths=1,
                                                  depths=1))
    runner = CliRunner()
    out = tmp_path / "tf"
    result = runner.invoke(app, ["estimate", "--trials", str(trials_path), "--out", str(out), "--mode",
                                 "teacher-forced"])
    assert result.exit_code == 0, result.output
    assert "mode=teacher-forced" in result.output
    scores = read_head_scores(out / "head_scores.json", layers=30, heads=9)
    assert scores.num_trials == 2 and scores.mean().sum() > 0
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["mode"] == "teacher-forced" and metadata["trials_counted"] == 2
    result = runner.invoke(app, ["estimate", "--trials", str(trials_path), "--out", str(tmp_path / "dec"),
                                 "--limit", "1"])
    assert result.exit_code == 0 and "no trial counted" in result.output


def test_r2_decoding_stops_after_the_answers_token_count(tiny, tokenizer, trials, tmp_path):
    """A short answer (A < N): r2 decodes at most A tokens and divides by N · A, as the official code."""
    model, eager = tiny(), tiny("eager")
    trial = replace(trials[0], answer="Mary's favorite")
    a = len(tokenizer(trial.answer, add_special_tokens=False)["input_ids"])
    n = trial.answer_span[1] - trial.answer_span[0]
    assert a < n
    options = EstimateOptions(rule="r2", f1_threshold=-1, max_new_tokens=50)
    estimate(model, tokenizer, [trial], tmp_path, options=options, model_name="tiny")
    record = read_journal_records(tmp_path)[0]
    expected, generated = reference_scores(eager, tokenizer, trial, "r2", "decode", max_new_tokens=50)
    assert record["steps"] == len(generated) <= a
    assert (record["answer_tokens"], record["span_tokens"]) == (a, n)
    torch.testing.assert_close(torch.tensor(record["scores"], dtype=torch.float64), expected, atol=1e-5,
                               rtol=1e-4)
    assert max(max(row) for row in record["scores"]) <= 10 / n + 1e-6  # the per-trial maximum


def test_decode_stops_when_the_first_trials_all_fail_and_the_journal_continues(tiny, tokenizer, trials, tmp_path):
    """The tiny model never answers: decode mode stops after K failures with the fixes named; rerunning with
    --stop-after-failures 0 continues from the journal; teacher-forced mode never stops."""
    model = tiny()
    assert len(trials) > 3
    with pytest.raises(HeadscoreError) as stopped:
        estimate(model, tokenizer, trials, tmp_path, model_name="tiny", stop_after_failures=3)
    message = str(stopped.value)
    assert "first 3 trials all failed" in message and "--mode teacher-forced" in message
    assert "--template chat" in message and "\n" not in message
    run_order = plan_prefixes([encode_trial(t, tokenizer)[0] for t in trials]).order  # prefix-sharing order
    assert [r["index"] for r in read_journal_records(tmp_path)] == run_order[:3]
    assert not (tmp_path / "head_scores.json").exists()
    with pytest.raises(HeadscoreError, match="first 3 trials"):  # a rerun stops at once, running nothing new
        estimate(model, tokenizer, trials, tmp_path, model_name="tiny", stop_after_failures=3)
    assert len(read_journal_records(tmp_path)) == 3
    seen = []
    result = estimate(model, tokenizer, trials, tmp_path, model_name="tiny", stop_after_failures=0,
                      progress=lambda done, total, record: seen.append(done))
    assert seen[0] == 3 and result.run == len(trials) and result.counted == 0
    tf = estimate(model, tokenizer, trials, tmp_path / "tf", model_name="tiny", stop_after_failures=1,
                  options=EstimateOptions(mode="teacher-forced"))
    assert tf.counted == len(trials)
    with pytest.raises(HeadscoreError, match="stop-after-failures"):
        estimate(model, tokenizer, trials, tmp_path / "neg", model_name="tiny", stop_after_failures=-1)


def test_r2_weight_head_is_the_released_scores_times_a_over_10(tiny, tokenizer, trials, tmp_path):
    """estimate --r2-weight head: every trial's scores are the released formula's × A / 10 (v / N per hit), the
    metadata names the weight, and the default run's journal header does not (earlier journals resume)."""
    model = tiny()
    released = estimate(model, tokenizer, trials[:2], tmp_path / "released",
                        options=EstimateOptions(mode="teacher-forced"), model_name="tiny")
    head = estimate(model, tokenizer, trials[:2], tmp_path / "head",
                    options=EstimateOptions(mode="teacher-forced", r2_weight="head"), model_name="tiny")
    assert released.metadata["r2_weight"] == "released" and head.metadata["r2_weight"] == "head"
    a = [len(tokenizer(t.answer, add_special_tokens=False)["input_ids"]) for t in trials[:2]]
    ours = read_head_scores(tmp_path / "head" / "head_scores.json", 2, 4).to_tensor()
    base = read_head_scores(tmp_path / "released" / "head_scores.json", 2, 4).to_tensor()
    scale = torch.tensor(a, dtype=torch.float64)[:, None, None] / 10
    torch.testing.assert_close(ours, base * scale)
    header = json.loads((tmp_path / "released" / JOURNAL).read_text().splitlines()[0])
    assert "r2_weight" not in json.dumps(header)
    with pytest.raises(HeadscoreError, match="unknown r2 weight"):
        EstimateOptions(r2_weight="tip")
