"""`niah-official`: the authors' needle-in-a-haystack prompt, scores, stop rule and heatmaps.

The reference below re-implements, in plain Python, the steps of HeadKV's `run_needle_in_haystack.py`
(`read_context_files`, `encode_and_trim`, `insert_needle`, `generate_prompt`) and the two scores of their
code (`evaluate_and_log`'s ROUGE-1 × 10, `run_needle_visulize.py`'s word overlap), without headscore's helpers.
"""

from __future__ import annotations

import glob

import pandas as pd
import pytest
from rouge_score import rouge_scorer

from headscore.core.errors import HeadscoreError
from headscore.core.haystack import load_haystack
from headscore.core.model import load_tokenizer
from headscore.evaluation.evaluate import stop_tokens
from headscore.evaluation.tasks import get_task, score, task_samples
from headscore.evaluation.tasks.niah_official import overlap_score, rouge_score_x10
from headscore.study.report import niah_official_section

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "The best thing to do in San Francisco is: "


def their_prompt(enc, haystack_dir, context_length, depth_percent, context_lengths, period_tokens):
    """LLMNeedleHaystackTester's steps for one (length, depth). Files are read in sorted order (theirs: glob's
    order, which the file system decides; headscore reads a folder sorted by name)."""
    context = ""
    while len(enc.encode(context)) < max(context_lengths):  # read_context_files
        for file in sorted(glob.glob(f"{haystack_dir}/*.txt")):
            with open(file) as f:
                context += f.read()
    tokens = enc.encode(context)  # encode_and_trim
    if len(tokens) > context_length:
        context = enc.decode(tokens[:context_length])
    tokens_needle = enc.encode(NEEDLE)  # insert_needle
    tokens_context = enc.encode(context)
    context_length -= 200
    if len(tokens_context) + len(tokens_needle) > context_length:
        tokens_context = tokens_context[:context_length - len(tokens_needle)]
    if depth_percent == 100:
        tokens_new_context = tokens_context + tokens_needle
    else:
        insertion_point = int(len(tokens_context) * (depth_percent / 100))
        tokens_new_context = tokens_context[:insertion_point]
        while tokens_new_context and tokens_new_context[-1] not in period_tokens:
            insertion_point -= 1
            tokens_new_context = tokens_context[:insertion_point]
        tokens_new_context += tokens_needle + tokens_context[insertion_point:]
    new_context = enc.decode(tokens_new_context)
    return (f"<|im_start|> This is a very long story book: <book> {new_context} </book>.\n Based on the content "
            f"of the book, Question: {QUESTION}\nAnswer:")  # generate_prompt


@pytest.fixture(scope="module")
def small_haystack(tmp_path_factory):
    """Three essay slices: short enough that the longest length repeats the folder (their token loop)."""
    text = load_haystack(None).text
    folder = tmp_path_factory.mktemp("essays")
    for name, (start, size) in {"b.txt": (0, 1500), "a.txt": (40_000, 1200), "c.txt": (90_000, 1800)}.items():
        (folder / name).write_text(text[start:start + size], encoding="utf-8")
    return folder


@pytest.mark.parametrize("which", ["smollm2", "bos"])
def test_prompt_is_the_authors(which, tokenizer, bos_tokenizer, small_haystack):
    enc = tokenizer if which == "smollm2" else bos_tokenizer
    lengths = [300, 1400]
    task = get_task("niah-official", lengths=lengths, haystack=str(small_haystack))
    samples = task_samples(task, enc)
    depths = [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]  # np.round(np.linspace(0, 100, 10)).astype(int)
    assert [(s.target_length, s.depth) for s in samples] == [(n, float(d)) for n in lengths for d in depths]
    periods = [enc.get_vocab()["."]]  # what their hard-coded lists hold (Llama-3 [13]; Mistral adds '▁.')
    for sample in samples:
        expected = their_prompt(enc, small_haystack, sample.target_length, int(sample.depth), lengths, periods)
        assert sample.prompt == expected, sample.id
        assert sample.length == len(enc(expected)["input_ids"])  # tokenized with the special tokens, as theirs
        assert (sample.max_new_tokens, sample.stop, sample.template) == (30, "newline-token", "raw")
    if which == "bos":  # their decoded text keeps BOS strings: at the start and just before the needle
        assert samples[3].prompt.count("<s>") >= 2 and "<s>\nThe best thing" in samples[3].prompt


