"""Answer metrics with LongBench's conventions: normalization, QA F1, ROUGE-1 recall, ROUGE-L, exact match.

All metrics take plain strings and return a float in [0, 1]. Text is normalized first (`normalize_answer`):
lowercase, punctuation removed, the articles a/an/the removed, whitespace collapsed; tokens are the
whitespace-separated words of the normalized text. `best_over` takes the best score over several gold answers,
as LongBench does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from headscore.core.errors import HeadscoreError

__all__ = [
    "METRICS",
    "best_over",
    "contains_all",
    "contains_match",
    "exact_match",
    "get_metric",
    "normalize_answer",
    "qa_f1",
    "rouge1_recall",
    "rouge_l",
    "score_answers",
    "string_match",
    "string_match_all",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse runs of whitespace to one space."""
    text = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split()


def _overlap(prediction: list[str], reference: list[str]) -> int:
    """Number of shared tokens, each counted at most as often as it appears in both (clipped counts)."""
    return sum((Counter(prediction) & Counter(reference)).values())


def qa_f1(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between the normalized prediction and ground truth (0.0 when either is empty)."""
    pred, gold = _tokens(prediction), _tokens(ground_truth)
    return _f_measure(_overlap(pred, gold), len(pred), len(gold))


def _f_measure(matched: int, predicted: int, reference: int) -> float:
    """F1 = 2PR / (P + R) with P = matched / predicted, R = matched / reference; 0.0 when nothing matched."""
    if matched == 0:
        return 0.0
    precision, recall = matched / predicted, matched / reference
    return 2 * precision * recall / (precision + recall)


def rouge1_recall(prediction: str, reference: str) -> float:
    """Share of the reference's normalized tokens found in the prediction (clipped counts; 0.0 if empty)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not ref:
        return 0.0
    return _overlap(pred, ref) / len(ref)


def rouge1_recall_stemmed(prediction: str, reference: str) -> float:
    """ROUGE-1 recall of `rouge_score` with the Porter stemmer (`RougeScorer(['rouge1'], use_stemmer=True)
    .score(reference, prediction)`), Retrieval_Head's success test: its own tokenizer (lowercase, runs of
    letters and digits), tokens longer than 3 characters stemmed."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(reference, prediction)["rouge1"].recall


def rouge1_f_stemmed(prediction: str, reference: str) -> float:
    """ROUGE-1 F-measure of `rouge_score` with the Porter stemmer (`RougeScorer([...], use_stemmer=True)
    .score(reference, prediction)['rouge1'].fmeasure`): the needle-in-a-haystack score HeadKV, PyramidKV and
    SnapKV log (× 10)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(reference, prediction)["rouge1"].fmeasure


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: LCS of the normalized token sequences, F = 2PR / (P + R) (0.0 when either is empty)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    return _f_measure(_lcs_length(pred, ref), len(pred), len(ref))


def _as_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals a normalized answer, else 0.0 (empty answers never match)."""
    pred = normalize_answer(prediction)
    return float(any(pred == a for a in map(normalize_answer, _as_list(answers)) if a))


def contains_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if some normalized answer occurs in the normalized prediction as a whole-word phrase, else 0.0.

    "smoked paprika" is contained in "it is smoked paprika." but "12" is not contained in "123".
    Empty answers never match.
    """
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {a} " in pred for a in map(normalize_answer, _as_list(answers)) if a))


def contains_all(prediction: str, answers: str | Sequence[str]) -> float:
    """Fraction of the (non-empty) answers contained in the prediction, as `contains_match` tests each one.

    For questions with several expected answers (all values of a key, all variables of a chain).
    """
    wanted = [a for a in _as_list(answers) if normalize_answer(a)]
    return sum(contains_match(prediction, [a]) for a in wanted) / len(wanted) if wanted else 0.0


def string_match(prediction: str, answer: str) -> float:
    """RULER's test: 1.0 if the answer occurs in the prediction, case-insensitive, with no other normalization."""
    return float(answer.lower() in prediction.lower())


def string_match_all(prediction: str, answers: str | Sequence[str]) -> float:
    """RULER's `string_match_all` for one prediction: the share of the answers that `string_match` finds
    (0.0 without answers). Its `string_match_part` is `string_match` at best over the answers."""
    wanted = _as_list(answers)
    return sum(string_match(prediction, a) for a in wanted) / len(wanted) if wanted else 0.0


def best_over(metric: Callable[[str, str], float], prediction: str, answers: str | Sequence[str]) -> float:
    """max(metric(prediction, answer) for answer in answers); 0.0 when there are no answers."""
    return max((metric(prediction, a) for a in _as_list(answers)), default=0.0)


METRICS: dict[str, Callable[[str, str], float]] = {
    "qa_f1": qa_f1,
    "rouge1_recall": rouge1_recall,
    "rouge_l": rouge_l,
    "exact_match": lambda p, a: exact_match(p, [a]),
    "contains": lambda p, a: contains_match(p, [a]),
    "string_match_part": string_match,
}
# metrics of all the answers at once (the others are the best over the answers)
AGGREGATES: dict[str, Callable[[str, str | Sequence[str]], float]] = {
    "contains_all": contains_all,
    "string_match_all": string_match_all,
}


def get_metric(name: str) -> Callable[[str, str], float]:
    """The pairwise metric `(prediction, answer) -> float` called `name` (a key of METRICS)."""
    try:
        return METRICS[name]
    except KeyError:
        known = ", ".join(sorted([*METRICS, *AGGREGATES]))
        raise HeadscoreError(f"unknown metric {name!r} (known: {known})") from None


def score_answers(metric: str, prediction: str, answers: str | Sequence[str]) -> float:
    """Score a prediction against gold answers with the metric called `metric`.

    `contains_all` and `string_match_all` score the fraction of answers found; every other metric is the best
    over the answers.
    """
    if metric in AGGREGATES:
        return AGGREGATES[metric](prediction, answers)
    return best_over(get_metric(metric), prediction, answers)
