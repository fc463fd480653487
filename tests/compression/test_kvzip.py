"""KVzip's reconstruction pass against a plain reference: one unchunked eager forward of the prompt and its
reconstruction with `output_attentions`, the largest attention any reconstruction query of a KV head's group
pays each prompt position."""

from __future__ import annotations

import pytest
import torch

from headscore.compression.kvzip import KVZIP_ATTENTION, kvzip_pass, reconstruction_prefix
from headscore.compression.scorers import EXTRA_PASSES, SCORERS, ScorerInputs, expand_heads
from headscore.core.errors import HeadscoreError


def prompt_kv(model, ids):
    """The prompt's per-layer keys/values `[kv_heads, n, d]` from a plain forward."""
    with torch.no_grad():
        out = model(input_ids=ids[None], use_cache=True)
    cache = out.past_key_values
    return ([layer.keys[0].clone() for layer in cache.layers], [layer.values[0].clone() for layer in cache.layers])


def reference_scores(model, tokenizer, ids):
    """One eager forward of prompt + reconstruction; per layer `[kv_heads, n]` by explicit loops."""
    full = torch.cat((ids, torch.tensor(reconstruction_prefix(tokenizer)), ids))
    n = ids.shape[0]
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=full[None], output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    found = []
    for rows in attentions:  # [1, q_heads, L, L]
        scores = torch.zeros(model.config.num_key_value_heads, n)
        for kv in range(model.config.num_key_value_heads):
            for position in range(n):
                scores[kv, position] = rows[0, kv * group:(kv + 1) * group, n:, position].max()
        found.append(scores)
    return found


@pytest.fixture
def model_and_prompt(tiny_llama, tokenizer):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8, vocab=len(tokenizer), seed=3)
    ids = torch.tensor(tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3,
                                        add_special_tokens=False))
    return model, ids


def test_reconstruction_prefix_uses_the_chat_template(tokenizer):
    prefix = tokenizer.decode(reconstruction_prefix(tokenizer))
    assert prefix.startswith("\n\nRepeat the previous context exactly.")
    assert prefix.endswith("<|im_start|>assistant\n")  # SmolLM2's template: the assistant's turn opens


class PlainTokenizer:
    """A tokenizer without a chat template (characters as ids), or with one that fails."""

    def __init__(self, template: str | None = None) -> None:
        self.chat_template = template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, *args, **kwargs) -> str:
        raise ValueError("roles must alternate")


def test_reconstruction_prefix_without_or_with_a_broken_template():
    assert "".join(map(chr, reconstruction_prefix(PlainTokenizer()))) == "\n\nRepeat the previous context exactly.\n"
    with pytest.raises(HeadscoreError, match="chat template cannot render"):
        reconstruction_prefix(PlainTokenizer("{{ broken }}"))


def test_pass_equals_one_unchunked_eager_forward(model_and_prompt, tokenizer):
    model, ids = model_and_prompt
    keys, values = prompt_kv(model, ids)
    kept = [k.clone() for k in keys], [v.clone() for v in values]
    expected = reference_scores(model, tokenizer, ids)
    for chunk in (1000, 7, 1):
        found = kvzip_pass(model, tokenizer, ids, keys, values, chunk=chunk)
        assert len(found) == len(expected)
        for got, want in zip(found, expected, strict=True):
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for before, after in zip(kept[0] + kept[1], keys + values, strict=True):
        assert torch.equal(before, after)  # the given tensors are untouched
    assert model.config._attn_implementation == "sdpa"  # the attention function is restored
    assert EXTRA_PASSES["kvzip"] is kvzip_pass


def test_chunks_bound_the_attention_rows(model_and_prompt, tokenizer, monkeypatch):
    from headscore.compression import kvzip

    model, ids = model_and_prompt
    keys, values = prompt_kv(model, ids)
    widths = []
    inner = kvzip.chunk_attention

    def counted(query, *args, **kwargs):
        widths.append(query.shape[2])
        return inner(query, *args, **kwargs)

    monkeypatch.setattr(kvzip, "chunk_attention", counted)
    kvzip_pass(model, tokenizer, ids, keys, values, chunk=5)
    assert widths and max(widths) == 5


