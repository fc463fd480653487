"""Per-head scores from captured attention rows: pure, vectorized tensor functions (no loop over heads).

`probs` is [steps, layers, heads, context]: at each scored step, every head's attention distribution over the
positions it sees (zeros at positions it cannot see). The answer span `[start, end)` holds N = end - start
positions of the prompt. Every function returns the [layers, heads] sum over the steps.

A rule is one registry entry (`RULES`, filled by `@score_rule(name, ...)`, looked up by `get_rule` when used):
a `ScoreRule` holding its tensor function and everything that depends on it: the decode-mode success check
(`success`: "f1", QA F1 of the response, or "rouge", ROUGE-1 recall of the answer), the decode length
(`decode_length`: "answer", the answer's A tokens, or "span", the N tokens of the answer span), and its naming
(`scores_name`: the name of its scores in `--scores NAME=FILE` and the method `headkv-NAME`; `folder`: where a
study writes them). `estimate --rule NAME`, `allocate` and `evaluate` need nothing else to use a new rule.

The two rules are the authors' own:
- `r2` (HeadKV, `retrieval_head_detection_r2.py`, `retrieval_calculate`, FYYFU/HeadKV): at every step, for
  each of a head's top-N positions that lies inside the span, add `10 · weight / (N · A)`, where A is the
  answer's token count, `len(tokenizer(answer, add_special_tokens=False).input_ids)`. A trial scores at most
  `10 / N` (every step puts all its top-N weight in the span, over at most A steps). This is the version of
  commit 84e4c2b (2024-11-01), which also added the released score files (their per-trial maximum is 10 / N);
  the later commit 4c68d6b (2024-11-14), still at the head of the repository (0862a09), comments that line out
  for `weight / N` (L227–228). headscore keeps the formula that produced the released files by default;
  `estimate --r2-weight head` gives the head's `weight / N` (per-trial maximum 1; `r2_weight_scale`).
- `retrieval` (Wu et al., `retrieval_head_detection.py`, nightdessert/Retrieval_Head): a head whose top-1
  position lies in the span and holds the token just generated adds `1 / N`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from headscore.core.errors import HeadscoreError

SUCCESS_CHECKS = ("f1", "rouge")
# the r2 weight per hit: "released" 10 · weight / (N · A) (commit 84e4c2b, the released score files), "head"
# weight / N (commit 4c68d6b, still at the repository's head)
R2_WEIGHTS = ("released", "head")
DECODE_LENGTHS = ("answer", "span")


@dataclass(frozen=True)
class ScoreRule:
    """A score rule and all that depends on it.

    `score(probs [steps, layers, heads, context], span, tokens [steps], prompt_ids [prompt], *, answer_tokens)`
    -> [layers, heads]; `success`: "f1" (QA F1 > `f1_threshold`) or "rouge" (ROUGE-1 recall > `rouge_threshold`);
    `decode_length`: "answer" (decode at most A tokens) or "span" (at most the span's N tokens);
    `scores_name`: its scores in evaluate / tune (`--scores NAME=FILE`, method `headkv-NAME`);
    `description`: one line for metadata.json.
    """

    name: str
    score: Callable[..., torch.Tensor]
    success: str
    decode_length: str
    scores_name: str
    description: str

    def __post_init__(self) -> None:
        if self.success not in SUCCESS_CHECKS or self.decode_length not in DECODE_LENGTHS:
            raise ValueError(f"score rule {self.name}: success in {SUCCESS_CHECKS}, decode_length in "
                             f"{DECODE_LENGTHS}")

    def succeeded(self, f1: float, rouge: float, f1_threshold: float, rouge_threshold: float) -> bool:
        """The decode-mode success check of a response with QA F1 `f1` and ROUGE-1 recall `rouge`."""
        return f1 > f1_threshold if self.success == "f1" else rouge > rouge_threshold

    def decode_steps(self, answer_tokens: int, span_tokens: int) -> int:
        """How many tokens decode mode generates at most (before `max_new_tokens` caps it)."""
        return answer_tokens if self.decode_length == "answer" else span_tokens

    @property
    def folder(self) -> str:
        """The folder a study writes this rule's scores to: `scores-NAME`."""
        return f"scores-{self.name}"


RULES: dict[str, ScoreRule] = {}


def score_rule(name: str, *, success: str, decode_length: str, description: str,
               scores_name: str | None = None) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register a score function `(probs, span, tokens, prompt_ids, *, answer_tokens) -> [layers,
    heads]` as the rule `name` (`scores_name` defaults to `name`)."""

    def add(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        RULES[name] = ScoreRule(name=name, score=function, success=success, decode_length=decode_length,
                                scores_name=scores_name or name, description=description)
        return function

    return add


def get_rule(name: str) -> ScoreRule:
    """The registered rule `name`; an unknown name is an error listing the known ones."""
    if name not in RULES:
        raise HeadscoreError(f"unknown score rule '{name}': use one of {', '.join(RULES)}")
    return RULES[name]


def rule_for_scores(scores_name: str) -> ScoreRule | None:
    """The rule whose scores are named `scores_name` in evaluate / tune (`r` -> retrieval), if any."""
    return next((rule for rule in RULES.values() if rule.scores_name == scores_name), None)


def _span(span: tuple[int, int], context: int) -> tuple[int, int, int]:
    start, end = int(span[0]), int(span[1])
    if not 0 <= start < end <= context:
        raise HeadscoreError(f"answer span [{start}, {end}) is empty or outside the {context}-token context")
    return start, end, end - start


@score_rule("r2", success="f1", decode_length="answer", scores_name="r2",
            description="10 * weight / (N * A) per top-N position inside the span, summed over steps (HeadKV r2)")
def r2_scores(probs: torch.Tensor, span: tuple[int, int], tokens: torch.Tensor | None = None,
              prompt_ids: torch.Tensor | None = None, *, answer_tokens: int) -> torch.Tensor:
    """Retrieval-reasoning (HeadKV): each head's top-N positions per step; every one inside the span adds
    `10 · weight / (N · A)`, A = `answer_tokens` (the answer's token count without special tokens).
    `tokens` and `prompt_ids` are unused (same signature as `retrieval_scores`).
    """
    start, end, n = _span(span, probs.shape[-1])
    if answer_tokens < 1:
        raise HeadscoreError(f"the answer has {answer_tokens} tokens; r2 needs at least one")
    values, positions = probs.topk(n, dim=-1)  # [steps, layers, heads, N]
    inside = (positions >= start) & (positions < end)
    return (values * inside).sum(dim=(0, -1)) * (10.0 / (n * answer_tokens))


def r2_weight_scale(weight: str, answer_tokens: int) -> float:
    """The factor that turns a trial's `r2_scores` (the released 10 · weight / (N · A) per hit) into `weight`'s
    formula: 1 for "released", A / 10 for "head" (weight / N per hit; the sum over hits is linear in the factor).
    """
    if weight not in R2_WEIGHTS:
        raise HeadscoreError(f"unknown r2 weight '{weight}': use one of {', '.join(R2_WEIGHTS)}")
    return 1.0 if weight == "released" else answer_tokens / 10.0


@score_rule("retrieval", success="rouge", decode_length="span", scores_name="r",
            description="1 / N per step whose top-1 position is in the span and holds the generated token "
                        "(Retrieval-Head)")
def retrieval_scores(probs: torch.Tensor, span: tuple[int, int], tokens: torch.Tensor,
                     prompt_ids: torch.Tensor, *, answer_tokens: int = 1) -> torch.Tensor:
    """Retrieval heads (Wu et al.): a head whose top-1 position at a step lies in the span and holds the token
    generated at that step (`tokens` [steps]) adds 1/N. `prompt_ids` [prompt] are the prompt's token ids;
    `answer_tokens` is unused (same signature as `r2_scores`).
    """
    start, end, n = _span(span, probs.shape[-1])
    top = probs.argmax(dim=-1)  # [steps, layers, heads]
    inside = (top >= start) & (top < end)
    held = prompt_ids[top.clamp(max=prompt_ids.shape[0] - 1)]
    copies = held == tokens.to(held.device).view(-1, *([1] * (top.ndim - 1)))
    return (inside & copies).sum(dim=0).to(probs.dtype) / n
