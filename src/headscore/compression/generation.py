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

The question after the compressed context (query-agnostic compression, the leaderboard's protocol): prefill and
compress the context alone, then `answer_after(model, cache, questions, rules)` prefills the questions (with
their answer prefixes) on a `fork` of the compressed cache, one row each, and decodes; the compressed context
is never modified, so it serves any number of questions without a new prefill.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from headscore.compression.attention import HEADWISE_ATTENTION
from headscore.compression.cache import HeadwiseCache, RecordedPrompt, window_kv_bytes
from headscore.compression.memory import MemoryTarget, memory_budgets, parse_bytes
from headscore.compression.presses import FullPress, Press, make_press, parse_method
from headscore.compression.presses import load_scores as load_head_scores
from headscore.compression.scorers import EXTRA_PASSES, Rope
from headscore.core.attention import use_attention
from headscore.core.decoding import FinishHook, StopRule, greedy_decode
from headscore.core.defaults import TEMPLATE, WINDOW
from headscore.core.errors import HeadscoreError
from headscore.core.files import fingerprint_file, versions
from headscore.core.kv_cache import GrowingLayer, growing_cache
from headscore.core.model import (
    Geometry,
    eos_ids,
    input_device,
    load_geometry,
    load_model,
    load_tokenizer,
    resolve_device,
    with_cache,
)
from headscore.core.prompts import encode_prompt, render_prompt

# ---------------------------------------------------------------------------------------------- prefill


@dataclass(eq=False, kw_only=True)
class PrefillState(RecordedPrompt):
    """One full prefill: per full-attention layer the full keys/values and the last queries (`RecordedPrompt`,
    what every press selects from), plus the last prompt token's `logits` `[vocab]` and the prompt's
    `input_ids` `[n]`. A hybrid model's sliding-window layers are in `windowed` (model index -> transformers'
    prefilled layer; copied, never modified, by every cache built from the state) and its `config` rebuilds
    their kind."""

    logits: torch.Tensor
    geometry: Geometry
    seconds: float
    input_ids: torch.Tensor | None = None
    windowed: dict[int, Any] = field(default_factory=dict)
    config: Any = None

    @property
    def queries_kept(self) -> int:
        """How many of the last prompt queries each layer holds."""
        return self.layers[0].queries.shape[1]


def rope_of(model: Any) -> Rope | None:
    """The model's rotary parameters (`Rope`), or None where it has no rotary embedding module."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    embedding = getattr(decoder, "rotary_emb", None)
    inv_freq = getattr(embedding, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        return None
    return Rope(inv_freq=inv_freq.float(), attention_scaling=float(getattr(embedding, "attention_scaling", 1.0)))


def run_extra_passes(model: Any, tokenizer: Any, state: PrefillState, names: Collection[str]) -> None:
    """Run each extra pass in `names` (a scorer's `extra_pass`, e.g. KVzip's reconstruction) over the prompt
    of `state` once, storing its per-layer result in `state.extra` (a pass already there is not rerun)."""
    missing = [name for name in dict.fromkeys(names) if name and name not in state.extra]
    if not missing:
        return
    if state.input_ids is None:
        raise HeadscoreError("an extra pass needs the prompt's token ids (prefill records them)")
    for name in missing:
        run = EXTRA_PASSES.get(name)
        if run is None:
            raise HeadscoreError(f"unknown extra pass '{name}': use one of {', '.join(EXTRA_PASSES)}")
        with torch.inference_mode():
            state.add_extra(name, run(model, tokenizer, state.input_ids, state.keys, state.values))


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
    """Prefill `input_ids` `[rows, n]` into `cache`: (last logits [rows, vocab], seconds). With an
    `attention_mask` `[rows, cached + n]` (1: real token, 0: padding; a left-padded batch, or questions left
    padded after a cached context), each row's positions count its real tokens."""
    device = input_device(model)
    # the mask may cover cached tokens too ([rows, cached + n]): the positions are its last n columns'
    masked = {} if attention_mask is None else {
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]}
    with torch.inference_mode(), use_attention(model, HEADWISE_ATTENTION):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=input_ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1, **masked)
        logits = out.logits[:, -1]
        _sync(device)
    return logits, time.perf_counter() - start


