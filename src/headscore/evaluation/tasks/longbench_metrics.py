"""LongBench's metrics and scorer, as LongBench's `metrics.py` / `eval.py` compute them (HeadKV's and
KVCache-Factory's `eval.py` use the same code).

Per sample: the first-line post-processing for trec, triviaqa and samsum (`first_line`), then the dataset's
metric against every reference answer, the maximum kept. Per dataset: the mean × 100 rounded to 2 decimals
(`corpus_score`); LongBench-E splits it into the length buckets 0-4k, 4-8k and 8k+ of the record's `length`
field (`length_bucket`). Quirks of the original code are reproduced on purpose and named where they occur.

Metric names (the `Sample.metric` of a LongBench sample is `longbench:<name>`):
`qa_f1`, `rouge`, `classification`, `retrieval`, `count`, `code_sim`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from rapidfuzz import fuzz
from rouge import Rouge

from headscore.core.errors import HeadscoreError
from headscore.core.metrics import qa_f1

PREFIX = "longbench:"
_DIGITS = re.compile(r"\d+")
_PARAGRAPH = re.compile(r"Paragraph (\d+)")


def first_line(prediction: str) -> str:
    """The first line after leading newlines (LongBench's post-processing for trec, triviaqa, samsum)."""
    return prediction.lstrip("\n").split("\n")[0]


def rouge_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """ROUGE-L F of the `rouge` package (summary level, sentences split at '.', case-sensitive, distinct
    words), as LongBench takes it; any error of the package (e.g. an empty prediction) scores 0.0."""
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # LongBench's bare `except: return 0.0`: empty texts, recursion limits, ...
        return 0.0
    return float(scores["rouge-l"]["f"])


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """trec: the classes named (as substrings) in the prediction; a class that is a strict substring of the
    ground truth is dropped; 1 / (number left) if the ground truth is among them, else 0.

    The drop loop removes from the list it iterates over, so the element after a removed one is not checked
    (LongBench's code, kept). LongBench's fallback for "no class matched" sits behind `em_match_list != 0`,
    a list compared with an int and so always true: the fallback never runs, and none is implemented here.
    """
    if not all_classes:
        raise HeadscoreError("the classification metric needs the record's 'all_classes'")
    matched = [name for name in all_classes if name in prediction]
    for term in matched:  # mutating while iterating, exactly as LongBench does
        if term in ground_truth and term != ground_truth:
            matched.remove(term)
    return 1.0 / len(matched) if ground_truth in matched else 0.0


def retrieval_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """passage_retrieval_en: the share of the prediction's digit runs equal to the gold paragraph number
    (the first `Paragraph N` of the ground truth); 0.0 when the prediction holds no digits."""
    found = _PARAGRAPH.findall(ground_truth)
    if not found:
        raise HeadscoreError(f"retrieval answer {ground_truth!r} names no 'Paragraph N'")
    numbers = _DIGITS.findall(prediction)
    return sum(n == found[0] for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """passage_count: the share of the prediction's digit runs equal to the ground truth; 0.0 if none."""
    numbers = _DIGITS.findall(prediction)
    return sum(n == str(ground_truth) for n in numbers) / len(numbers) if numbers else 0.0


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio`: 100 for equal strings, 0 if one is empty, else the indel similarity
    (rapidfuzz, = python-Levenshtein's ratio) × 100 rounded to an integer (Python's round)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(fuzz.ratio(a, b)))


def code_sim_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """lcc, repobench-p: the first line (after leading newlines) containing no backtick, '#' or '//' anywhere
    ("" if none), compared with the ground truth by `fuzz_ratio` / 100. Indentation is not stripped."""
    line = next((x for x in prediction.lstrip("\n").split("\n") if "`" not in x and "#" not in x and "//" not in x),
                "")
    return fuzz_ratio(line, ground_truth) / 100


def qa_f1_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """LongBench's qa_f1_score: headscore's `core.metrics.qa_f1` (same normalization, same bag-of-tokens F1)."""
    return qa_f1(prediction, ground_truth)


METRICS: dict[str, Callable[[str, str, Sequence[str] | None], float]] = {
    "qa_f1": qa_f1_score,
    "rouge": rouge_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def score_record(metric: str, prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] | None = None,
                 first_line_only: bool = False) -> float:
    """One sample as LongBench's `scorer` scores it, in [0, 1]: optional first-line post-processing, then the
    maximum of `metric` over the reference answers. `metric` may carry the `longbench:` prefix."""
    name = metric.removeprefix(PREFIX)
    if name not in METRICS:
        raise HeadscoreError(f"unknown LongBench metric {metric!r} (known: {', '.join(METRICS)})")
    if first_line_only:
        prediction = first_line(prediction)
    best = 0.0
    for answer in answers:
        best = max(best, METRICS[name](prediction, answer, all_classes))
    return best


def corpus_score(scores: Sequence[float]) -> float:
    """A dataset's score as LongBench reports it: mean per-sample score × 100, rounded to 2 decimals."""
    if not scores:
        raise HeadscoreError("no samples to score")
    return round(100 * sum(scores) / len(scores), 2)


BUCKETS = ("0-4k", "4-8k", "8k+")


def length_bucket(length: int) -> str:
    """LongBench-E's bucket of a record's `length` field (words for English): <4000, <8000, the rest."""
    return BUCKETS[0] if length < 4000 else BUCKETS[1] if length < 8000 else BUCKETS[2]
