"""KVzip's extra pass (Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
arXiv 2505.23416; references: snu-mllab/KVzip and kvpress `KVzipPress`): after the prompt, the model is
teacher-forced through a reconstruction of it ("Repeat the previous context exactly." in the chat template,
then the prompt's own ids) on top of the prompt's cache, and each prompt position is scored by the largest
attention any reconstruction query of its KV head's group pays it.

The reconstruction runs in chunks of `chunk` tokens, each on the cache of the prompt and the chunks before it,
so a chunk's attention rows (`[q_heads, chunk, keys]`) and activations are all that is alive beside the cache;
the scores are exactly those of one unchunked pass (the softmax of every reconstruction query runs over the
prompt and the reconstruction up to it). The authors instead reconstruct each 2,000-token context chunk with
its own prompt on the bare prompt cache and softmax over sinks + that chunk + its reconstruction only; both
agree for prompts of one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headscore.compression.scorers import register_extra_pass
from headscore.core.attention import attention_rows, causal_suffix_parts, use_attention
from headscore.core.errors import HeadscoreError
from headscore.core.kv_cache import growing_cache
from headscore.core.model import Geometry, input_device, with_cache

KVZIP_ATTENTION = "headscore_kvzip"
KVZIP_CHUNK = 512  # reconstruction tokens per forward: the attention rows held are q_heads × chunk × keys
REPEAT_PROMPT = "\n\nRepeat the previous context exactly."  # the authors' instruction (first chunk's)
PLAIN_SUFFIX = "\n"  # after the instruction when the tokenizer has no chat template (kvpress)
BLOCK_LOGITS = 1 << 18  # float32 logits per block of scoring rows (1 MiB: stays in a core's cache)
RECORDER = "headscore_kvzip_scores"  # attribute set on the attention modules during the pass


class ReconstructionScores:
    """Running maxima over one reconstruction pass: per recorded model layer `[kv_heads, n]` float32, the
    largest attention any reconstruction query of the group paid each of the first `n` (prompt) positions."""

    def __init__(self, layers: tuple[int, ...], n: int) -> None:
        self.n = n
        self.slot = {layer: slot for slot, layer in enumerate(layers)}
        self.scores: list[torch.Tensor | None] = [None] * len(layers)

    def fold(self, layer: int, best: torch.Tensor) -> None:
        """Fold one chunk's per-position maxima `[kv_heads, n]` into the layer's."""
        slot = self.slot.get(layer)
        if slot is None:
            return
        previous = self.scores[slot]
        self.scores[slot] = best if previous is None else torch.maximum(previous, best)


def chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n: int, scaling: float | None,
                    softcap: float | None = None, sinks: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One reconstruction chunk: the queries `[1, q_heads, q, d]` are the last q of the k keys (causal), the
    first `n` keys the prompt's. Returns the exact attention output `[1, q_heads, q, d]` and the largest
    attention weight any query of each KV head's group pays each prompt position, float32 `[kv_heads, n]`.

    Where the CPU flash kernel gives each query's log-sum-exp (`causal_suffix_parts`), the weights are
    exp(max over queries of (logit − lse)): only the logits against the `n` prompt keys are computed (every
    query sees all of them) and the exponential runs on the maxima alone. Elsewhere (or with soft-capping or
    learned sinks) the full softmax rows (`attention_rows`) give both."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    rows_of_group = (q_heads // kv_heads) * q_len
    lse = None
    if softcap is None and sinks is None:
        output, lse = causal_suffix_parts(query, key, value, scaling)
    if lse is not None:
        scale = dim**-0.5 if scaling is None else scaling
        grouped = (query.float() * scale).reshape(batch, kv_heads, rows_of_group, dim)  # a copy: query unchanged
        lse = lse.reshape(batch, kv_heads, rows_of_group, 1)
        prompt_keys = key[:, :, :n].float().transpose(-1, -2)
        block = max(1, BLOCK_LOGITS // (batch * kv_heads * n))
        best = None
        for start in range(0, rows_of_group, block):  # blocks of query rows: the logits stay in cache (speed)
            logits = torch.matmul(grouped[:, :, start:start + block], prompt_keys)
            found = logits.sub_(lse[:, :, start:start + block]).amax(dim=2)
            best = found if best is None else torch.maximum(best, found)
        assert best is not None
        return output, best[0].exp_()
    rows = attention_rows(query, key, scaling, causal_offset=k_len - q_len, softcap=softcap, sinks=sinks)
    probs = rows.view(batch, kv_heads, rows_of_group, k_len)
    output = torch.matmul(probs, value.float()).view(batch, q_heads, q_len, dim).to(query.dtype)
    return output, probs[0, :, :, :n].amax(dim=1)


def kvzip_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A reconstruction chunk's attention (`chunk_attention`; causal, unpadded, after the cached prompt and the
    chunks before it), folding its scores into the pass's `ReconstructionScores` attached to the module:
    output `[b, q, q_heads, d]` as sdpa's."""
    recorder = getattr(module, RECORDER)
    output, best = chunk_attention(query, key, value, recorder.n, scaling, kwargs.get("softcap"),
                                   kwargs.get("s_aux"))
    recorder.fold(int(module.layer_idx), best)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(KVZIP_ATTENTION, kvzip_attention_forward)
