"""Generation on a head-level compressed KV cache: prefill with selection, then greedy decode.

Two ways in, identical by construction (both compress with `HeadwiseLayer.build` on the same
full keys/values and window scores):

- `prefill_compressed(model, input_ids, press)`: one prefill that compresses each layer as soon as its exact
  output is computed (the full keys/values of one layer at a time are alive);
- `prefill(model, input_ids, window)` -> `PrefillState` (every layer's full keys/values and window scores),
  then `compress_state(state, press)` for any number of methods/budgets ("prefill once, compress many").

`decode_rows(model, cache, logits, rules)` continues greedily from the prefill's last logits, one batch row
per condition (a cache of several rows: `compress_state(state, [press, ...])`), each row ending on its own
`StopRule` and dropped from the batch when it does; `decode` is its one-row form. `compress_generate` does it
all for a context and a question and returns the answer with a `KVReport`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from headscore.compression.attention import HEADWISE_ATTENTION
from headscore.compression.cache import HeadwiseCache, window_kv_bytes
from headscore.compression.presses import FullPress, Press, make_press
from headscore.core.attention import use_attention
from headscore.core.decoding import FinishHook, StopRule, greedy_decode
from headscore.core.defaults import TEMPLATE, WINDOW
from headscore.core.errors import HeadscoreError
from headscore.core.files import fingerprint_file, versions
from headscore.core.kv_cache import growing_cache
from headscore.core.model import (
    Geometry,
    eos_ids,
    input_device,
    load_geometry,
    load_model,
    resolve_device,
    with_cache,
)
from headscore.core.prompts import encode_prompt, render_prompt

# ---------------------------------------------------------------------------------------------- prefill


@dataclass
class PrefillState:
    """One full prefill: per full-attention layer the full `keys`/`values` `[kv_heads, n, d]` and the window
    scores `[q_heads, n − window]` (float32), plus the last prompt token's `logits` `[vocab]`. A hybrid
    model's sliding-window layers are in `windowed` (model index -> transformers' prefilled layer; copied,
    never modified, by every cache built from the state) and its `config` rebuilds their kind."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scores: list[torch.Tensor]
    window: int
    logits: torch.Tensor
    geometry: Geometry
    seconds: float
    windowed: dict[int, Any] = field(default_factory=dict)
    config: Any = None

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_input(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise HeadscoreError(f"prefill takes one prompt (batches: model.generate on a HeadwiseCache), got a "
                             f"batch of {input_ids.shape[0]}")
    if input_ids.shape[1] == 0:
        raise HeadscoreError("the prompt is empty")
    return input_ids.to(input_device(model))


def _forward(model: Any, input_ids: torch.Tensor, cache: Any, attention_mask: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, float]:
    """Prefill `input_ids` `[rows, n]` into `cache`: (last logits [rows, vocab], seconds). With a left-padded
    batch's `attention_mask` `[rows, n]`, each row's positions count from its first real token."""
    device = input_device(model)
    masked = {} if attention_mask is None else {"attention_mask": attention_mask,
                                                "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}
    with torch.inference_mode(), use_attention(model, HEADWISE_ATTENTION):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=input_ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1, **masked)
        logits = out.logits[:, -1]
        _sync(device)
    return logits, time.perf_counter() - start


def prefill_compressed(model: Any, input_ids: torch.Tensor, press: Press) -> tuple[Any, torch.Tensor, float]:
    """Prefill with compression on the fly: `(cache, last logits [vocab], seconds)`.

    Full attention keeps a `DynamicCache` (growing in place: `core.kv_cache`); every other method a
    `HeadwiseCache` (both with transformers' own bounded layers for a hybrid model's sliding-window layers).
    """
    input_ids = _check_input(model, input_ids)
    geometry = Geometry.from_config(model.config)
    press.check(geometry)
    cache = (growing_cache(model.config) if isinstance(press, FullPress)
             else HeadwiseCache(geometry, press, config=model.config))
    logits, seconds = _forward(model, input_ids, cache)
    return cache, logits[0], seconds


def prefill(model: Any, input_ids: torch.Tensor, window: int = WINDOW, prefix: DynamicCache | None = None,
            start: int = 0) -> PrefillState:
    """One full prefill recording every layer's keys/values and window scores (only the `window` query rows
    are scored; no n × n attention).

    `prefix`: a cache already holding `input_ids[:start]` (a shared prefix, `headscore.core.prefix_cache`;
    not modified); only the rest is run (at least `window` tokens), the state still covers every token.
    """
    input_ids = _check_input(model, input_ids)
    geometry = Geometry.from_config(model.config)
    cache = HeadwiseCache(geometry, None, window=window, config=model.config)
    if prefix is not None and start > 0:
        if geometry.compressed_layers is not None:
            raise HeadscoreError("a shared prefix cannot seed a model with sliding-window layers")
        shared_layers: list[Any] = prefix.layers  # DynamicCache's full-attention layers
        prefill_layers: list[Any] = cache.layers  # PrefillLayers (every layer is full attention here)
        for layer, shared in zip(prefill_layers, shared_layers, strict=True):
            layer.seed(shared.keys[:, :, :start], shared.values[:, :, :start])
        input_ids = input_ids[:, start:]
    logits, seconds = _forward(model, input_ids, cache)
    return _states(model, cache, logits, seconds)[0]


def prefill_batch(model: Any, prompts: Sequence[torch.Tensor], window: int = WINDOW) -> list[PrefillState]:
    """One prefill of several prompts (1-D ids, any lengths), left padded with an attention mask: one
    `PrefillState` per prompt, equal to its own `prefill` but for the rounding padding may bring (each holds
    only its prompt's real tokens; `seconds`: the whole batch's). One prompt: `prefill`. Models with
    sliding-window layers take one prompt at a time."""
    if len(prompts) == 1:
        return [prefill(model, prompts[0], window)]
    geometry = Geometry.from_config(model.config)
    if geometry.compressed_layers is not None:
        raise HeadscoreError("a batch of prompts needs a model whose layers are all full attention (this one has "
                             "sliding-window layers): use a batch size of 1")
    if any(prompt.numel() == 0 for prompt in prompts):
        raise HeadscoreError("the prompt is empty")
    width = max(prompt.shape[-1] for prompt in prompts)
    device = input_device(model)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # rows, not tokens
        ids[row, width - prompt.shape[-1]:], mask[row, width - prompt.shape[-1]:] = prompt.reshape(-1), 1
    cache = HeadwiseCache(geometry, None, window=window, config=model.config)
    logits, seconds = _forward(model, ids, cache, mask)
    return _states(model, cache, logits, seconds)


def _states(model: Any, cache: HeadwiseCache, logits: torch.Tensor, seconds: float) -> list[PrefillState]:
    """One `PrefillState` per row of a recording cache after its prefill (`logits` `[rows, vocab]`)."""
    if any(item is None for item in cache.recorded):
        raise HeadscoreError("some layers did not call the registered attention function; this model type "
                             "cannot use the head-wise cache")
    geometry = cache.geometry
    full = set(geometry.model_layers)
    windowed = {index: layer for index, layer in enumerate(cache.layers) if index not in full}
    recorded = [rows for rows in cache.recorded if rows is not None]  # every layer's, checked above
    states = []
    for row in range(logits.shape[0]):
        keys, values, scores = (list(parts) for parts in zip(*(rows[row] for rows in recorded), strict=True))
        states.append(PrefillState(keys=keys, values=values, scores=scores, window=cache.window,
                                   logits=logits[row], geometry=geometry, seconds=seconds, windowed=windowed,
                                   config=model.config))
    return states


def compress_state(state: PrefillState, press: Press | Sequence[Press]) -> Any:
    """A fresh cache for `press` from a `PrefillState` (the state is not modified; reuse it freely).

    A list of presses gives one `HeadwiseCache` with a row per press (decoded together by `decode_rows`); the
    full press alone gives a plain `DynamicCache` (it cannot share a batch with compressed rows).
    """
    if isinstance(press, Sequence):
        presses = list(press)
        if any(isinstance(p, FullPress) for p in presses):
            raise HeadscoreError("the full press runs on its own cache, not as a row of a head-wise batch")
        for p in presses:
            _check_state_press(state, p)
        recorded = list(zip(state.keys, state.values, state.scores, strict=True))
        return HeadwiseCache.from_prefill(state.geometry, presses, recorded, config=state.config,
                                          windowed=state.windowed)
    if isinstance(press, FullPress):
        cache = growing_cache(state.config)
        for layer, keys, values in zip(state.geometry.model_layers, state.keys, state.values, strict=True):
            cache.update(keys[None], values[None], layer)
        for index, layer in state.windowed.items():
            cache.layers[index] = copy.copy(layer)
        return cache
    _check_state_press(state, press)
    recorded = list(zip(state.keys, state.values, state.scores, strict=True))
    return HeadwiseCache.from_prefill(state.geometry, press, recorded, config=state.config,
                                      windowed=state.windowed)


def compress_rows(rows: Sequence[tuple[PrefillState, Press]]) -> Any:
    """A fresh cache with one row per `(state, press)`; the states are not modified.

    Rows of one state: `compress_state`. Rows of several states (prompts of different lengths) are left padded
    to the longest: a `HeadwiseCache` (`HeadwiseCache.from_rows`; nothing stored for the padding), or, when every
    press is full, a `DynamicCache` holding zeros at the padding. Decode them with `decode_rows(...,
    lengths=[state.length, ...])`, which gives each row its own positions and masks the padding.
    """
    states = [state for state, _ in rows]
    presses = [press for _, press in rows]
    if all(state is states[0] for state in states):
        return compress_state(states[0], presses[0] if len(presses) == 1 else presses)
    if any(state.windowed for state in states):
        raise HeadscoreError("rows of several prompts need a model whose layers are all full attention")
    full = [isinstance(press, FullPress) for press in presses]
    if any(full) and not all(full):
        raise HeadscoreError("the full press runs on its own cache, not as a row of a head-wise batch")
    geometry, config = states[0].geometry, states[0].config
    if not all(full):
        for state, press in rows:
            _check_state_press(state, press)
        return HeadwiseCache.from_rows(geometry, [(list(zip(state.keys, state.values, state.scores, strict=True)),
                                                   press) for state, press in rows], config=config)
    cache = growing_cache(config)
    width = max(state.length for state in states)
    for slot, layer in enumerate(geometry.model_layers):
        first = states[0].keys[slot]
        keys = first.new_zeros(len(rows), first.shape[0], width, first.shape[-1])
        values = keys.clone()
        for row, state in enumerate(states):  # rows, not tokens
            keys[row, :, width - state.length:] = state.keys[slot]
            values[row, :, width - state.length:] = state.values[slot]
        cache.update(keys, values, layer)
    return cache


def _check_state_press(state: PrefillState, press: Press) -> None:
    if press.window != state.window:
        raise HeadscoreError(f"the prefill state was scored with window {state.window}, the method asks "
                             f"for window {press.window}")
    press.check(state.geometry)


# ---------------------------------------------------------------------------------------------- decode


def decode_rows(model: Any, cache: Any, logits: torch.Tensor, rules: Sequence[StopRule],
                on_finish: FinishHook | None = None, on_select: Callable[[torch.Tensor], None] | None = None,
                lengths: Sequence[int] | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy decode of every row of `cache` from the prefill's last `logits` `[rows, vocab]` (or `[vocab]`,
    repeated for every row: rows compressed from one prefill): `(tokens per row, seconds of each decode step
    the row took part in)`, with the head-wise attention (`core.decoding.greedy_decode`, the one decode loop).

    Row `i` ends on `rules[i]` (`StopRule`); a finished row is dropped from the batch
    (`cache.batch_select_indices`), so it costs no more work and the cache ends holding the last rows to finish;
    `on_finish` sees each row's cache state just before (e.g. for `cache_report(..., row=position)`), and
    `on_select` gets the kept positions whenever rows leave (for per-row state outside the cache). The rows are
    one prompt's (equal, unpadded lengths: positions follow the cache length), or, with `lengths` (each row's
    real prompt length), prompts left padded to the longest (`compress_rows`): each row then gets its own
    positions and an attention mask hiding its padding.
    """
    return greedy_decode(model, cache, logits, rules, on_finish, on_select, attention=HEADWISE_ATTENTION,
                         lengths=lengths)


def decode(model: Any, cache: Any, logits: torch.Tensor, max_new_tokens: int,
           eos: Collection[int] = (), line_end: Collection[int] = (),
           min_new_tokens: int = 0) -> tuple[list[int], list[float]]:
    """Greedy decode of a one-row cache from the prefill's last `logits` `[vocab]`: `(tokens, seconds of each
    decode step)`, ending on `StopRule(max_new_tokens, eos, line_end, min_new_tokens)` (`decode_rows`)."""
    rule = StopRule(max_new_tokens, frozenset(eos), frozenset(line_end), min_new_tokens)
    tokens, seconds = decode_rows(model, cache, logits, [rule])
    return tokens[0], seconds[0]


# ---------------------------------------------------------------------------------------------- report


@dataclass
class KVReport:
    """What the compressed cache held after generation, and how long it took."""

    method: str
    press: dict
    context_tokens: int
    generated_tokens: int
    kept: list[list[int]]  # [compressed layers][heads], prompt entries kept per cache head, window included
    kv_bytes: int  # keys + values stored (kept prompt entries + generated tail; sliding-window layers included)
    full_kv_bytes: int  # what the full cache holds for the same tokens (sliding-window layers included)
    index_bytes: int  # head index and per-head counts of the head-wise cache
    prefill_seconds: float
    decode_seconds: list[float] = field(default_factory=list)
    window_kv_bytes: int = 0  # of kv_bytes: held by a hybrid model's sliding-window layers (never compressed)

    @property
    def kept_per_layer(self) -> list[int]:
        return [sum(row) for row in self.kept]

    @property
    def ratio(self) -> float:
        """Compressed over full KV bytes."""
        return self.kv_bytes / self.full_kv_bytes if self.full_kv_bytes else 1.0

    @property
    def decode_per_token(self) -> float | None:
        return sum(self.decode_seconds) / len(self.decode_seconds) if self.decode_seconds else None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "press": self.press, "context_tokens": self.context_tokens,
                "generated_tokens": self.generated_tokens, "kept_per_layer": self.kept_per_layer,
                "kept": self.kept, "kv_bytes": self.kv_bytes, "full_kv_bytes": self.full_kv_bytes,
                "ratio": self.ratio, "window_kv_bytes": self.window_kv_bytes,
                "index_bytes": self.index_bytes, "prefill_seconds": self.prefill_seconds,
                "decode_seconds_per_token": self.decode_per_token, "decode_seconds": self.decode_seconds}


def cache_report(cache: Any, press: Press, geometry: Geometry, context_tokens: int, generated_tokens: int,
                 prefill_seconds: float, decode_seconds: list[float], row: int = 0, padding: int = 0) -> KVReport:
    """Measure `cache` (a `HeadwiseCache`, its `row`, or the full `DynamicCache`, its `row` after `padding`
    left-padding positions) into a `KVReport`."""
    windowed = window_kv_bytes(cache)
    if isinstance(cache, HeadwiseCache):
        kept = cache.kept(row).tolist()
        kv_bytes, index_bytes = cache.kv_bytes(row), cache.index_bytes(row)
        windowed //= max(cache.rows, 1)
        layer = cache.compressed[0]
        cached, element, dim = layer.lengths[row] + layer.generated, layer.keys.element_size(), layer.keys.shape[-1]
    else:
        keys = [cache.layers[index].keys[row:row + 1, :, padding:] for index in geometry.model_layers]
        kept = [[context_tokens] * k.shape[1] for k in keys]
        kv_bytes = sum(2 * k.numel() * k.element_size() for k in keys) + windowed
        index_bytes, cached, element, dim = 0, keys[0].shape[2], keys[0].element_size(), keys[0].shape[-1]
    full = geometry.layers * geometry.kv_heads * cached * dim * 2 * element + windowed
    return KVReport(method=press.name, press=press.describe_at(context_tokens), context_tokens=context_tokens,
                    generated_tokens=generated_tokens, kept=kept, kv_bytes=kv_bytes, full_kv_bytes=full,
                    index_bytes=index_bytes, prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                    window_kv_bytes=windowed)


# ---------------------------------------------------------------------------------------------- the API


@dataclass
class CompressResult:
    answer: str
    tokens: list[int]
    report: KVReport


def generate_ids(model: Any, input_ids: torch.Tensor, press: Press, *, max_new_tokens: int = 64,
                 eos: Sequence[int] | set[int] = ()) -> tuple[list[int], KVReport]:
    """Prefill `input_ids` `[1, n]` with `press`, decode greedily: `(tokens, report)`."""
    cache, logits, prefill_seconds = prefill_compressed(model, input_ids, press)
    tokens, seconds = decode(model, cache, logits, max_new_tokens, eos)
    report = cache_report(cache, press, Geometry.from_config(model.config), input_ids.shape[-1], len(tokens),
                          prefill_seconds, seconds)
    return tokens, report


def compress_generate(model: Any, tokenizer: Any, context: str, question: str, *, press: Press | None = None,
                      method: str = "headkv", max_new_tokens: int = 64, template: str = TEMPLATE,
                      answer_prefix: str = "", **press_options: Any) -> CompressResult:
    """Answer `question` about `context` on a compressed KV cache.

    Give a ready `press`, or a `method` and `presses.make_press` parameters (budget, window, kernel, alpha,
    sinks, pyramid_beta, beta, temp, granularity, scores, budgets). The prompt is `prompts.render_prompt`'s,
    ending with `answer_prefix` (text that opens the answer; the model continues it, the answer excludes it).
    """

    if not context or not context.strip():
        raise HeadscoreError("the context is empty")
    if not question or not question.strip():
        raise HeadscoreError("the question is empty")
    geometry = Geometry.from_config(model.config)
    if press is None:
        press = make_press(method, geometry, **press_options)
    prompt = render_prompt(tokenizer, context, question, template, answer_prefix)
    ids = encode_prompt(tokenizer, prompt, template)["input_ids"]
    if geometry.max_context and len(ids) + max_new_tokens > geometry.max_context:
        raise HeadscoreError(f"the prompt has {len(ids)} tokens; with {max_new_tokens} new tokens it exceeds the "
                             f"model's context of {geometry.max_context}")
    geometry.check_fits(len(ids) + max_new_tokens)  # a model whose every layer is sliding: within its window
    tokens, report = generate_ids(model, torch.tensor([ids]), press, max_new_tokens=max_new_tokens,
                                  eos=eos_ids(model, tokenizer))
    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return CompressResult(answer=answer, tokens=tokens, report=report)


def compress_files(model_name: str, context_file: str | Path, question: str, *, method: str = "headkv",
                   max_new_tokens: int = 64, template: str = TEMPLATE, answer_prefix: str = "",
                   device: str = "auto",
                   dtype: str | None = None, progress: Callable[[str], None] | None = None,
                   **press_options: Any) -> tuple[CompressResult, dict[str, Any]]:
    """The `compress` command: check the inputs and build the press (before loading any weights), load the
    model, answer. Returns the result and a metadata dict (model, geometry, parameters, versions,
    fingerprints)."""

    path = Path(context_file)
    if not path.is_file():
        raise HeadscoreError(f"context file not found: {path}")
    context = path.read_text(encoding="utf-8")
    if not context.strip():
        raise HeadscoreError(f"context file {path} is empty")
    if not question.strip():
        raise HeadscoreError("the question is empty")
    geometry = load_geometry(model_name)
    press = make_press(method, geometry, **press_options)
    if progress:
        progress("loading the model")
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    if progress:
        progress(f"{method}: prefill + decode")
    result = compress_generate(model, tokenizer, context, question, press=press, max_new_tokens=max_new_tokens,
                               template=template, answer_prefix=answer_prefix)
    files = {"context_file": str(path), "context_fingerprint": fingerprint_file(path)}
    for key in ("scores", "budgets"):
        source = press_options.get(key)
        if isinstance(source, (str, Path)):
            files[f"{key}_file"], files[f"{key}_fingerprint"] = str(source), fingerprint_file(source)
    metadata = {"model": model_name, "geometry": geometry.to_dict(), "question": question,
                "template": template, "answer_prefix": answer_prefix, "max_new_tokens": max_new_tokens,
                "device": resolve_device(device),
                "dtype": str(next(model.parameters()).dtype), "press": press.describe(), **files,
                "versions": versions()}
    return result, metadata
