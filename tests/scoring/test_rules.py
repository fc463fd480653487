"""Vectorized head scores equal a plain loop-based computation."""

from __future__ import annotations

import pytest
import torch

from headscore.core.errors import HeadscoreError
from headscore.scoring.rules import get_rule, r2_scores, retrieval_scores


def loop_r2(probs, span, answer_tokens):
    """The official rule (HeadKV `retrieval_calculate`) as a plain loop: per step, per head, top-N positions;
    each one inside the span adds 10 * weight / (N * A)."""
    start, end = span
    n = end - start
    steps, layers, heads, _ = probs.shape
    out = torch.zeros(layers, heads, dtype=torch.float64)
    for s in range(steps):
        for layer in range(layers):
            for head in range(heads):
                row = probs[s, layer, head].tolist()
                ranked = sorted(range(len(row)), key=lambda i: -row[i])[:n]
                for position in ranked:
                    if start <= position < end:
                        out[layer, head] += 10 * row[position] * 1 / (n * answer_tokens)
    return out


def loop_retrieval(probs, span, tokens, prompt_ids):
    start, end = span
    n = end - start
    steps, layers, heads, _ = probs.shape
    out = torch.zeros(layers, heads, dtype=torch.float64)
    for s in range(steps):
        for layer in range(layers):
            for head in range(heads):
                row = probs[s, layer, head].tolist()
                top = max(range(len(row)), key=lambda i: row[i])
                if start <= top < end and int(prompt_ids[top]) == int(tokens[s]):
                    out[layer, head] += 1 / n
    return out


def random_probs(steps=4, layers=3, heads=5, context=30, seed=0, span=(10, 16)):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, layers, heads, context, generator=generator) * 2
    logits[..., span[0]:span[1]] += torch.rand(steps, layers, heads, span[1] - span[0], generator=generator) * 3
    return torch.softmax(logits, dim=-1)


def test_r2_matches_the_official_loop_for_two_needles_of_different_answer_lengths():
    """Two needles (different spans N and answer lengths A): per-trial scores and their mean over trials (what
    the head-score file's consumers use) equal the official loop; the needles weigh differently by 1/A."""
    trials = [(random_probs(steps=4, seed=0, span=(10, 16)), (10, 16), 4),
              (random_probs(steps=7, seed=3, context=40, span=(20, 29)), (20, 29), 7)]
    ours, official = [], []
    for probs, span, answer_tokens in trials:
        got = r2_scores(probs, span, answer_tokens=answer_tokens)
        assert got.shape == (3, 5) and got.sum() > 0
        expected = loop_r2(probs, span, answer_tokens)
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
        ours.append(got.double())
        official.append(expected)
    torch.testing.assert_close(torch.stack(ours).mean(0), torch.stack(official).mean(0), atol=1e-6, rtol=1e-5)
    probs, span, _ = trials[1]
    torch.testing.assert_close(r2_scores(probs, span, answer_tokens=14) * 2, r2_scores(probs, span, answer_tokens=7))


def test_r2_per_trial_maximum_is_10_over_n():
    """A steps that put all their top-N weight inside the span score exactly 10 / N."""
    n, a = 6, 5
    probs = torch.zeros(a, 1, 2, 20)
    probs[:, 0, 0, 4:4 + n] = 1 / n  # head 0: everything in the span
    probs[:, 0, 1, 0] = 1.0  # head 1: nothing in it
    got = r2_scores(probs, (4, 4 + n), answer_tokens=a)
    torch.testing.assert_close(got, torch.tensor([[10 / n, 0.0]]))


def test_retrieval_matches_loop():
    span = (10, 16)
    probs = random_probs(seed=1, span=span)
    prompt_ids = torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(5))  # many repeated ids
    tokens = torch.randint(0, 4, (4,), generator=torch.Generator().manual_seed(6))
    got = retrieval_scores(probs, span, tokens, prompt_ids)
    expected = loop_retrieval(probs, span, tokens, prompt_ids)
    assert expected.sum() > 0  # the check is not vacuous
    torch.testing.assert_close(got.double(), expected, atol=1e-7, rtol=0)


def test_retrieval_top1_beyond_prompt_never_scores():
    """Rows longer than the prompt (generated positions): a top-1 there is outside the span."""
    probs = torch.zeros(1, 1, 2, 12)
    probs[0, 0, 0, 11] = 1.0  # a generated position
    probs[0, 0, 1, 3] = 1.0  # in the span, holding the token 7
    prompt_ids = torch.tensor([0, 0, 0, 7, 7, 0, 0, 0, 0, 0])
    got = retrieval_scores(probs, (3, 5), torch.tensor([7]), prompt_ids)
    assert got.tolist() == [[0.0, 0.5]]


def test_bad_span_and_method():
    with pytest.raises(HeadscoreError, match="span"):
        r2_scores(random_probs(), (20, 40), answer_tokens=3)
    with pytest.raises(HeadscoreError, match="answer has 0 tokens"):
        r2_scores(random_probs(), (10, 16), answer_tokens=0)
    with pytest.raises(HeadscoreError, match="unknown score rule 'nope'"):
        get_rule("nope")


def test_r2_weight_released_and_head_are_the_authors_two_commits():
    """A hand example (2 steps, 1 layer, 2 heads, span of N = 2, A = 4) against the two versions of their
    `retrieval_calculate` line: 84e4c2b `10 * v / (N * A)` (the released files), 4c68d6b `v / N` (the head)."""
    from headscore.scoring.rules import r2_weight_scale

    probs = torch.tensor([[[[0.05, 0.5, 0.3, 0.15], [0.7, 0.05, 0.15, 0.1]]],
                          [[[0.1, 0.2, 0.6, 0.1], [0.4, 0.3, 0.2, 0.1]]]])  # [steps, layers, heads, context]
    span, a = (1, 3), 4

    def theirs(version: str) -> torch.Tensor:
        out = torch.zeros(1, 2, dtype=torch.float64)
        for step in range(2):
            for head in range(2):
                values, idx = probs[step, 0, head].topk(span[1] - span[0])
                for v, i in zip(values.tolist(), idx.tolist(), strict=True):
                    if span[0] <= i < span[1]:
                        n = span[1] - span[0]
                        out[0, head] += 10 * v * 1 / (n * a) if version == "84e4c2b" else v * 1 / n
        return out

    # by hand: head 0 hits 0.5 + 0.3 and 0.6 + 0.2 (sum 1.6); head 1 hits 0.15, then 0.3
    torch.testing.assert_close(theirs("4c68d6b"), torch.tensor([[1.6 / 2, 0.45 / 2]], dtype=torch.float64))
    released = r2_scores(probs, span, answer_tokens=a).double()
    torch.testing.assert_close(released * r2_weight_scale("released", a), theirs("84e4c2b"))
    torch.testing.assert_close(released * r2_weight_scale("head", a), theirs("4c68d6b"))
    with pytest.raises(HeadscoreError, match="unknown r2 weight 'tip'"):
        r2_weight_scale("tip", a)
