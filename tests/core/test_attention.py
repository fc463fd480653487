"""`sdpa_forward`: transformers' sdpa attention, with a pass after cached tokens computed without its masked
half (`causal_suffix_attention`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from headscore.core import attention

DECODER = SimpleNamespace(num_key_value_groups=3, is_causal=True)  # what transformers' function reads


def plain_attention(query, key, value, keep, scale):
    """A float64 reference: every query head against its KV head's keys, a boolean keep-mask [q, k]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1).double(), value.repeat_interleave(groups, dim=1).double()
    scores = (query.double() @ key.transpose(-1, -2)) * scale
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return (probs @ value).transpose(1, 2)  # [b, q, q_heads, d]


def inputs(past, q_len, heads=6, kv_heads=2, dtype=torch.float32):
    generator = torch.Generator().manual_seed(past + q_len)
    query = torch.randn(1, heads, q_len, 16, generator=generator).to(dtype)
    key, value = (torch.randn(1, kv_heads, past + q_len, 16, generator=generator).to(dtype) for _ in range(2))
    keep = torch.arange(past + q_len)[None, :] <= torch.arange(q_len)[:, None] + past  # lower-right causal
    return query, key, value, keep


def counting_flash(monkeypatch):
    attention._flash_cpu_groups_keys()  # the once-per-process probe of the kernel, before counting
    calls = []
    flash = attention._FLASH_CPU
    monkeypatch.setattr(attention, "_FLASH_CPU", lambda q, k, *args, **kwargs: calls.append(k.shape[2])
                        or flash(q, k, *args, **kwargs))
    return calls


@pytest.mark.parametrize("past, q_len, grouped", [(100, 300, True), (1, 300, False), (37, 64, True),
                                                  (301, 300, True), (1000, 2, False)])
def test_a_pass_after_cached_tokens_is_the_masked_attention_in_two_unmasked_calls(monkeypatch, past, q_len,
                                                                                   grouped):
    calls = counting_flash(monkeypatch)
    if not grouped:  # a torch whose CPU kernel does not read grouped KV heads: the keys are repeated
        monkeypatch.setattr(attention, "_flash_cpu_groups_keys", lambda: False)
    query, key, value, keep = inputs(past, q_len)
    output, _ = attention.sdpa_forward(DECODER, query, key, value, keep[None, None], scaling=0.25)
    torch.testing.assert_close(output.double(), plain_attention(query, key, value, keep, 0.25),
                               atol=1e-5, rtol=1e-5)
    assert output.shape == (1, q_len, 6, 16) and output.is_contiguous()
    assert calls == [past, q_len]  # the earlier keys unmasked, then the queries' own square, causal


def test_the_bfloat16_merge_stays_within_bfloat16_rounding(monkeypatch):
    calls = counting_flash(monkeypatch)
    query, key, value, keep = inputs(200, 100, dtype=torch.bfloat16)
    output, _ = attention.sdpa_forward(DECODER, query, key, value, keep[None, None])
    assert output.dtype == torch.bfloat16 and calls == [200, 100]
    torch.testing.assert_close(output.double(), plain_attention(query, key, value, keep, 16**-0.5),
                               atol=2e-2, rtol=2e-2)


def test_without_the_cpu_kernel_a_lower_right_causal_bias_gives_the_same(monkeypatch):
    monkeypatch.setattr(attention, "_FLASH_CPU", None)  # as on CUDA: sdpa with torch's lower-right causal bias
    query, key, value, keep = inputs(50, 80)
    output = attention.causal_suffix_attention(query, key, value, 0.3)
    torch.testing.assert_close(output.transpose(1, 2).double(), plain_attention(query, key, value, keep, 0.3),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["padded", "top-left", "one short", "float"])
def test_any_other_mask_goes_to_transformers_function(monkeypatch, change):
    calls = counting_flash(monkeypatch)
    query, key, value, keep = inputs(20, 40)
    if change == "padded":
        keep[:, :5] = False  # left padding: keys no query may see
    elif change == "top-left":
        keep = torch.ones(40, 60, dtype=torch.bool).tril()
    elif change == "one short":
        keep[-1, -1] = False
    mask = keep[None, None]
    if change == "float":  # an additive mask is not inspected
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    output, _ = attention.sdpa_forward(DECODER, query, key, value, mask, scaling=0.25)
    assert not calls
    if change != "one short":  # a fully masked row is undefined
        torch.testing.assert_close(output.double(), plain_attention(query, key, value, keep, 0.25),
                                   atol=1e-5, rtol=1e-5)


def test_a_mask_is_checked_once_and_wider_masks_are_read_up_to_the_keys():
    keep = inputs(20, 40)[3]
    wider = torch.cat([keep, torch.zeros(40, 8, dtype=torch.bool)], dim=1)[None, None]
    assert attention.is_causal_suffix_mask(wider, 40, 60)
    wider[..., 0, 0] = False  # the verdict is remembered for this mask object (one check per forward pass)
    assert attention.is_causal_suffix_mask(wider, 40, 60)
    assert not attention.is_causal_suffix_mask(wider.clone(), 40, 60)
    assert not attention.is_causal_suffix_mask(keep[None, None], 40, 61)


def test_unmasked_and_non_causal_passes_are_transformers_own():
    query, key, value = torch.randn(1, 4, 40, 8), torch.randn(1, 4, 40, 8), torch.randn(1, 4, 40, 8)
    keep = torch.ones(1, 1, 40, 40, dtype=torch.bool)  # bidirectional
    encoder = SimpleNamespace(is_causal=False)
    output, _ = attention.sdpa_forward(encoder, query, key, value, keep)
    torch.testing.assert_close(output.double(), plain_attention(query, key, value, keep[0, 0], 8**-0.5),
                               atol=1e-5, rtol=1e-5)
    causal, _ = attention.sdpa_forward(SimpleNamespace(is_causal=True), query, key, value, None)
    torch.testing.assert_close(causal.double(), plain_attention(query, key, value, keep[0, 0].tril(), 8**-0.5),
                               atol=1e-5, rtol=1e-5)