@pytest.mark.parametrize("earlier", [0, 6])
def test_both_chunk_kernels_agree(monkeypatch, earlier):
    """The merged flash-kernel path (with its blocks of logits) and the full softmax rows give the same output and
    maxima, with and without reconstruction chunks before this one; both match a softmax written here."""
    from headscore.compression import kvzip

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 6, 5, 8, generator=generator)
    prompt = [torch.randn(1, 2, 9, 8, generator=generator) for _ in range(2)]
    recon = [torch.randn(1, 2, earlier + 5, 8, generator=generator) for _ in range(2)]
    key, value = kvzip.SplitStates(prompt[0], recon[0]), kvzip.SplitStates(prompt[1], recon[1])
    fast_out, fast = kvzip.chunk_attention(query, key, value, 0.4)
    monkeypatch.setattr(kvzip, "BLOCK_LOGITS", 2 * 9 * 4)  # blocks of 4 of the 15 rows of a group
    torch.testing.assert_close(kvzip.chunk_attention(query, key, value, 0.4)[1], fast)
    monkeypatch.setattr(kvzip, "cpu_flash_kernel", lambda: (None, False))
    rows_out, rows = kvzip.chunk_attention(query, key, value, 0.4)
    torch.testing.assert_close(fast_out, rows_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, rows, rtol=1e-5, atol=1e-7)
    keys, total = torch.cat((prompt[0], recon[0]), dim=2), 9 + earlier + 5
    logits = query @ keys.repeat_interleave(3, 1).transpose(-1, -2) * 0.4
    probs = torch.softmax(logits.masked_fill(torch.arange(total)[None, :] > torch.arange(5)[:, None] + total - 5,
                                             float("-inf")), dim=-1)
    for kv in range(2):
        for position in range(9):
            assert float(rows[kv, position]) == pytest.approx(float(probs[0, kv * 3:(kv + 1) * 3, :, position].max()),
                                                              rel=1e-5)


def test_scorer_reads_the_pass(model_and_prompt, tokenizer):
    model, ids = model_and_prompt
    keys, values = prompt_kv(model, ids)
    found = kvzip_pass(model, tokenizer, ids, keys, values)
    scorer = SCORERS["kvzip"]()
    assert scorer.extra_pass == "kvzip" and scorer.comparable
    for granularity_heads in (2, 4):
        inputs = ScorerInputs(keys=keys[0][None], values=values[0][None], queries=torch.zeros(1, 4, 8, 8),
                              window=8, heads=granularity_heads, extra={"kvzip": found[0][None]})
        scores = scorer.score(inputs)
        assert scores.shape == (1, granularity_heads, ids.shape[0])
        want = expand_heads(found[0][None], granularity_heads)
        assert torch.equal(scores[..., 4:], want[..., 4:])
        assert bool((scores[..., :4] > want.amax()).all())  # the sinks are kept first


def test_bad_inputs(model_and_prompt, tokenizer):
    model, ids = model_and_prompt
    keys, values = prompt_kv(model, ids)
    with pytest.raises(HeadscoreError, match="chunk"):
        kvzip_pass(model, tokenizer, ids, keys, values, chunk=0)
    with pytest.raises(HeadscoreError, match="tokenizer"):
        kvzip_pass(model, None, ids, keys, values)
    with pytest.raises(HeadscoreError, match="cached keys"):
        kvzip_pass(model, tokenizer, ids[:-1], keys, values)
    with pytest.raises(HeadscoreError, match="extra pass"):
        SCORERS["kvzip"]().score(ScorerInputs(keys=keys[0][None], values=values[0][None],
                                              queries=torch.zeros(1, 4, 1, 8), window=1, heads=2))
    assert KVZIP_ATTENTION == "headscore_kvzip"
