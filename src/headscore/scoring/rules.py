"""Per-head scores from captured attention rows: pure, vectorized tensor functions (no loop over heads).

`probs` is [steps, layers, heads, context]: at each scored step, every head's attention distribution over the
positions it sees (zeros at positions it cannot see). The answer span `[start, end)` holds N = end - start
positions of the prompt. Every function returns the [layers, heads] sum over the steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from headscore.core.errors import HeadscoreError

METHODS = ("r2", "retrieval")


def _span(span: tuple[int, int], context: int) -> tuple[int, int, int]:
    start, end = int(span[0]), int(span[1])
    if not 0 <= start < end <= context:
        raise HeadscoreError(f"answer span [{start}, {end}) is empty or outside the {context}-token context")
    return start, end, end - start


def r2_scores(probs: torch.Tensor, span: tuple[int, int], tokens: torch.Tensor | None = None,
              prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Retrieval-reasoning (HeadKV): each head's top-N positions per step; every one inside the span adds
    its attention weight / N. `tokens` and `prompt_ids` are unused (same signature as `retrieval_scores`).
    """
    start, end, n = _span(span, probs.shape[-1])
    values, positions = probs.topk(n, dim=-1)  # [steps, layers, heads, N]
    inside = (positions >= start) & (positions < end)
    return (values * inside).sum(dim=(0, -1)) / n


def retrieval_scores(probs: torch.Tensor, span: tuple[int, int], tokens: torch.Tensor,
                     prompt_ids: torch.Tensor) -> torch.Tensor:
    """Retrieval heads (Wu et al.): a head whose top-1 position at a step lies in the span and holds the token
    generated at that step (`tokens` [steps]) adds 1/N. `prompt_ids` [prompt] are the prompt's token ids.
    """
    start, end, n = _span(span, probs.shape[-1])
    top = probs.argmax(dim=-1)  # [steps, layers, heads]
    inside = (top >= start) & (top < end)
    held = prompt_ids[top.clamp(max=prompt_ids.shape[0] - 1)]
    copies = held == tokens.to(held.device).view(-1, *([1] * (top.ndim - 1)))
    return (inside & copies).sum(dim=0).to(probs.dtype) / n


SCORERS: dict[str, Callable[..., torch.Tensor]] = {"r2": r2_scores, "retrieval": retrieval_scores}


def scorer(method: str) -> Callable[..., torch.Tensor]:
    """The score function of `method` ('r2' or 'retrieval')."""
    if method not in SCORERS:
        raise HeadscoreError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    return SCORERS[method]