def test_scores_are_their_formulas_on_hand_examples():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)  # evaluate_and_log's scorer
    expected = "eat a sandwich and sit in Dolores Park on a sunny day.".lower().split()
    cases = {
        "Eat a sandwich and sit in Dolores Park on a sunny day.": 1.0,  # every distinct word
        "to eat a sandwich in Dolores Park.": 5 / 11,  # eat, a, sandwich, in, dolores ('park.' is not 'park')
        "": 0.0,
        "I do not know": 0.0,
    }
    for response, by_hand in cases.items():
        theirs = len(set(response.lower().split()).intersection(set(expected))) / len(set(expected))
        assert overlap_score(response) == pytest.approx(theirs) == pytest.approx(by_hand)
        logged = scorer.score(NEEDLE, response)["rouge1"].fmeasure * 10 if len(response) != 0 else 0.0
        assert rouge_score_x10(response) == pytest.approx(logged)
    # 'eat a sandwich' against the needle's 21 ROUGE tokens: P = 1, R = 3/21, F = 2PR / (P + R) = 1/4
    assert rouge_score_x10("eat a sandwich") == pytest.approx(2.5)
    assert rouge_score_x10("Eating sandwiches") == pytest.approx(10 * 4 / 23)  # stemmed: eat, sandwich; R = 2/21


def test_sample_scores_stop_rule_and_settings(tokenizer, small_haystack):
    overlap = task_samples(get_task("niah-official", lengths=[300], depths=[50], haystack=str(small_haystack)),
                           tokenizer)[0]
    rouge = task_samples(get_task("niah-official", lengths=[300], depths=[50], haystack=str(small_haystack),
                                  score_as="rouge"), tokenizer)[0]
    response = "to eat a sandwich in Dolores Park."
    assert score(overlap, response) == pytest.approx(5 / 11)
    assert score(rouge, response) == pytest.approx(rouge_score_x10(response) / 10)
    # eos_token_id=[tokenizer.eos_token_id, tokenizer.encode("\n", add_special_tokens=False)[-1]], from the first
    # new token on (no line-break-after-the-answer rule)
    eos, line_end = stop_tokens(overlap, tokenizer, {1, 2, 3}, {4})
    assert eos == {tokenizer.eos_token_id, tokenizer.encode("\n", add_special_tokens=False)[-1]} and not line_end
    with pytest.raises(HeadscoreError, match="unknown score 'f1'"):
        get_task("niah-official", score_as="f1")
    with pytest.raises(HeadscoreError, match="has no setting samples_per_length"):
        get_task("niah-official", samples_per_length=2)


def test_default_lengths_run_to_the_models_context(tiny_folder, small_haystack):
    """Without lengths: from 1000 to the model's context in steps of 1000 (`length_step` changes the step, as
    their `--step`: 100 for Mistral); the tiny model's context is 1024 tokens."""
    enc = load_tokenizer(str(tiny_folder))
    samples = task_samples(get_task("niah-official", depths=[0], haystack=str(small_haystack)), enc)
    assert [s.target_length for s in samples] == [1000]
    samples = task_samples(get_task("niah-official", depths=[0], length_step=12, haystack=str(small_haystack)),
                           enc)
    assert [s.target_length for s in samples] == [1000, 1012, 1024]  # np.arange(1000, 1024 + 1, 12)
    assert max(s.length for s in samples) + 30 <= 1024  # the longest still fits with its 30 new tokens


def test_heatmaps_and_their_numbers_from_a_small_results_table(tmp_path):
    """The report's niah-official section from a table written here: one figure per budget (full beside each
    method) and one for the methods without a budget; both of their numbers per method and budget."""
    rows = []
    answers = {"full": "eat a sandwich and sit in Dolores Park on a sunny day.", "snapkv": "eat a sandwich",
               "headkv-r2": "sit in Dolores Park", "razor-k5": ""}
    for method, budgets in (("full", [None]), ("snapkv", [64, 128]), ("headkv-r2", [64, 128]),
                            ("razor-k5", [None])):
        for budget in budgets:
            for length in (1000, 2000, 3000):
                for depth in (0.0, 50.0, 100.0):
                    rows.append({"task": "niah-official", "method": method, "budget": budget, "target_length": length,
                                 "depth": depth, "prediction": answers[method] if depth < 100 else None,
                                 "score": 0.0})
    rows.append({"task": "niah", "method": "snapkv", "budget": 64, "target_length": 1000, "depth": 0.0,
                 "prediction": "x", "score": 1.0})
    lines = niah_official_section(pd.DataFrame(rows), tmp_path, "tiny")
    text = "".join(lines)
    for name in ("niah_official_B64.png", "niah_official_B128.png", "niah_official_all.png"):
        path = tmp_path / "niah-official" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(niah-official/{name})" in text
    for method, budget in (("full", "all"), ("snapkv", 64), ("headkv-r2", 128), ("razor-k5", "all")):
        answer = answers[method]
        overlap = (2 * overlap_score(answer) + overlap_score("")) / 3  # depth 100 answered nothing
        rouge = (2 * rouge_score_x10(answer) + 0.0) / 3
        assert f"| `{method}` | {budget} | {overlap:.3f} | {rouge:.3f} |" in text
    assert niah_official_section(pd.DataFrame(rows[-1:]), tmp_path, "tiny") == []