def prefill_compressed(model: Any, input_ids: torch.Tensor, press: Press, tokenizer: Any = None
                       ) -> tuple[Any, torch.Tensor, float]:
    """Prefill with compression on the fly: `(cache, last logits [vocab], seconds)`.

    Full attention keeps a `DynamicCache` (growing in place: `core.kv_cache`); every other method a
    `HeadwiseCache` (both with transformers' own bounded layers for a hybrid model's sliding-window layers). A
    method that needs the whole prompt before it selects (an allocation spanning layers, a scorer's extra pass:
    `tokenizer` needed) prefills, then compresses (`prefill`, `compress_state`); `seconds` covers both.
    """
    input_ids = _check_input(model, input_ids)
    geometry = Geometry.from_config(model.config)
    press.check(geometry)
    if press.spans_layers or press.extra_pass:
        start = time.perf_counter()
        state = prefill(model, input_ids, press.window, queries=press.query_count())
        if press.extra_pass:
            run_extra_passes(model, tokenizer, state, [press.extra_pass])
        cache = compress_state(state, press)
        return cache, state.logits, time.perf_counter() - start
    cache = (growing_cache(model.config) if isinstance(press, FullPress)
             else HeadwiseCache(geometry, press, config=model.config, rope=rope_of(model)))
    logits, seconds = _forward(model, input_ids, cache)
    return cache, logits[0], seconds


def prefill(model: Any, input_ids: torch.Tensor, window: int = WINDOW, prefix: DynamicCache | None = None,
            start: int = 0, queries: int | None = None) -> PrefillState:
    """One full prefill recording every layer's keys/values and its last `queries` queries (default: the
    `window`; what the scorers of the presses to come read, `Press.query_count`; no n × n attention).

    `prefix`: a cache already holding `input_ids[:start]` (a shared prefix, `headscore.core.prefix_cache`;
    not modified); only the rest is run (at least `window` tokens), the state still covers every token.
    """
    input_ids = _check_input(model, input_ids)
    full_ids = input_ids[0]
    geometry = Geometry.from_config(model.config)
    cache = HeadwiseCache(geometry, None, window=window, queries=queries, config=model.config, rope=rope_of(model))
    if prefix is not None and start > 0:
        if geometry.compressed_layers is not None:
            raise HeadscoreError("a shared prefix cannot seed a model with sliding-window layers")
        shared_layers: list[Any] = prefix.layers  # DynamicCache's full-attention layers
        prefill_layers: list[Any] = cache.layers  # PrefillLayers (every layer is full attention here)
        for layer, shared in zip(prefill_layers, shared_layers, strict=True):
            layer.seed(shared.keys[:, :, :start], shared.values[:, :, :start])
        input_ids = input_ids[:, start:]
    logits, seconds = _forward(model, input_ids, cache)
    return _states(model, cache, logits, seconds, [full_ids])[0]


def prefill_batch(model: Any, prompts: Sequence[torch.Tensor], window: int = WINDOW, queries: int | None = None
                  ) -> list[PrefillState]:
    """One prefill of several prompts (1-D ids, any lengths), left padded with an attention mask: one
    `PrefillState` per prompt, equal to its own `prefill` but for the rounding padding may bring (each holds
    only its prompt's real tokens; `seconds`: the whole batch's). One prompt: `prefill`. Models with
    sliding-window layers take one prompt at a time."""
    if len(prompts) == 1:
        return [prefill(model, prompts[0], window, queries=queries)]
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
    cache = HeadwiseCache(geometry, None, window=window, queries=queries, config=model.config, rope=rope_of(model))
    logits, seconds = _forward(model, ids, cache, mask)
    return _states(model, cache, logits, seconds, [prompt.reshape(-1) for prompt in prompts])


def _states(model: Any, cache: HeadwiseCache, logits: torch.Tensor, seconds: float,
            prompts: Sequence[torch.Tensor]) -> list[PrefillState]:
    """One `PrefillState` per row of a recording cache after its prefill (`logits` `[rows, vocab]`, `prompts`
    each row's token ids)."""
    if any(item is None for item in cache.recorded):
        raise HeadscoreError("some layers did not call the registered attention function; this model type "
                             "cannot use the head-wise cache")
    geometry = cache.geometry
    full = set(geometry.model_layers)
    windowed = {index: layer for index, layer in enumerate(cache.layers) if index not in full}
    recorded = [rows for rows in cache.recorded if rows is not None]  # every layer's, checked above
    states = []
    for row in range(logits.shape[0]):
        states.append(PrefillState(layers=[rows[row] for rows in recorded], window=cache.window, rope=cache.rope,
                                   logits=logits[row], geometry=geometry, seconds=seconds,
                                   input_ids=prompts[row], windowed=windowed, config=model.config))
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
        return HeadwiseCache.from_prefill(state.geometry, presses, state, config=state.config,
                                          windowed=state.windowed)
    if isinstance(press, FullPress):
        cache = growing_cache(state.config)
        for layer, keys, values in zip(state.geometry.model_layers, state.keys, state.values, strict=True):
            cache.update(keys[None], values[None], layer)
        for index, layer in state.windowed.items():
            cache.layers[index] = copy.copy(layer)
        return cache
    _check_state_press(state, press)
    return HeadwiseCache.from_prefill(state.geometry, press, state, config=state.config, windowed=state.windowed)


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
        return HeadwiseCache.from_rows(geometry, list(rows), config=config)
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
    if press.query_count() > state.queries_kept and state.queries_kept < state.length:
        raise HeadscoreError(f"method {press.name} reads the last {press.query_count()} queries; the prefill kept "
                             f"{state.queries_kept} (prefill(..., queries={press.query_count()}))")
    press.check(state.geometry)


