"""The capture attention function: rows equal eager `output_attentions` rows; outputs equal sdpa's."""

from __future__ import annotations

import pytest
import torch

from headscore.core.attention import attention_rows
from headscore.core.errors import HeadscoreError
from headscore.core.model import with_cache
from headscore.scoring.capture import CAPTURE_ATTENTION, AttentionCapture, attention_capture


def reference_rows(query, key, scaling, mask=None):
    """Plain attention: repeat KV heads, full score matrix, softmax."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    scores = query @ key.transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def test_attention_rows_match_plain_gqa():
    torch.manual_seed(0)
    query, key = torch.randn(2, 6, 3, 8), torch.randn(2, 2, 11, 8)
    got = attention_rows(query, key, 0.3)
    assert got.shape == (2, 6, 3, 11)
    torch.testing.assert_close(got, reference_rows(query, key, 0.3))
    # causal offset: row i sees keys <= 8 + i
    causal = torch.arange(11)[None, :] <= torch.arange(3)[:, None] + 8
    torch.testing.assert_close(attention_rows(query, key, 0.3, causal_offset=8),
                               reference_rows(query, key, 0.3, causal))
    # boolean and additive masks
    keep = torch.rand(2, 1, 3, 11) > 0.3
    keep[..., 0] = True
    torch.testing.assert_close(attention_rows(query, key, 0.3, mask=keep), reference_rows(query, key, 0.3, keep))
    additive = torch.zeros(2, 1, 3, 11).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(attention_rows(query, key, 0.3, mask=additive),
                               reference_rows(query, key, 0.3, keep))


def llama(tiny_llama, attn_implementation: str):
    return tiny_llama(layers=3, heads=4, kv_heads=2, attn_implementation=attn_implementation)


@pytest.mark.parametrize("build", ["llama", "qwen2"])
@torch.no_grad()
def test_capture_equals_eager_output_attentions(build, tiny_llama, tiny_qwen2):
    from transformers import DynamicCache

    make = (lambda impl: llama(tiny_llama, impl)) if build == "llama" else tiny_qwen2
    eager, model = make("eager"), make("sdpa")
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(2))
    reference = eager(ids, output_attentions=True)
    expected = torch.stack([a[0] for a in reference.attentions])  # [layers, heads, q, k]

    with attention_capture(model, layers) as capture:
        # decode step: prefill ids[:-1] uncaptured, then the last token with capture on
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], **with_cache(model, cache), use_cache=True)
        capture.arm(1)
        logits = model(ids[:, -1:], **with_cache(model, cache), use_cache=True).logits
        rows = capture.take()
        assert rows.shape == (layers, 1, model.config.num_attention_heads, 1, 40)
        torch.testing.assert_close(rows[:, 0, :, 0], expected[:, :, -1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(logits[0, -1], reference.logits[0, -1], atol=1e-5, rtol=1e-4)
        # teacher-forced style: the last 5 queries of one causal pass
        capture.arm(5)
        full = model(ids).logits
        rows = capture.take()
        torch.testing.assert_close(rows[:, 0], expected[:, :, -5:], atol=1e-6, rtol=1e-5)
        assert model.config._attn_implementation == CAPTURE_ATTENTION
    assert model.config._attn_implementation == "sdpa"
    # the capture function's output is sdpa's output
    torch.testing.assert_close(full, model(ids).logits, atol=0, rtol=0)


@torch.no_grad()
def test_capture_with_sliding_window_mask_matches_eager():
    """A Mistral with a short sliding window: the mask built by transformers is honoured in the rows."""
    from transformers import MistralConfig, MistralForCausalLM

    def make(impl):
        torch.manual_seed(3)
        config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=8,
                               max_position_embeddings=256, attn_implementation=impl)
        return MistralForCausalLM(config).eval()

    eager, model = make("eager"), make("sdpa")
    ids = torch.randint(3, 60, (1, 24), generator=torch.Generator().manual_seed(4))
    expected = torch.stack([a[0] for a in eager(ids, output_attentions=True).attentions])
    with attention_capture(model, 2) as capture:
        capture.arm(6)
        model(ids)
        rows = capture.take()
    torch.testing.assert_close(rows[:, 0], expected[:, :, -6:], atol=1e-6, rtol=1e-5)
    assert (rows[:, 0, :, -1, :24 - 8] == 0).all()  # outside the window


def test_no_rows_is_a_clear_error(tiny_llama):
    capture = AttentionCapture(layers=2)
    capture.arm(1)
    with pytest.raises(HeadscoreError, match="AttentionInterface"):
        capture.take()


def test_model_without_attention_interface_is_refused(tiny_llama, monkeypatch):
    model = tiny_llama()
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(HeadscoreError, match="AttentionInterface"):
        with attention_capture(model, 2):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_capture_on_cuda_bf16_matches_cpu(tiny_llama):
    """The capture path on CUDA in bfloat16 (rows computed in float32) agrees with CPU float32."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    ids = torch.randint(3, 120, (1, 300), generator=torch.Generator().manual_seed(5))
    rows = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        model = model.to(device=device, dtype=dtype)
        with attention_capture(model, 2) as capture:
            capture.arm(4)
            model(ids.to(device))
            rows[device] = capture.take().cpu()
        assert rows[device].dtype == torch.float32
    torch.testing.assert_close(rows["cuda"], rows["cpu"], atol=2e-2, rtol=0)


@torch.no_grad()
def test_captures_are_attached_to_their_models(tiny_llama):
    """Two models captured at once (no shared global state): each capture records its own model only, and
    a model's attention modules carry no capture after the block."""
    from headscore.scoring.capture import CAPTURE_ATTRIBUTE

    first, second = tiny_llama(layers=2, seed=0), tiny_llama(layers=3, seed=1)
    ids = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(6))
    with attention_capture(first, 2) as one, attention_capture(second, [0, 2]) as two:
        one.arm(2)
        first(ids)
        two.arm(1)
        second(ids)
        assert one.take().shape == (2, 1, 4, 2, 12) and two.take().shape == (2, 1, 4, 1, 12)
        with pytest.raises(HeadscoreError, match="already has an attention capture"):
            with attention_capture(first, 2):
                pass
    assert not any(hasattr(module, CAPTURE_ATTRIBUTE) for module in (*first.modules(), *second.modules()))
