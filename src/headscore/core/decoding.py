"""Greedy decoding's shared pieces: explicit stop rules (`StopRule`), the greedy pick of a batch of rows, and the
token ids whose text holds a line break. Every decode loop (estimate's scored steps, `compression.generation
.decode_rows` for evaluate and ablate) ends its rows with a `StopRule`; another rule is a subclass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from headscore.core.errors import HeadscoreError


@dataclass(frozen=True)
class StopRule:
    """When one row's greedy decoding ends (checked after every token, the stop token included in the answer).

    After `max_new_tokens` tokens; at an `eos` token; at a `line_end` token, unless `skip_leading_line_ends`
    and no other token came before it (leading line breaks do not end an answer). The first `min_new_tokens`
    tokens cannot be `eos` tokens (their logits are -inf, as transformers' `min_length` does). A rule with
    another test subclasses and overrides `finished`.
    """

    max_new_tokens: int
    eos: frozenset[int] = frozenset()
    line_end: frozenset[int] = frozenset()
    min_new_tokens: int = 0
    skip_leading_line_ends: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise HeadscoreError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        object.__setattr__(self, "eos", frozenset(self.eos))
        object.__setattr__(self, "line_end", frozenset(self.line_end))

    def finished(self, tokens: Sequence[int]) -> bool:
        """Whether a row that generated `tokens` (at least one) stops here."""
        last = tokens[-1]
        if len(tokens) >= self.max_new_tokens or last in self.eos:
            return True
        if last not in self.line_end:
            return False
        return not self.skip_leading_line_ends or any(token not in self.line_end for token in tokens[:-1])

    def banned(self, step: int) -> frozenset[int]:
        """Token ids the row may not pick at `step` (0-based)."""
        return self.eos if step < self.min_new_tokens else frozenset()


def greedy_pick(logits: torch.Tensor, rules: Sequence[StopRule], step: int) -> list[int]:
    """Greedy tokens of rows `logits` `[rows, vocab]` at `step`, each row's banned ids excluded (one sync)."""
    banned = [sorted(rule.banned(step)) for rule in rules]
    if any(banned):
        logits = logits.clone()
        for row, ids in enumerate(banned):  # rows, during the first min_new_tokens steps only
            if ids:
                logits[row, torch.tensor(ids, device=logits.device)] = float("-inf")
    return logits.argmax(dim=-1).tolist()


@lru_cache(maxsize=8)
def newline_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokens whose text holds a newline (each id decoded alone): answers end at a line break."""
    ids = list(range(len(tokenizer)))
    texts = tokenizer.batch_decode([[i] for i in ids])
    return frozenset(i for i, text in zip(ids, texts, strict=True) if "\n" in text)
