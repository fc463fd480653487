"""KVzip's extra pass (Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
arXiv 2505.23416; references: snu-mllab/KVzip and kvpress `KVzipPress`): after the prompt, the model is
teacher-forced through a reconstruction of it ("Repeat the previous context exactly." in the chat template,
then the prompt's own ids) on top of the prompt's cache, and each prompt position is scored by the largest
attention any reconstruction query of its KV head's group pays it.

The reconstruction runs in chunks of `chunk` tokens, each on the prompt's cache and the chunks before it: the
scores are exactly those of one unchunked pass (the softmax of every reconstruction query runs over the prompt
and the reconstruction up to it), while only one chunk's activations are alive. The prompt's keys/values are
read in place (never copied); the pass adds the reconstruction's own keys/values (about the prompt's KV size)
and, per attention call, one chunk's outputs. The authors instead reconstruct each 2,000-token context chunk with
its own prompt on the bare prompt cache and softmax over sinks + that chunk + its reconstruction only; both
agree for prompts of one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headscore.compression.scorers import register_extra_pass
from headscore.core.attention import attention_rows, cpu_flash_kernel, use_attention
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry, input_device, with_cache

KVZIP_ATTENTION = "headscore_kvzip"
KVZIP_CHUNK = 512  # reconstruction tokens per forward: what bounds the pass's activations
REPEAT_PROMPT = "\n\nRepeat the previous context exactly."  # the authors' instruction (first chunk's)
PLAIN_SUFFIX = "\n"  # after the instruction when the tokenizer has no chat template (kvpress)
BLOCK_LOGITS = 1 << 18  # float32 logits per block of scoring rows (1 MiB: stays in a core's cache)
RECORDER = "headscore_kvzip_scores"  # attribute set on the attention modules during the pass


class ReconstructionScores:
    """Running maxima over one reconstruction pass: per recorded model layer `[kv_heads, n]` float32, the
    largest attention any reconstruction query of the group paid each prompt position."""

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.slot = {layer: slot for slot, layer in enumerate(layers)}
        self.scores: list[torch.Tensor | None] = [None] * len(layers)

    def fold(self, layer: int, best: torch.Tensor) -> None:
        """Fold one chunk's per-position maxima `[kv_heads, n]` into the layer's."""
        slot = self.slot.get(layer)
        if slot is None:
            return
        previous = self.scores[slot]
        self.scores[slot] = best if previous is None else torch.maximum(previous, best)


@dataclass(frozen=True)
class SplitStates:
    """What a `ReconstructionLayer` hands the attention function as its keys (or values): the prompt's
    `[1, kv_heads, n, d]` (the given tensors, never copied) and the reconstruction's so far `[1, kv_heads, t, d]`,
    the current chunk's last."""

    prompt: torch.Tensor
    reconstruction: torch.Tensor


