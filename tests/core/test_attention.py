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


def counting_flash(monkeypatch, groups_keys=None):
    flash, grouped = attention.cpu_flash_kernel()  # the once-per-process probe of the kernel, before counting
    calls = []

    def counted(q, k, *args, **kwargs):
        calls.append(k.shape[2])
        return flash(q, k, *args, **kwargs)

    monkeypatch.setattr(attention, "cpu_flash_kernel",
                        lambda: (counted, grouped if groups_keys is None else groups_keys))
    return calls


@pytest.mark.parametrize("past, q_len, grouped", [(100, 300, True), (1, 300, False), (37, 64, True),
                                                  (301, 300, True), (1000, 2, False)])
def test_a_pass_after_cached_tokens_is_the_masked_attention_in_two_unmasked_calls(monkeypatch, past, q_len,
                                                                                   grouped):
    # grouped=False: a torch whose CPU kernel does not read grouped KV heads: the keys are repeated
    calls = counting_flash(monkeypatch, None if grouped else False)
    query, key, value, keep = inputs(past, q_len)
    output, _ = attention.sdpa_forward(DECODER, query, key, value, keep[None, None], scaling=0.25,
                                       causal_suffix=True)
    torch.testing.assert_close(output.double(), plain_attention(query, key, value, keep, 0.25),
                               atol=1e-5, rtol=1e-5)
    assert output.shape == (1, q_len, 6, 16) and output.is_contiguous()
    assert calls == [past, q_len]  # the earlier keys unmasked, then the queries' own square, causal


def test_the_bfloat16_merge_stays_within_bfloat16_rounding(monkeypatch):
    calls = counting_flash(monkeypatch)
    query, key, value, keep = inputs(200, 100, dtype=torch.bfloat16)
    output, _ = attention.sdpa_forward(DECODER, query, key, value, keep[None, None], **attention.CAUSAL_SUFFIX)
    assert output.dtype == torch.bfloat16 and calls == [200, 100]
    torch.testing.assert_close(output.double(), plain_attention(query, key, value, keep, 16**-0.5),
                               atol=2e-2, rtol=2e-2)


def test_without_the_cpu_kernel_a_lower_right_causal_bias_gives_the_same(monkeypatch):
    monkeypatch.setattr(attention, "cpu_flash_kernel", lambda: (None, False))  # as on CUDA: sdpa, lower-right bias
    query, key, value, keep = inputs(50, 80)
    output = attention.causal_suffix_attention(query, key, value, 0.3)
    torch.testing.assert_close(output.transpose(1, 2).double(), plain_attention(query, key, value, keep, 0.3),
                               atol=1e-5, rtol=1e-5)


def test_without_the_callers_word_even_a_causal_suffix_mask_is_transformers_own(monkeypatch):
    """The suffix path is chosen by the caller (`causal_suffix`), never guessed from the mask."""
    calls = counting_flash(monkeypatch)
    query, key, value, keep = inputs(20, 40)
    output, _ = attention.sdpa_forward(DECODER, query, key, value, keep[None, None], scaling=0.25)
    assert not calls
    torch.testing.assert_close(output.double(), plain_attention(query, key, value, keep, 0.25), atol=1e-5,
                               rtol=1e-5)


def test_dropout_or_extra_terms_go_to_transformers_function(monkeypatch):
    calls = counting_flash(monkeypatch)
    query, key, value, keep = inputs(20, 40)
    attention.sdpa_forward(DECODER, query, key, value, keep[None, None], dropout=0.5, causal_suffix=True)
    try:
        attention.sdpa_forward(DECODER, query, key, value, keep[None, None], softcap=30.0, causal_suffix=True)
    except ValueError:  # transformers >= 5.2x refuses softcap in sdpa itself
        pass
    assert not calls


def test_a_model_forward_hands_the_flag_to_the_attention_function(tiny_llama, suffix_passes):
    from transformers import DynamicCache

    from headscore.compression.attention import HEADWISE_ATTENTION  # plain tensors: sdpa_forward
    from headscore.core.model import with_cache

    model = tiny_llama()
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (1, 30))
    with torch.inference_mode(), attention.use_attention(model, HEADWISE_ATTENTION):
        plain = model(input_ids=ids).logits[0, -1]
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :10], **with_cache(model, cache), use_cache=True)
        split = model(input_ids=ids[:, 10:], **with_cache(model, cache), use_cache=True,
                      **attention.CAUSAL_SUFFIX).logits[0, -1]
    assert suffix_passes == [(20, 30)] * 2  # both layers took the suffix path
    torch.testing.assert_close(split, plain, atol=1e-5, rtol=1e-5)


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
