"""Per-head scores from captured attention rows: pure, vectorized tensor functions (no loop over heads).

`probs` is [steps, layers, heads, context]: at each scored step, every head's attention distribution over the
positions it sees (zeros at positions it cannot see). The answer span `[start, end)` holds N = end - start
positions of the prompt. Every function returns the [layers, heads] sum over the steps. The rules are a
registry (`SCORERS`, filled by `@score_rule(name)`), named by `estimate --method`.

The two rules are the authors' own:
- `r2` (HeadKV, `retrieval_head_detection_r2.py`, `retrieval_calculate`, FYYFU/HeadKV): at every step, for
  each of a head's top-N positions that lies inside the span, add `10 · weight / (N · A)`, where A is the
  answer's token count, `len(tokenizer(answer, add_special_tokens=False).input_ids)`. A trial scores at most
  `10 / N` (every step puts all its top-N weight in the span, over at most A steps). This is the version of
  commit 84e4c2b (2024-11-01), which also added the released score files (their per-trial maximum is 10 / N);
  the later commit 4c68d6b (2024-11-14), still at the head of the repository (0862a09), comments that line out
  for `weight / N` (L227–228). headscore keeps the formula that produced the released files.
- `retrieval` (Wu et al., `retrieval_head_detection.py`, nightdessert/Retrieval_Head): a head whose top-1
  position lies in the span and holds the token just generated adds `1 / N`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from headscore.core.errors import HeadscoreError

SCORERS: dict[str, Callable[..., torch.Tensor]] = {}


def score_rule(name: str) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register a score rule `(probs, span, tokens, prompt_ids) -> [layers, heads]` as `name`."""

    def add(rule: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        SCORERS[name] = rule
        return rule

    return add


def _span(span: tuple[int, int], context: int) -> tuple[int, int, int]:
    start, end = int(span[0]), int(span[1])
    if not 0 <= start < end <= context:
        raise HeadscoreError(f"answer span [{start}, {end}) is empty or outside the {context}-token context")
    return start, end, end - start


@score_rule("r2")
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


@score_rule("retrieval")
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


def scorer(method: str) -> Callable[..., torch.Tensor]:
    """The score function of `method` ('r2' or 'retrieval')."""
    if method not in SCORERS:
        raise HeadscoreError(f"unknown method '{method}': use one of {', '.join(SCORERS)}")
    return SCORERS[method]