class ReconstructionLayer(DynamicLayer):
    """A cache layer for the reconstruction pass: the prompt's keys/values are held by reference (never copied
    nor modified) and the reconstruction's are written into a buffer of `room` tokens; `update` returns both
    (`SplitStates`) for `kvzip_attention_forward`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        super().__init__()
        self.prompt_keys, self.prompt_values = keys[None], values[None]
        kv_heads, _, dim = keys.shape
        self.key_buffer = keys.new_empty(1, kv_heads, room, dim)
        self.value_buffer = values.new_empty(1, kv_heads, room, dim)
        self.filled = 0
        self.keys, self.values, self.is_initialized = self.prompt_keys, self.prompt_values, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[Any, Any]:
        end = self.filled + key_states.shape[-2]
        if end > self.key_buffer.shape[2]:
            raise HeadscoreError(f"the reconstruction outgrew its cache ({end} > {self.key_buffer.shape[2]} tokens)")
        self.key_buffer[:, :, self.filled:end] = key_states
        self.value_buffer[:, :, self.filled:end] = value_states
        self.filled = end
        return (SplitStates(self.prompt_keys, self.key_buffer[:, :, :end]),
                SplitStates(self.prompt_values, self.value_buffer[:, :, :end]))

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[2] + self.filled


def chunk_attention(query: torch.Tensor, key: SplitStates, value: SplitStates, scaling: float | None,
                    softcap: float | None = None, sinks: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One reconstruction chunk: the queries `[1, q_heads, q, d]` are the last q of the reconstruction (causal
    among themselves), after every prompt key. Returns the exact attention output `[1, q_heads, q, d]` and the
    largest attention weight any query of each KV head's group pays each prompt position, float32
    `[kv_heads, n]`.

    On CPU (the flash kernel, `core.attention.cpu_flash_kernel`): the output merges the kernel's calls over
    the prompt, the earlier reconstruction and the chunk's own causal square by their log-sum-exps, so no
    concatenated or masked key block exists; each weight is then exp(max over queries of (logit − lse)),
    with the logits against the prompt keys computed by blocks of query rows (`BLOCK_LOGITS`: they stay in
    cache) and the exponential on the maxima alone. Elsewhere (or with soft-capping or learned sinks): the full
    softmax rows over the concatenated keys (`attention_rows`)."""
    batch, q_heads, q_len, dim = query.shape
    prompt_keys, recon_keys = key.prompt, key.reconstruction
    kv_heads, n, t_len = prompt_keys.shape[1], prompt_keys.shape[2], recon_keys.shape[2]
    groups, rows_of_group = q_heads // kv_heads, (q_heads // kv_heads) * q_len
    kernel, grouped_keys = cpu_flash_kernel() if query.device.type == "cpu" else (None, False)
    if kernel is None or softcap is not None or sinks is not None:
        keys = torch.cat((prompt_keys, recon_keys), dim=2)
        values = torch.cat((value.prompt, value.reconstruction), dim=2)
        rows = attention_rows(query, keys, scaling, causal_offset=keys.shape[2] - q_len, softcap=softcap,
                              sinks=sinks)
        probs = rows.view(batch, kv_heads, rows_of_group, keys.shape[2])
        output = torch.matmul(probs, values.float()).view(batch, q_heads, q_len, dim).to(query.dtype)
        return output, probs[0, :, :, :n].amax(dim=1)
    blocks = [(prompt_keys, value.prompt, False), (recon_keys[:, :, t_len - q_len:],
                                                   value.reconstruction[:, :, t_len - q_len:], True)]
    if t_len > q_len:  # the chunks before this one
        blocks.insert(1, (recon_keys[:, :, :t_len - q_len], value.reconstruction[:, :, :t_len - q_len], False))
    parts = []
    for block_keys, block_values, causal in blocks:  # three kernel calls, merged exactly below
        if groups > 1 and not grouped_keys:
            block_keys, block_values = repeat_kv(block_keys, groups), repeat_kv(block_values, groups)
        parts.append(kernel(query, block_keys, block_values, 0.0, causal, scale=scaling)[:2])
    lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), dim=0)  # [b, q_heads, q], float32
    output = sum(out * (part_lse - lse).exp_().unsqueeze(-1) for out, part_lse in parts)
    scale = dim**-0.5 if scaling is None else scaling
    grouped = (query.float() * scale).reshape(batch, kv_heads, rows_of_group, dim)  # a copy: query unchanged
    lse = lse.reshape(batch, kv_heads, rows_of_group, 1)
    prompt_t = prompt_keys.float().transpose(-1, -2)
    block = max(1, BLOCK_LOGITS // (batch * kv_heads * n))
    best = None
    for start in range(0, rows_of_group, block):  # blocks of query rows: the logits stay in cache (speed)
        logits = torch.matmul(grouped[:, :, start:start + block], prompt_t)
        found = logits.sub_(lse[:, :, start:start + block]).amax(dim=2)
        best = found if best is None else torch.maximum(best, found)
    assert best is not None and isinstance(output, torch.Tensor)
    return output.to(query.dtype), best[0].exp_()


def kvzip_attention_forward(module: Any, query: torch.Tensor, key: Any, value: Any,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A reconstruction chunk's attention (`chunk_attention`; causal, unpadded, after the cached prompt and the
    chunks before it), folding its scores into the pass's `ReconstructionScores` attached to the module:
    output `[b, q, q_heads, d]` as sdpa's."""
    recorder = getattr(module, RECORDER)
    output, best = chunk_attention(query, key, value, scaling, kwargs.get("softcap"), kwargs.get("s_aux"))
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
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as error:  # a template's own jinja error: one line naming it
            raise HeadscoreError(f"the tokenizer's chat template cannot render one user message ({error}); kvzip "
                                 "cannot build its reconstruction prompt") from error
        if marker not in text:
            raise HeadscoreError("the tokenizer's chat template drops the user message; kvzip cannot build its "
                                 "reconstruction prompt")
        suffix = text.split(marker, 1)[1]
    return list(tokenizer.encode(REPEAT_PROMPT, add_special_tokens=False)) + \
        list(tokenizer.encode(suffix, add_special_tokens=False))


def _reconstruction_cache(config: Any, keys: list[torch.Tensor], values: list[torch.Tensor],
                          layers: tuple[int, ...], room: int) -> DynamicCache:
    """A cache whose layers hold the prompt's keys/values `[kv_heads, n, d]` by reference and room for the
    `room` reconstruction tokens (`ReconstructionLayer`)."""
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(layers):
        raise HeadscoreError("the kvzip pass needs every layer of the model to be a plain attention layer")
    cache.layers = [ReconstructionLayer(keys[slot], values[slot], room) for slot in range(len(layers))]
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
    cache = _reconstruction_cache(model.config, keys, values, layers, reconstruction.shape[0])
    recorder = ReconstructionScores(layers)
    with torch.inference_mode(), _recording(model, recorder):
        for start in range(0, reconstruction.shape[0], chunk):
            piece = reconstruction[start:start + chunk].to(device)[None]
            model(input_ids=piece, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    if any(scores is None for scores in recorder.scores):
        raise HeadscoreError("some layers did not call the registered attention function; the kvzip pass "
                             "cannot score this model type")
    return [scores.to(layer_keys.device) for scores, layer_keys in zip(recorder.scores, keys, strict=True)
            if scores is not None]
