"""Stop rules: where one rule stops within a decode, and one rule that ends where the last of several ends."""

from __future__ import annotations

import pytest

from headscore.core.decoding import EveryRule, StopRule
from headscore.core.errors import HeadscoreError


def first_stop(rule: StopRule, tokens: list[int]) -> int | None:
    """Plain: the first prefix length at which `rule.finished` holds."""
    for length in range(1, len(tokens) + 1):
        if rule.finished(tokens[:length]):
            return length
    return None


def test_stop_length_and_every_rule():
    newline = StopRule(10, eos={0}, line_end={9}, skip_leading_line_ends=False)
    short = StopRule(3)
    tokens = [5, 6, 9, 7, 8, 1, 2]
    assert newline.stop_length(tokens) == first_stop(newline, tokens) == 3
    assert short.stop_length(tokens[:2]) is None and short.stop_length(tokens) == 3
    late = StopRule(6, line_end={9})  # skips a leading line end only, so stops at the 9 too
    every = EveryRule.of([short, StopRule(5), late])
    assert every.max_new_tokens == 6
    assert [every.finished(tokens[:n]) for n in range(1, 7)] == [False, False, False, False, True, True]
    # a rule that stopped earlier stays stopped although its test no longer holds on the longer prefix
    assert not newline.finished(tokens[:4]) and EveryRule.of([newline, short]).finished(tokens[:4])
    assert EveryRule.of([short]) is short
    with pytest.raises(HeadscoreError, match="ban different"):
        EveryRule.of([StopRule(4, eos={0}, min_new_tokens=2), short])
    assert StopRule(4, eos={0}).picks_like(StopRule(8, eos={1}))  # no min_new_tokens: no bans
