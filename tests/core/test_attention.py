"""`sdpa_forward`: transformers' sdpa attention, with a long masked pass taken in query blocks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from headscore.core import attention


def plain_attention(query, key, value, keep, scale):
    """A float64 reference: every query head against its KV head's keys, a boolean keep-mask [q, k]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1).double(), value.repeat_interleave(groups, dim=1).double()
    scores = (query.double() @ key.transpose(-1, -2)) * scale
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return (probs @ value).transpose(1, 2)  # [b, q, q_heads, d]


@pytest.mark.parametrize("past, q_len, padded", [(0, 300, False), (100, 300, False), (100, 300, True),
                                                 (37, 64, False), (301, 300, False)])
def test_blocked_queries_give_the_plain_attention(monkeypatch, past, q_len, padded):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 64)
    generator = torch.Generator().manual_seed(past + q_len)
    query = torch.randn(1, 6, q_len, 16, generator=generator)
    key, value = (torch.randn(1, 2, past + q_len, 16, generator=generator) for _ in range(2))
    rows = torch.arange(q_len)[:, None] + past
    keep = torch.arange(past + q_len)[None, :] <= rows
    if padded:
        keep[:, :5] = False  # left padding: keys no query may see
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(args[0].shape[2]) or sdpa(*args, **kwargs))
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    output, _ = attention.sdpa_forward(module, query, key, value, keep[None, None], scaling=0.25)
    torch.testing.assert_close(output.double(), plain_attention(query, key, value, keep, 0.25),
                               atol=1e-5, rtol=1e-5)
    assert output.shape == (1, q_len, 6, 16) and output.is_contiguous()
    blocks = -(-q_len // 64)  # in blocks when the queries are more than a block and than the keys before them
    assert calls == ([64] * (blocks - 1) + [q_len - 64 * (blocks - 1)] if q_len > max(64, past) else [q_len])


def test_unmasked_and_non_causal_passes_are_transformers_own(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
    query, key, value = torch.randn(1, 4, 40, 8), torch.randn(1, 4, 40, 8), torch.randn(1, 4, 40, 8)
    keep = torch.ones(1, 1, 40, 40, dtype=torch.bool)  # bidirectional: blocks would drop visible keys
    encoder = SimpleNamespace(is_causal=False)
    output, _ = attention.sdpa_forward(encoder, query, key, value, keep)
    torch.testing.assert_close(output.double(), plain_attention(query, key, value, keep[0, 0], 8**-0.5),
                               atol=1e-5, rtol=1e-5)
    causal, _ = attention.sdpa_forward(SimpleNamespace(is_causal=True), query, key, value, None)
    torch.testing.assert_close(causal.double(), plain_attention(query, key, value, keep[0, 0].tril(), 8**-0.5),
                               atol=1e-5, rtol=1e-5)