# ---------------------------------------------------------------------------------------------- decode


def decode_rows(model: Any, cache: Any, logits: torch.Tensor, rules: Sequence[StopRule],
                on_finish: FinishHook | None = None, on_select: Callable[[torch.Tensor], None] | None = None,
                lengths: Sequence[int] | None = None, mask: torch.Tensor | None = None
                ) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy decode of every row of `cache` from the prefill's last `logits` `[rows, vocab]` (or `[vocab]`,
    repeated for every row: rows compressed from one prefill): `(tokens per row, seconds of each decode step
    the row took part in)`, with the head-wise attention (`core.decoding.greedy_decode`, the one decode loop).

    Row `i` ends on `rules[i]` (`StopRule`); a finished row is dropped from the batch
    (`cache.batch_select_indices`), so it costs no more work and the cache ends holding the last rows to finish;
    `on_finish` sees each row's cache state just before (e.g. for `cache_report(..., row=position)`), and
    `on_select` gets the kept positions whenever rows leave (for per-row state outside the cache). The rows are
    one prompt's (equal, unpadded lengths: positions follow the cache length), or, with `lengths` (each row's
    real prompt length), prompts left padded to the longest (`compress_rows`): each row then gets its own
    positions and an attention mask hiding its padding; `mask` `[rows, cached]` (1: real, 0: padding) does it
    for padding anywhere (questions left padded after the context: `answer_after`).
    """
    return greedy_decode(model, cache, logits, rules, on_finish, on_select, attention=HEADWISE_ATTENTION,
                         lengths=lengths, mask=mask)


def decode(model: Any, cache: Any, logits: torch.Tensor, max_new_tokens: int,
           eos: Collection[int] = (), line_end: Collection[int] = (),
           min_new_tokens: int = 0) -> tuple[list[int], list[float]]:
    """Greedy decode of a one-row cache from the prefill's last `logits` `[vocab]`: `(tokens, seconds of each
    decode step)`, ending on `StopRule(max_new_tokens, eos, line_end, min_new_tokens)` (`decode_rows`)."""
    rule = StopRule(max_new_tokens, frozenset(eos), frozenset(line_end), min_new_tokens)
    tokens, seconds = decode_rows(model, cache, logits, [rule])
    return tokens[0], seconds[0]


# ---------------------------------------------------------------------------------------------- question after


def fork(cache: Any) -> Any:
    """An independent cache of the same rows that shares `cache`'s entries (no copy): a `HeadwiseCache` through
    `HeadwiseCache.fork` (kept entries shared, its own tail), the full press's cache with its layers copied
    around the same tensors (a growing layer's first update then copies them into its own buffer; transformers'
    layers replace theirs). What the fork is given never changes `cache`."""
    if isinstance(cache, HeadwiseCache):
        return cache.fork()
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in forked.layers:
        if isinstance(layer, GrowingLayer):
            layer._key_buffer = layer._value_buffer = None  # never write into the shared buffers
    return forked


def extend(model: Any, cache: Any, ids: torch.Tensor) -> torch.Tensor:
    """Prefill `ids` `[rows, q]` after what every row of `cache` holds (the question after a compressed context,
    the same number of tokens in every row, no padding): the last logits `[rows, vocab]`, from which
    `decode_rows` continues. `cache` grows by the q tokens (fork it first to keep it as it was)."""
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise HeadscoreError(f"extend takes token ids [rows, q] with q >= 1, got shape {tuple(ids.shape)}")
    logits, _ = _forward(model, ids.to(input_device(model)), cache)
    return logits


def answer_after(model: Any, cache: Any, questions: Sequence[torch.Tensor], rules: StopRule | Sequence[StopRule],
                 lengths: Sequence[int] | None = None) -> tuple[list[list[int]], float]:
    """Answer `questions` after a compressed context: `(tokens per question, seconds)`.

    `cache`: the context(s) alone prefilled and compressed (`prefill_compressed`, `compress_state`,
    `compress_rows`), not modified: one row, asked every question (the row repeated in a `fork`, its kept
    entries shared), or one row per question (e.g. one per method, `compress_state(state, presses)`; contexts of
    different lengths left padded: give each row's real context length in `lengths`, as to `decode_rows`).
    `questions`: 1-D ids each (the question and answer prefix that follow the context), any lengths; they are
    prefilled together on a fork, left padded to the longest with an attention mask (each row's positions
    follow its own context), then decoded greedily by `decode_rows`, question `i` ending on `rules[i]` (one
    rule: every question's). Exact: each question's tokens are those of its own prefill on its compressed
    context. `seconds`: prefill of the questions and decode, wall time.
    """
    rules = [rules] * len(questions) if isinstance(rules, StopRule) else list(rules)
    if not questions or len(rules) != len(questions):
        raise HeadscoreError(f"answer_after takes at least one question and one stop rule per question, got "
                             f"{len(questions)} questions and {len(rules)} rules")
    if any(question.numel() == 0 for question in questions):
        raise HeadscoreError("a question is empty")
    rows = cache.rows if isinstance(cache, HeadwiseCache) else cache.layers[0].keys.shape[0]
    if rows not in (1, len(questions)):
        raise HeadscoreError(f"the cache holds {rows} compressed contexts for {len(questions)} questions: give "
                             "one context, or one per question")
    if lengths is not None and len(lengths) != rows:
        raise HeadscoreError(f"{len(lengths)} context lengths for a cache of {rows} rows")
    device = input_device(model)
    began = time.perf_counter()
    work = fork(cache)
    if rows == 1 and len(questions) > 1:
        work.batch_select_indices(torch.zeros(len(questions), dtype=torch.long, device=device))
    cached, longest = cache.get_seq_length(), max(question.numel() for question in questions)
    ids = torch.zeros(len(questions), longest, dtype=torch.long, device=device)
    mask = torch.ones(len(questions), cached + longest, dtype=torch.long, device=device)
    for row, question in enumerate(questions):  # rows, not tokens
        pad = longest - question.numel()
        ids[row, pad:] = question.reshape(-1).to(device)
        mask[row, cached:cached + pad] = 0
        if lengths is not None:
            mask[row, :cached - lengths[0 if rows == 1 else row]] = 0
    padded = not bool(mask.all())
    logits, _ = _forward(model, ids, work, mask if padded else None)
    tokens, _ = decode_rows(model, work, logits, rules, mask=mask if padded else None)
    _sync(device)
    return tokens, time.perf_counter() - began


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
                 eos: Sequence[int] | set[int] = (), tokenizer: Any = None) -> tuple[list[int], KVReport]:
    """Prefill `input_ids` `[1, n]` with `press`, decode greedily: `(tokens, report)` (`tokenizer`: for a
    scorer's extra pass)."""
    cache, logits, prefill_seconds = prefill_compressed(model, input_ids, press, tokenizer)
    tokens, seconds = decode(model, cache, logits, max_new_tokens, eos)
    report = cache_report(cache, press, Geometry.from_config(model.config), input_ids.shape[-1], len(tokens),
                          prefill_seconds, seconds)
    return tokens, report


def compress_generate(model: Any, tokenizer: Any, context: str, question: str, *, press: Press | None = None,
                      method: str = "headkv", max_new_tokens: int = 64, template: str = TEMPLATE,
                      answer_prefix: str = "", settings: Mapping[str, Any] | None = None,
                      **press_options: Any) -> CompressResult:
    """Answer `question` about `context` on a compressed KV cache.

    Give a ready `press`, or a `method` with `presses.make_press` parameters (`press_options`, each must apply
    to it: budget, ratio, window, the scorer's and the allocation's, scores, budgets) and/or shared `settings`
    (taken where they apply). The prompt is `prompts.render_prompt`'s, ending with `answer_prefix` (text that
    opens the answer; the model continues it, the answer excludes it).
    """

    if not context or not context.strip():
        raise HeadscoreError("the context is empty")
    if not question or not question.strip():
        raise HeadscoreError("the question is empty")
    geometry = Geometry.from_config(model.config)
    if press is None:
        press = make_press(method, geometry, settings, **press_options)
    prompt = render_prompt(tokenizer, context, question, template, answer_prefix)
    ids = encode_prompt(tokenizer, prompt, template)["input_ids"]
    if geometry.max_context and len(ids) + max_new_tokens > geometry.max_context:
        raise HeadscoreError(f"the prompt has {len(ids)} tokens; with {max_new_tokens} new tokens it exceeds the "
                             f"model's context of {geometry.max_context}")
    geometry.check_fits(len(ids) + max_new_tokens)  # a model whose every layer is sliding: within its window
    tokens, report = generate_ids(model, torch.tensor([ids]), press, max_new_tokens=max_new_tokens,
                                  eos=eos_ids(model, tokenizer), tokenizer=tokenizer)
    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return CompressResult(answer=answer, tokens=tokens, report=report)


def compress_files(model_name: str, context_file: str | Path, question: str, *, method: str = "headkv",
                   max_new_tokens: int = 64, template: str = TEMPLATE, answer_prefix: str = "",
                   device: str = "auto",
                   dtype: str | None = None, progress: Callable[[str], None] | None = None,
                   settings: Mapping[str, Any] | None = None, memory: str | int | None = None,
                   **press_options: Any) -> tuple[CompressResult, dict[str, Any]]:
    """The `compress` command: check the inputs and build the press (before loading any weights), load the
    model, answer. Returns the result and a metadata dict (model, geometry, parameters, versions,
    fingerprints). `memory` (a size: 2GiB, 512MiB, bytes): the KV size is the largest whose cache of this
    prompt and `max_new_tokens` fits it (`compression.memory`), stated in the metadata beside the bytes held."""

    path = Path(context_file)
    if not path.is_file():
        raise HeadscoreError(f"context file not found: {path}")
    context = path.read_text(encoding="utf-8")
    if not context.strip():
        raise HeadscoreError(f"context file {path} is empty")
    if not question.strip():
        raise HeadscoreError("the question is empty")
    geometry = load_geometry(model_name)
    press = make_press(method, geometry, settings, **press_options)
    target = None
    if memory is not None:
        settings, target = fit_memory(model_name, geometry, method, {**(settings or {}), **press_options}, memory,
                                      render_prompt(load_tokenizer(model_name), context, question, template,
                                                    answer_prefix), template, max_new_tokens, dtype, device)
        press, press_options = make_press(method, geometry, settings), {}
    if progress:
        progress("loading the model")
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    if progress:
        progress(f"{method}: prefill + decode")
    result = compress_generate(model, tokenizer, context, question, press=press, max_new_tokens=max_new_tokens,
                               template=template, answer_prefix=answer_prefix)
    files = {"context_file": str(path), "context_fingerprint": fingerprint_file(path)}
    given = {**(settings or {}), **press_options}
    for key in ("scores", "budgets"):
        source = given.get(key)
        if isinstance(source, (str, Path)):
            files[f"{key}_file"], files[f"{key}_fingerprint"] = str(source), fingerprint_file(source)
    metadata = {"model": model_name, "geometry": geometry.to_dict(), "question": question,
                "template": template, "answer_prefix": answer_prefix, "max_new_tokens": max_new_tokens,
                "device": resolve_device(device),
                "dtype": str(next(model.parameters()).dtype), "press": press.describe(), **files,
                **({"memory_target": target} if target is not None else {}), "versions": versions()}
    return result, metadata


def fit_memory(model_name: str, geometry: Geometry, method: str, settings: Mapping[str, Any], memory: str | int,
               prompt: str, template: str, max_new_tokens: int, dtype: str | None, device: str
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings of `compress --memory` (its `budget`: the largest KV size whose cache of `prompt` fits
    `memory`) and the target with the bytes it holds."""
    spec = parse_method(method)
    if spec.press is not None or spec.allocation is None:
        raise HeadscoreError(f"a memory target sizes a scorer × allocation method, not {method}")
    length = len(encode_prompt(load_tokenizer(model_name), prompt, template)["input_ids"])
    cache_dtype = dtype or ("bfloat16" if resolve_device(device).startswith("cuda") else "float32")
    target = MemoryTarget(parse_bytes(memory), length, 1, cache_dtype, max(max_new_tokens - 1, 0))
    scores = settings.get("scores")
    params = {k: settings[k] for k in ("beta", "temp", "pyramid_beta") if settings.get(k) is not None}
    window = settings.get("window")
    budgets, held = memory_budgets(spec.allocation, geometry, target, window=WINDOW if window is None else window,
                                   granularity=settings.get("granularity"),
                                   scores=None if scores is None else load_head_scores(scores), **params)
    return {**settings, "budget": budgets.budget, "ratio": None}, {**target.to_dict(), "bytes_held": held,
                                                                     "budget": budgets.budget}
