"""Metrics on hand-worked examples (values computed by hand, not copied from the code's output)."""

from __future__ import annotations

import pytest

from headscore.core.errors import HeadscoreError
from headscore.core.metrics import (
    best_over,
    contains_all,
    contains_match,
    exact_match,
    get_metric,
    normalize_answer,
    qa_f1,
    rouge1_recall,
    rouge_l,
    score_answers,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("The Cat, sat on a mat!", "cat sat on mat"),
    ("  An   apple\tand\nTHE pear. ", "apple and pear"),
    ("theater anthem", "theater anthem"),  # articles only as whole words
    ("", ""),
    ("...", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_qa_f1_hand_worked():
    # pred tokens: [paris, is, capital] ; gold: [paris] -> common 1, P = 1/3, R = 1, F1 = 2*(1/3)/(4/3) = 0.5
    assert qa_f1("Paris is the capital.", "Paris") == pytest.approx(0.5)
    # pred [smoked, paprika] gold [smoked, paprika, from, valencia]: P = 1, R = 1/2, F1 = 2/3
    assert qa_f1("smoked paprika", "Smoked paprika from Valencia") == pytest.approx(2 / 3)
    # clipped counts: "dog dog dog" vs "dog cat": common = 1, P = 1/3, R = 1/2, F1 = 0.4
    assert qa_f1("dog dog dog", "dog cat") == pytest.approx(0.4)
    assert qa_f1("The answer.", "answer") == pytest.approx(1.0)
    assert qa_f1("blue", "red") == 0.0


def test_rouge1_recall_hand_worked():
    # reference [smoked, paprika, from, valencia]; prediction has smoked, paprika, valencia -> 3/4
    assert rouge1_recall("It is smoked paprika, Valencia style", "smoked paprika from Valencia") == 0.75
    # clipped: reference [go, go, stop] vs prediction [go] -> 1/3
    assert rouge1_recall("go", "go go stop") == pytest.approx(1 / 3)
    assert rouge1_recall("go go go go", "go go stop") == pytest.approx(2 / 3)


def test_rouge_l_hand_worked():
    # pred [cat, sat, on, mat], ref [cat, was, on, mat]: LCS = cat on mat = 3; P = R = 3/4, F = 0.75
    assert rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(0.75)
    # order matters for LCS: pred [y, x] ref [x, y] -> LCS 1, P = R = 1/2
    assert rouge_l("y x", "x y") == pytest.approx(0.5)
    # pred [x, y, z, w] ref [y, w]: LCS 2, P = 1/2, R = 1, F = 2/3
    assert rouge_l("x y z w", "y w") == pytest.approx(2 / 3)


def test_exact_and_contains_match():
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("It is the Eiffel Tower.", ["eiffel tower"]) == 0.0
    assert contains_match("It is the Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert contains_match("The number is 123.", ["12"]) == 0.0  # whole words only
    assert contains_match("The number is 12.", ["7", "12"]) == 1.0
    assert exact_match("12", "12") == 1.0  # a single answer string is accepted too


@pytest.mark.parametrize("metric", [qa_f1, rouge1_recall, rouge_l])
def test_empty_strings_score_zero(metric):
    assert metric("", "") == 0.0
    assert metric("", "paris") == 0.0
    assert metric("paris", "") == 0.0
    assert metric("the a an", "the") == 0.0  # only articles: empty after normalization


def test_empty_matches():
    assert exact_match("", [""]) == 0.0
    assert contains_match("anything", [""]) == 0.0
    assert exact_match("x", []) == 0.0


def test_best_over():
    assert best_over(qa_f1, "Paris", ["London", "paris", "Paris France"]) == 1.0
    # rouge1_recall against [a b c d] = 1/4, against [b x] = 1/2 -> best 1/2
    assert best_over(rouge1_recall, "b", ["a b c d", "b x"]) == pytest.approx(0.5)
    assert best_over(qa_f1, "anything", []) == 0.0


def test_get_metric():
    assert get_metric("qa_f1")("paris", "Paris") == 1.0
    assert get_metric("contains")("it is 12", "12") == 1.0
    with pytest.raises(HeadscoreError, match="unknown metric"):
        get_metric("bleu")


def test_contains_all_and_score_answers():
    # 2 of the 3 values appear -> 2/3
    assert contains_all("The numbers are 4417 and 9051.", ["4417", "9051", "2288"]) == pytest.approx(2 / 3)
    assert contains_all("nothing", []) == 0.0
    assert score_answers("contains_all", "4417 9051 2288", ["4417", "9051", "2288"]) == 1.0
    # best over answers for the other metrics: qa_f1("paris france", "paris") = 2*(1/2)*1/(3/2) = 2/3
    assert score_answers("qa_f1", "Paris, France", ["London", "Paris"]) == pytest.approx(2 / 3)
    with pytest.raises(HeadscoreError, match="contains_all"):
        score_answers("bleu", "x", ["x"])