AttentionMaskInterface.register(KVZIP_ATTENTION, sdpa_mask)


def reconstruction_prefix(tokenizer: Any) -> list[int]:
    """The ids between the prompt and its reconstruction: the authors' instruction, then what the chat template
    puts after a user message's content up to the assistant's answer (a newline without a template)."""
    if tokenizer is None:
        raise HeadscoreError("the kvzip pass needs the model's tokenizer (its reconstruction prompt)")
    suffix = PLAIN_SUFFIX
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063HEADSCORE-KVZIP\u2063"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)
        if marker not in text:
            raise HeadscoreError("the tokenizer's chat template drops the user message; kvzip cannot build its "
                                 "reconstruction prompt")
        suffix = text.split(marker, 1)[1]
    return list(tokenizer.encode(REPEAT_PROMPT, add_special_tokens=False)) + \
        list(tokenizer.encode(suffix, add_special_tokens=False))


def _seeded_cache(config: Any, keys: list[torch.Tensor], values: list[torch.Tensor], layers: tuple[int, ...],
                  room: int) -> Any:
    """A growing cache holding copies of the prompt's keys/values `[kv_heads, n, d]` per model layer, with room
    for `room` more tokens (the reconstruction appends in place, no copy per chunk)."""
    cache = growing_cache(config)
    for layer, layer_keys, layer_values in zip(layers, keys, values, strict=True):
        padded = [torch.cat((states[None], states.new_zeros(1, states.shape[0], room, states.shape[2])), dim=2)
                  for states in (layer_keys, layer_values)]
        cache.update(padded[0], padded[1], layer)
        grown: Any = cache.layers[layer]
        grown.crop(-room)  # a view of the buffer: the next update writes after the prompt
    return cache


@contextmanager
def _recording(model: Any, recorder: ReconstructionScores) -> Iterator[None]:
    modules = [module for module in model.modules() if getattr(module, "layer_idx", None) is not None]
    with use_attention(model, KVZIP_ATTENTION):
        for module in modules:
            setattr(module, RECORDER, recorder)
        try:
            yield
        finally:
            for module in modules:
                delattr(module, RECORDER)


@register_extra_pass("kvzip")
def kvzip_pass(model: Any, tokenizer: Any, input_ids: torch.Tensor, keys: list[torch.Tensor],
               values: list[torch.Tensor], *, chunk: int = KVZIP_CHUNK) -> list[torch.Tensor]:
    """KVzip's reconstruction scores of a prompt `input_ids` `[n]` whose prefill left `keys`/`values`
    `[kv_heads, n, d]` per full-attention layer (compressed-slot order; never modified): per layer float32
    `[kv_heads, n]`, the largest attention any reconstruction query of the KV head's group pays each position.
    The reconstruction (`reconstruction_prefix` + the prompt) runs `chunk` tokens at a time."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise HeadscoreError(f"the kvzip chunk must be a positive integer, got {chunk!r}")
    geometry = Geometry.from_config(model.config)
    if geometry.compressed_layers is not None:
        raise HeadscoreError("the kvzip pass needs a model whose layers are all full attention (this one has "
                             "sliding-window layers)")
    ids = input_ids.reshape(-1)
    n = ids.shape[0]
    if n == 0:
        raise HeadscoreError("the prompt is empty")
    if len(keys) != geometry.layers or len(values) != geometry.layers:
        raise HeadscoreError(f"the kvzip pass got keys of {len(keys)} layers, the model has {geometry.layers}")
    if any(layer_keys.shape[1] != n for layer_keys in keys):
        raise HeadscoreError(f"the prompt has {n} tokens but the cached keys hold {keys[0].shape[1]}")
    device = input_device(model)
    reconstruction = torch.cat((torch.tensor(reconstruction_prefix(tokenizer), dtype=ids.dtype), ids.cpu()))
    layers = geometry.model_layers
    cache = _seeded_cache(model.config, keys, values, layers, reconstruction.shape[0])
    recorder = ReconstructionScores(layers, n)
    with torch.inference_mode(), _recording(model, recorder):
        for start in range(0, reconstruction.shape[0], chunk):
            piece = reconstruction[start:start + chunk].to(device)[None]
            model(input_ids=piece, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    if any(scores is None for scores in recorder.scores):
        raise HeadscoreError("some layers did not call the registered attention function; the kvzip pass "
                             "cannot score this model type")
    return [scores.to(layer_keys.device) for scores, layer_keys in zip(recorder.scores, keys, strict=True)
            if scores is not None]
