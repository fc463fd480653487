"""`niah-official`: the needle-in-a-haystack test as HeadKV's authors ran it (the paper's Fig. 5 and Fig. 8).

Their `run_needle_in_haystack.py` (FYYFU/HeadKV @ 0862a09, adapted from PyramidKV's, itself from
Long-Context-Data-Engineering) with `needle_llama3.sh` / `needle_mistral.sh`:
- haystack: the Paul Graham essays (`data/PaulGrahamEssays`, the same 49 files, byte for byte, as the default
  haystack here), concatenated and repeated whole until the text holds the longest length in tokens;
- needle `\\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny
  day.\\n`, question `The best thing to do in San Francisco is: `;
- placement: their `encode_and_trim` and `insert_needle` (200 tokens kept free, the needle at the last period
  token at or before the depth, special tokens kept as text: `core.prompts.OfficialHaystack`, counting tokens);
- prompt `<|im_start|> This is a very long story book: <book> {context} </book>.\\n Based on the content of the
  book, Question: {question}\\nAnswer:`, tokenized with the tokenizer's special tokens;
- lengths `np.arange(s, e + 1, step)`: 1000 to the model's context in steps of 1000 here (Llama-3: their
  1000..8000; Mistral: theirs is 1000..33000 in steps of 100); depths `np.round(np.linspace(0, 100, 10))`;
- greedy, at most 30 new tokens, ending at the tokenizer's EOS or its newline token
  (`tokenizer.encode("\\n", add_special_tokens=False)[-1]`) even as the first token; the response stripped.

Scores: their heatmaps (`run_needle_visulize.py`) plot `overlap_score`, the share of the distinct
lowercased words of `eat a sandwich and sit in dolores park on a sunny day.` found among the response's
whitespace-separated lowercased words (0..1, their colour scale); their run logs `rouge_score_x10`, the
stemmed ROUGE-1 F-measure of the response against the needle × 10 (0 for an empty response). A sample's score
is the first (`score_as="overlap"`) or the second / 10 (`score_as="rouge"`), so scores stay in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from headscore.core.errors import HeadscoreError
from headscore.core.haystack import load_haystack
from headscore.core.metrics import rouge1_f_stemmed
from headscore.core.model import load_geometry
from headscore.core.prompts import OfficialHaystack, encode_prompt
from headscore.evaluation.tasks.base import Sample, Task, register_task

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "The best thing to do in San Francisco is: "
EXPECTED = "eat a sandwich and sit in Dolores Park on a sunny day."  # run_needle_visulize.py's expected answer
PROMPT = ("<|im_start|> This is a very long story book: <book> {context} </book>.\n Based on the content of the "
          "book, Question: {question}\nAnswer:")
DEPTHS = (0.0, 11.0, 22.0, 33.0, 44.0, 56.0, 67.0, 78.0, 89.0, 100.0)  # np.round(np.linspace(0, 100, 10))
SCORES = ("overlap", "rouge")
STOP = "newline-token"  # base.STOP_RULES: the tokenizer's EOS or its newline token, from the first new token


def overlap_score(prediction: str) -> float:
    """Their heatmap's score: distinct expected words found among the response's words, over the distinct
    expected words (lowercased, split on whitespace; `day.` keeps its period)."""
    expected = set(EXPECTED.lower().split())
    return len(set(prediction.lower().split()) & expected) / len(expected)


def rouge_score_x10(prediction: str) -> float:
    """Their logged score: stemmed ROUGE-1 F-measure of the response against the needle × 10 (0 if empty)."""
    return rouge1_f_stemmed(prediction, NEEDLE) * 10 if prediction else 0.0


def official_lengths(max_context: int, step: int = 1000, start: int = 1000) -> list[int]:
    """`start, start + step, ...` up to the model's context (their `np.arange(s, e + 1, step)`)."""
    if step < 1 or start < 1:
        raise HeadscoreError(f"niah-official: lengths start at {start} in steps of {step}: both must be positive")
    lengths = list(range(start, max_context + 1, step))
    if not lengths:
        raise HeadscoreError(f"niah-official: the model's context ({max_context} tokens) is below {start}")
    return lengths


def model_context(tokenizer: Any) -> int:
    """The context of the model the tokenizer belongs to (its config's `max_position_embeddings`)."""

    try:
        context = load_geometry(str(tokenizer.name_or_path)).max_context
    except HeadscoreError:
        context = None
    if not context:
        raise HeadscoreError("niah-official: the model's context is unknown; give the lengths (--lengths)")
    return int(context)


@register_task("niah-official")
@dataclass
class NiahOfficialTask(Task):
    """One sample per (length, depth), lengths outermost.

    `lengths`: target lengths in tokens (default: 1000 to the model's context in steps of `length_step`);
    `depths`: needle depths in % (default: their ten); `haystack`: a haystack source (default: the Paul Graham
    essays); `score_as`: "overlap" (their heatmaps) or "rouge" (their logs, / 10).
    """

    lengths: Sequence[int] | None = None
    depths: Sequence[float] | None = None
    length_step: int = 1000
    haystack: str | None = None
    max_new_tokens: int = 30
    score_as: str = "overlap"

    def __post_init__(self) -> None:
        if self.score_as not in SCORES:
            raise HeadscoreError(f"niah-official: unknown score '{self.score_as}': use one of {', '.join(SCORES)}")

    def samples(self, tokenizer: Any) -> list[Sample]:
        lengths = list(self.lengths or official_lengths(model_context(tokenizer), self.length_step))
        depths = list(DEPTHS if self.depths is None else self.depths)
        if min(lengths) <= 0 or any(not 0 <= d <= 100 for d in depths):
            raise HeadscoreError("niah-official: lengths must be positive and depths within 0–100 %")
        hay = OfficialHaystack(tokenizer, load_haystack(self.haystack).text, max(lengths), count="tokens")
        samples = []
        for length in lengths:
            for depth in depths:
                context = hay.insert(NEEDLE, length, depth)[0]
                prompt = PROMPT.format(context=context, question=QUESTION)
                samples.append(Sample(
                    id=f"{self.name}-L{length}-D{depth:g}", task=self.name, context=context, question=QUESTION,
                    answers=[EXPECTED], metric=f"{self.name}:{self.score_as}", prompt=prompt,
                    length=len(encode_prompt(tokenizer, prompt, "raw")["input_ids"]), template="raw",
                    max_new_tokens=self.max_new_tokens, stop=STOP, target_length=length, depth=float(depth)))
        return samples

    def score(self, sample: Sample, prediction: str) -> float:
        return overlap_score(prediction) if self.score_as == "overlap" else rouge_score_x10(prediction) / 10
