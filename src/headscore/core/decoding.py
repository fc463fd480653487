"""Greedy decoding's shared pieces: explicit stop rules (`StopRule`), the greedy pick of a batch of rows, and the
token ids whose text holds a line break. Every decode loop (estimate's scored steps, `compression.generation
.decode_rows` for evaluate and ablate) ends its rows with a `StopRule`; another rule is a subclass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from headscore.core.attention import use_attention
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry, input_device, with_cache


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

    def stop_length(self, tokens: Sequence[int]) -> int | None:
        """How many of `tokens` a row with this rule generates: the first length where it stops, or None when
        it has not stopped within `tokens`."""
        return next((length for length in range(1, len(tokens) + 1) if self.finished(tokens[:length])), None)

    def picks_like(self, other: StopRule) -> bool:
        """Whether rows with the two rules pick the same greedy tokens (equal banned ids at every step)."""
        bans = (self.min_new_tokens, self.eos if self.min_new_tokens else frozenset())
        return bans == (other.min_new_tokens, other.eos if other.min_new_tokens else frozenset())


@dataclass(frozen=True)
class EveryRule(StopRule):
    """Ends a row once each of `rules` has stopped, each at its own first stop (`StopRule.stop_length`): greedy
    tokens do not depend on when a row stops, so one decode gives every rule's tokens (rule `i`'s are the first
    `rules[i].stop_length(tokens)`). Build it with `EveryRule.of(rules)` (rules that pick alike, `picks_like`).
    """

    rules: tuple[StopRule, ...] = ()

    @classmethod
    def of(cls, rules: Sequence[StopRule]) -> StopRule:
        """One rule that ends where the last of `rules` ends (the rule itself when there is one)."""
        if not rules:
            raise HeadscoreError("EveryRule needs at least one stop rule")
        if len(rules) == 1:
            return rules[0]
        if not all(rule.picks_like(rules[0]) for rule in rules):
            raise HeadscoreError("stop rules that ban different tokens pick different greedy tokens; decode "
                                 "them apart")
        return cls(max(rule.max_new_tokens for rule in rules), rules[0].eos, min_new_tokens=rules[0].min_new_tokens,
                   rules=tuple(rules))

    def finished(self, tokens: Sequence[int]) -> bool:
        return all(rule.stop_length(tokens) is not None for rule in self.rules)


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


# called with (row, its position in the cache, its tokens, its step seconds) just before a finished row leaves
FinishHook = Callable[[int, int, list[int], list[float]], None]
# called with (step, the rows still decoding, their tokens picked at that step) after every pick
PickHook = Callable[[int, list[int], list[int]], None]


def greedy_decode(model: Any, cache: Any, logits: torch.Tensor, rules: Sequence[StopRule],
                  on_finish: FinishHook | None = None, on_select: Callable[[torch.Tensor], None] | None = None,
                  *, attention: str | None = None, forced: torch.Tensor | None = None,
                  before_forward: Callable[[], None] | None = None, on_pick: PickHook | None = None,
                  lengths: Sequence[int] | None = None, mask: torch.Tensor | None = None
                  ) -> tuple[list[list[int]], list[list[float]]]:
    """The one greedy decode loop (evaluate and ablate through `compression.generation.decode_rows`, estimate's
    scored steps): every row of `cache` from the last `logits` `[rows, vocab]` (or `[vocab]`, repeated for
    every row): `(tokens per row, seconds of each decode step the row took part in)`.

    Row `i` ends on `rules[i]`, checked after each of its tokens (the token that ends it included); a finished
    row is dropped from the batch (`cache.batch_select_indices`), so it costs no more work; `on_finish(row,
    position, tokens, seconds)` sees each row's cache state just before, `on_select(kept)` gets the kept
    positions whenever rows leave. The rows are one prompt's (equal, unpadded lengths: positions follow the
    cache length), or, with `lengths` (each row's real prompt length), prompts left padded to the longest: each
    row then gets its own positions and an attention mask hiding its padding (`padded_step`); `mask` `[rows,
    width]` (1: a real token, 0: padding) says the same for padding anywhere in the cached tokens (questions left
    padded after a compressed context, `compression.generation.answer_after`). `attention`: the
    attention implementation the steps run with (None: the model's current one, e.g. an attention capture).
    `forced` `[rows, steps]` ids replace the greedy picks (a given
    continuation; `rules` still end the rows). `before_forward()` runs before every step's forward and
    `on_pick(step, rows, tokens)` after every pick (step 0: from `logits`), with the rows still decoding and
    their new tokens.
    """
    rows = len(rules)
    if logits.ndim == 1:
        logits = logits[None].expand(rows, -1)
    if logits.shape[0] != rows:
        raise HeadscoreError(f"{logits.shape[0]} rows of logits for {rows} stop rules")
    # a model whose every layer is sliding is full attention only within its window
    Geometry.from_config(model.config).check_fits(cache.get_seq_length() + max(r.max_new_tokens for r in rules))
    device = input_device(model)
    if forced is not None:
        forced = forced.cpu()
    first = greedy_pick(logits, rules, 0) if forced is None else forced[:, 0].tolist()
    tokens: list[list[int]] = [[token] for token in first]
    seconds: list[list[float]] = [[] for _ in range(rows)]
    active = list(range(rows))
    if lengths is not None:
        real = torch.tensor(list(lengths), device=device)
        width = int(real.max())
        mask = (torch.arange(width, device=device)[None, :] >= (width - real)[:, None]).long()
    elif mask is not None:
        mask = mask.to(device=device, dtype=torch.long)
    if on_pick is not None:
        on_pick(0, active, first)
    with torch.inference_mode(), use_attention(model, attention) if attention else nullcontext():
        while True:
            going = [position for position, row in enumerate(active) if not rules[row].finished(tokens[row])]
            if on_finish is not None:
                for position, row in enumerate(active):
                    if position not in going:
                        on_finish(row, position, tokens[row], seconds[row])
            if not going:
                break
            if len(going) < len(active):
                kept = torch.tensor(going, device=device)
                cache.batch_select_indices(kept)
                if on_select is not None:
                    on_select(kept)
                active = [active[position] for position in going]
                mask = None if mask is None else mask[kept]
            start = time.perf_counter()
            inputs = torch.tensor([[tokens[row][-1]] for row in active], device=device)
            step = len(tokens[active[0]])
            padded = {} if mask is None else padded_step(mask, step)
            if before_forward is not None:
                before_forward()
            out = model(input_ids=inputs, **with_cache(model, cache), use_cache=True, **padded)
            if forced is None:
                picked = greedy_pick(out.logits[:, -1], [rules[row] for row in active], step)
            else:
                picked = forced[active, step].tolist()
            elapsed = time.perf_counter() - start
            for row, token in zip(active, picked, strict=True):
                tokens[row].append(token)
                seconds[row].append(elapsed)
            if on_pick is not None:
                on_pick(step, active, picked)
    return tokens, seconds


def padded_step(mask: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """Decode step `step` (tokens generated so far) of rows whose cached prompt tokens are `mask` `[rows,
    width]` (1: real, 0: padding): the new token's `position_ids` `[rows, 1]` (the row's real tokens before it)
    and the `attention_mask` `[rows, width + step]`."""
    return {"position_ids": (mask.sum(-1) + step - 1)[:, None],
            "attention_mask": torch.cat([mask, mask.new_ones(mask.shape[0], step)], dim=1)}
