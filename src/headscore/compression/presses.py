"""SnapKV-style selection at prefill, and the compression methods ("presses") built on it.

The last `window` prompt tokens form the observation window. Their queries' attention over the earlier
`m = context − window` tokens is averaged over the window (`window_scores`), smoothed by a 1-D max-pool
(`pool_scores`), averaged over the query heads of each KV group (`group_scores`), and each head keeps its top
`budget` positions (`kept_positions`) plus the window, in original order.

A press is a small dataclass registered under its CLI name (`@register_press("snapkv")`, `PRESSES`) that
checks its own parameters in `__post_init__`: `head_scores` turns the window scores of one layer into
per-head selection scores `[heads, m]`, `layer_budgets` says how many positions each head keeps `[heads]`
(excluding the window). Presses with a fixed budget matrix (streaming, snapkv, pyramidkv, headkv) are
`BudgetPress`es and differ only in where their `Budgets` come from. `make_press(name, geometry, **params)`
builds any of them from one set of parameters (the CLI's options).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F

from headscore.compression.allocation import PYRAMID_SCHEDULES, allocate, head_importance, pyramid_official_budgets
from headscore.compression.budgets import (
    GRANULARITIES,
    Budgets,
    check_budget,
    check_pyramid_beta,
    check_window,
    resolve_granularity,
)
from headscore.compression.budgets_file import read_budgets
from headscore.core.attention import attention_rows
from headscore.core.defaults import (
    ADA_ALLOCATION,
    ALPHA,
    BETA,
    BEYOND_PROMPT,
    BUDGET,
    KERNEL,
    PYRAMID_BETA,
    PYRAMID_SCHEDULE,
    SCORE_DTYPE,
    SINKS,
    TEMP,
    WINDOW,
)
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry
from headscore.scoring.head_scores import HeadScores, read_head_scores

# ---------------------------------------------------------------------------------------------- tensors


def window_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float | None, window: int) -> torch.Tensor:
    """Mean attention of the last `window` queries over the tokens before the window.

    `query` [q_heads, n, d] or only its last `window` rows, `keys` [kv_heads, n, d] -> float32
    [q_heads, n − window]. Softmax over all n keys with a causal mask inside the window (the official rule);
    only the window's rows are computed, never n × n.
    """

    n = keys.shape[1]
    rows = attention_rows(query[None, :, -window:], keys[None], scaling, causal_offset=n - window)[0]
    return rows[..., : n - window].mean(dim=1)


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D max-pool over the last axis with stride 1 and 'same' length: `[..., m]` -> `[..., m]`."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    pooled = F.max_pool1d(scores.reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2)
    return pooled[..., : shape[-1]].reshape(shape)


def group_scores(scores: torch.Tensor, heads: int) -> torch.Tensor:
    """Mean over the query heads sharing a cache head: `[q_heads, m]` -> `[heads, m]` (`repeat_kv` layout)."""
    q_heads, m = scores.shape
    if heads == q_heads:
        return scores
    return scores.view(heads, q_heads // heads, m).mean(dim=1)


def kept_positions(scores: torch.Tensor, budgets: torch.Tensor,
                   window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each head's top `budgets[h]` positions by `scores` `[heads, m]`, plus the `window` positions after them.

    `budgets`: int64 `[heads]` on the CPU, clamped here to [0, m] (the one clamp of every press's budgets).
    Returns `(head, position, kept)`: int64 `[total]` head and position of every kept entry on the scores'
    device, head-major with positions ascending (original order), and the CPU int64 `[heads]` count per head
    (window included). Variable-length without loops over heads and without device syncs: the lengths are
    known on the CPU.
    """
    heads, m = scores.shape
    device = scores.device
    budgets = budgets.cpu().clamp(min=0, max=m)
    top = int(budgets.max()) if heads else 0
    if top > 0:
        chosen = scores.topk(top, dim=-1).indices
        unused = (torch.arange(top)[None, :] >= budgets[:, None]).to(device, non_blocking=True)
        chosen = chosen.masked_fill(unused, m + window).sort(dim=-1).values  # kept first, ascending
    else:
        chosen = torch.empty(heads, 0, dtype=torch.int64, device=device)
    tail = torch.arange(m, m + window, device=device).expand(heads, window)
    table = torch.cat([chosen, tail], dim=1)  # [heads, top + window]
    kept = budgets + window
    head = torch.repeat_interleave(torch.arange(heads), kept)
    rank = torch.arange(int(kept.sum())) - torch.repeat_interleave(kept.cumsum(0) - kept, kept)
    column = torch.where(rank < budgets[head], rank, rank - budgets[head] + top)
    head = head.to(device, non_blocking=True)
    return head, table[head, column.to(device, non_blocking=True)], kept


def adaptive_budgets(scores: torch.Tensor, budget: int, alpha: float) -> torch.Tensor:
    """AdaKV: one layer's `[heads, m]` scores -> int64 `[heads]` budgets.

    Every head gets a floor of `int(alpha · budget)`; the rest of the layer's `budget · heads` entries go to
    the top scores over all heads jointly. Clamped to `m`.
    """
    heads, m = scores.shape
    floor = int(alpha * budget)
    pool = min(max(budget - floor, 0) * heads, heads * m)
    counts = torch.zeros(heads, dtype=torch.int64, device=scores.device)
    if pool > 0:
        picked = scores.reshape(-1).topk(pool).indices // m
        counts = torch.bincount(picked, minlength=heads)
    return (counts + floor).clamp(max=m)


def adaptive_budgets_official(scores: torch.Tensor, budget: int, alpha: float) -> torch.Tensor:
    """AdaKV as the authors run it (HeadKV `snapkv_utils.py` L262–276, `normalize=True`): one layer's
    `[heads, m]` scores -> int64 `[heads]` budgets.

    Each head's scores are weighted by the share of its mass in its own top `budget`; the top `budget · heads`
    weighted scores over all heads are counted per head; budget = round(count · (1 − alpha) + int(alpha ·
    budget)), rounded half-to-even in float32 as theirs. Clamped to `m`.
    """
    heads, m = scores.shape
    top = min(budget, m)
    weight = scores.topk(top, dim=-1).values.sum(-1, keepdim=True) / scores.sum(-1, keepdim=True)
    picked = (scores * weight).reshape(-1).topk(min(budget * heads, heads * m)).indices // m
    counts = torch.bincount(picked, minlength=heads).to(torch.float32)
    return torch.round(counts * (1 - alpha) + int(budget * alpha)).to(torch.int64).clamp(max=m)


ADA_ALLOCATIONS = ("pool", "official")
# press parameters that select the authors' behaviour (docs/fidelity.md)
FIDELITY_OPTIONS = ("granularity", "beyond_prompt", "score_dtype", "pyramid_schedule", "ada_allocation")
BEYOND_PROMPT_MODES = ("clamp", "keep")
SCORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class FidelityOptions:
    """The press parameters that select the authors' behaviour (docs/fidelity.md); the defaults are
    headscore's. `params()` is what `make_press` takes (each press uses those that are its fields)."""

    beyond_prompt: str = BEYOND_PROMPT
    score_dtype: str = SCORE_DTYPE
    pyramid_schedule: str = PYRAMID_SCHEDULE
    ada_allocation: str = ADA_ALLOCATION

    def params(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def streaming_scores(heads: int, m: int, sinks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Scores that rank the first `sinks` positions first, then the most recent ones: `[heads, m]`."""
    order = torch.arange(m, dtype=torch.float32, device=device)
    first = min(sinks, m)
    order[:first] = 2 * m - order[:first]  # sinks first, the earliest first
    return order.expand(heads, m)


def equal_kv_full_heads(budget: int, heads: int, length: int, sinks: int, window: int) -> int:
    """RazorAttention's k at the KV of a budget (the HeadKV authors' rule for their comparison): the entries a
    budget B leaves beyond every head's sinks and window, (B − sinks − window) · heads, spread over full-cache
    heads of `length` entries: k = round((B − sinks − window) · heads / length), halves rounded up, clamped to
    [0, heads]. `heads`: heads over all layers (L · H). B = 128, L = H = 32, length 8,640 -> 13.75 -> 14."""
    spare = max(budget - sinks - window, 0) * heads
    return min((2 * spare + length) // (2 * length), heads)


def head_ranks(importance: torch.Tensor) -> torch.Tensor:
    """`[layers, heads]` scores -> int64 `[layers, heads]` rank of every head over all layers (0: the highest;
    ties broken by position, stable)."""
    order = torch.argsort(importance.flatten(), descending=True, stable=True)
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel())).view(importance.shape)


@dataclass
class SummaryEntries:
    """Entries a press adds beside its selection: `keys`/`values` `[c, d]`, their cache `head` int64 `[c]`, and
    `log_weight` float32 `[c]`, added to their attention logits (log of the number of tokens each stands for)."""

    keys: torch.Tensor
    values: torch.Tensor
    head: torch.Tensor
    log_weight: torch.Tensor


# ---------------------------------------------------------------------------------------------- presses

PRESSES: dict[str, type[Press]] = {}
P = TypeVar("P", bound="type[Press]")


def register_press(name: str) -> Callable[[P], P]:
    """Class decorator: register a press dataclass under its CLI name (`--method NAME`)."""

    def add(cls: P) -> P:
        cls.name = name
        PRESSES[name] = cls
        return cls

    return add


def check_count(value: Any, what: str, minimum: int) -> None:
    """An integer parameter of a press, at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise HeadscoreError(f"{what} must be {kind}, got {value!r}")


@dataclass
class Press:
    """Base of every method. `window`: observation window (kept by every head on top of its budget);
    `kernel`: max-pool width smoothing the window scores.

    `granularity`: "kv" (one selection per KV head, scores averaged over its query heads; None = "kv") or
    "query" (one per query head, the authors' layout: 4x the entries on Llama-3). `beyond_prompt`: "clamp"
    (each head keeps at most the prompt) or "keep" (the authors: a layer whose nominal budget exceeds the
    prompt is kept whole). `score_dtype`: the window scores are rounded to it before pooling and top-k
    ("float16": the authors' LongBench runs, whose fp16 weights decide ties).
    """

    window: int = WINDOW
    kernel: int = KERNEL
    granularity: str | None = None
    beyond_prompt: str = BEYOND_PROMPT
    score_dtype: str = SCORE_DTYPE
    name: ClassVar[str] = "press"
    options: ClassVar[tuple[str, ...]] = ()  # parameters `build` takes besides the fields

    def __post_init__(self) -> None:
        check_window(self.window)
        check_count(self.kernel, "kernel", 1)
        for value, allowed, what in ((self.granularity, (None, *GRANULARITIES), "granularity"),
                                     (self.beyond_prompt, BEYOND_PROMPT_MODES, "beyond-prompt"),
                                     (self.score_dtype, tuple(SCORE_DTYPES), "score dtype")):
            if value not in allowed:
                raise HeadscoreError(f"unknown {what} '{value}': use {', '.join(a for a in allowed if a)}")

    def nominal_budget(self, layer: int) -> int | None:
        """The budget (window excluded) the authors compare with the prompt to keep a layer whole; None: never."""
        return None

    def prompt_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """`layer_budgets`, or every position of a layer kept whole (`beyond_prompt` "keep": nominal budget
        above the `m` positions of `scores` `[heads, m]`)."""
        nominal = self.nominal_budget(layer)
        if self.beyond_prompt == "keep" and nominal is not None and nominal > scores.shape[1]:
            return torch.full((scores.shape[0],), scores.shape[1], dtype=torch.int64)
        return self.layer_budgets(layer, scores, geometry)

    @classmethod
    def build(cls, geometry: Geometry, **params: Any) -> Press:
        """The press from `make_press` parameters (only its fields and `options` are passed)."""
        return cls(**params)

    def check(self, geometry: Geometry) -> None:
        """Raise if the press cannot run on a model of `geometry`."""

    def cache_heads(self, geometry: Geometry) -> int:
        """Heads the cache stores a selection for: KV heads, or query heads at "query" granularity."""
        return geometry.query_heads if self.granularity == "query" else geometry.kv_heads

    def head_scores(self, scores: torch.Tensor, heads: int) -> torch.Tensor:
        """One layer's window scores `[q_heads, m]` -> selection scores `[heads, m]` (rounded to `score_dtype`,
        pool, then group mean)."""
        return group_scores(pool_scores(scores.to(SCORE_DTYPES[self.score_dtype]), self.kernel), heads)

    def layer_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Positions each head keeps before the window: int64 `[heads]` on the CPU (`kept_positions` clamps
        them to the `m` positions of `scores` `[heads, m]`)."""
        raise NotImplementedError

    def summary_entries(self, layer: int, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor,
                        heads: int) -> SummaryEntries | None:
        """Extra entries that stand for dropped ones (RazorAttention's compensation token); None: no extras.
        `keys`/`values` `[kv_heads, n, d]`: the layer's full prompt; `kept` `[heads]` the selection's counts."""
        return None

    def describe(self) -> dict:
        """The method and its parameters (the dataclass fields), for reports and metadata; the fidelity options
        (`FIDELITY_OPTIONS`) only where they differ from their defaults, so the default report layout stays."""
        shown = [f.name for f in fields(self)
                 if f.init and (f.name not in FIDELITY_OPTIONS or getattr(self, f.name) != f.default)]
        return {"method": self.name, **{name: getattr(self, name) for name in shown}}

    def describe_at(self, length: int) -> dict:
        """`describe()` for one prompt of `length` tokens (the KV report; a press whose choices depend on the
        prompt's length adds them)."""
        return self.describe()


def press_options(cls: type[Press]) -> set[str]:
    """The `make_press` parameters a press takes: its fields and its `options`."""
    return {f.name for f in fields(cls) if f.init} | set(cls.options)


def make_press(name: str, geometry: Geometry, **params: Any) -> Press:
    """The press registered as `name`, built for `geometry` from `params` (window, kernel, budget, alpha, sinks,
    pyramid_beta, and headkv's budgets / scores / beta / temp / granularity).

    One set of parameters serves every method, as the CLI's options do: a parameter that only other presses
    take is ignored; one that no press takes is an error.
    """
    cls = PRESSES.get(name)
    if cls is None:
        raise HeadscoreError(f"unknown method '{name}': use one of {', '.join(PRESSES)}")
    known = set().union(*(press_options(c) for c in PRESSES.values()))
    unknown = sorted(set(params) - known)
    if unknown:
        raise HeadscoreError(f"no method takes the parameter '{unknown[0]}'")
    taken = press_options(cls)
    return cls.build(geometry, **{k: v for k, v in params.items() if k in taken})


@register_press("full")
@dataclass
class FullPress(Press):
    """No compression: the plain transformers cache keeps every token (the reference)."""

    def layer_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        return torch.full((scores.shape[0],), scores.shape[1], dtype=torch.int64)


@dataclass
class BudgetPress(Press):
    """A press whose budgets are one fixed `Budgets` matrix `[layers, heads]` (window excluded), with SnapKV
    selection. Subclasses differ only in where the matrix comes from: `provide_budgets`."""

    _budgets: Budgets | None = field(default=None, init=False, repr=False, compare=False)

    def provide_budgets(self, geometry: Geometry) -> Budgets:
        """The budgets for a model of `geometry`."""
        raise NotImplementedError

    def budgets_for(self, geometry: Geometry) -> Budgets:
        """`provide_budgets`, computed once per geometry."""
        given = self._budgets
        if given is None or given.geometry.grid != geometry.grid:
            given = self._budgets = self.provide_budgets(geometry)
        return given

    def check(self, geometry: Geometry) -> None:
        """A budgets matrix for another geometry is an error."""
        budgets = self.budgets_for(geometry)
        budgets.geometry.check_matches(geometry, "budgets")
        if tuple(budgets.matrix.shape) != (geometry.layers, self.cache_heads(geometry)):
            raise HeadscoreError(f"the budgets matrix is {tuple(budgets.matrix.shape)}, not the {geometry.layers} "
                                 f"layers × {self.cache_heads(geometry)} heads of its granularity")

    def cache_heads(self, geometry: Geometry) -> int:
        query = self.budgets_for(geometry).granularity == "query"
        return geometry.query_heads if query else geometry.kv_heads

    def layer_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        return self.budgets_for(geometry).matrix[layer]


@register_press("snapkv")
@dataclass
class SnapKVPress(BudgetPress):
    """SnapKV: every head keeps `budget` entries (window included), chosen by its window scores."""

    budget: int = BUDGET

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, self.window)

    def nominal_budget(self, layer: int) -> int | None:
        return self.budget - self.window

    def provide_budgets(self, geometry: Geometry) -> Budgets:
        return allocate("uniform", geometry, self.budget, window=self.window,
                        granularity=resolve_granularity(geometry, self.granularity))


@register_press("streaming")
@dataclass
class StreamingPress(SnapKVPress):
    """StreamingLLM: SnapKV's budgets, filled with `sinks` attention-sink tokens plus the most recent tokens."""

    sinks: int = SINKS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.sinks, "sinks", 0)

    def head_scores(self, scores: torch.Tensor, heads: int) -> torch.Tensor:
        return streaming_scores(heads, scores.shape[1], self.sinks, scores.device)


@register_press("pyramidkv")
@dataclass
class PyramidKVPress(SnapKVPress):
    """PyramidKV: budgets fall linearly over the layers (`pyramid_beta` sets how far), SnapKV selection.

    `pyramid_schedule`: "linear" (exact interpolation, total = uniform, any prompt), or the authors' rule for
    the prompt at hand (`budgets.pyramid_official_budgets`): "headkv" or "kvcache-factory" (these decide
    themselves when a layer is kept whole; `beyond_prompt` does not apply).
    """

    pyramid_beta: float = PYRAMID_BETA
    pyramid_schedule: str = PYRAMID_SCHEDULE

    def __post_init__(self) -> None:
        super().__post_init__()
        check_pyramid_beta(self.pyramid_beta)
        if self.pyramid_schedule not in PYRAMID_SCHEDULES:
            raise HeadscoreError(f"unknown pyramid schedule '{self.pyramid_schedule}': use "
                                 f"{', '.join(PYRAMID_SCHEDULES)}")

    def provide_budgets(self, geometry: Geometry) -> Budgets:
        return allocate("pyramid", geometry, self.budget, window=self.window,
                        granularity=resolve_granularity(geometry, self.granularity), pyramid_beta=self.pyramid_beta)

    def prompt_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        if self.pyramid_schedule == "linear":
            return super().prompt_budgets(layer, scores, geometry)
        heads, m = scores.shape
        budgets, whole = pyramid_official_budgets(geometry.layers, self.budget - self.window, self.pyramid_beta,
                                                  m + self.window, self.window, self.pyramid_schedule)
        return torch.full((heads,), m if whole[layer] else int(budgets[layer]), dtype=torch.int64)


@register_press("ada-snapkv")
@dataclass
class AdaSnapKVPress(Press):
    """AdaKV on SnapKV: per layer, the top `(budget − window) × heads` scores over all heads jointly, with a
    floor of `alpha × (budget − window)` per head; budgets are data-dependent, chosen at prefill.

    `ada_allocation`: "pool" (`adaptive_budgets`: the floor plus the top (1 − alpha) share) or "official"
    (`adaptive_budgets_official`: normalized scores, 0.8 × count + floor, as the authors run it)."""

    budget: int = BUDGET
    alpha: float = ALPHA
    ada_allocation: str = ADA_ALLOCATION

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, self.window)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise HeadscoreError(f"alpha must lie in [0, 1], got {self.alpha!r}")
        if self.ada_allocation not in ADA_ALLOCATIONS:
            raise HeadscoreError(f"unknown ada allocation '{self.ada_allocation}': use {', '.join(ADA_ALLOCATIONS)}")

    def nominal_budget(self, layer: int) -> int | None:
        return self.budget - self.window

    def layer_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        rule = adaptive_budgets_official if self.ada_allocation == "official" else adaptive_budgets
        return rule(scores, self.budget - self.window, self.alpha).cpu()


@register_press("headkv")
@dataclass
class HeadKVPress(BudgetPress):
    """HeadKV: per-head budgets from `compression.allocation` (`Budgets`, window excluded), SnapKV selection.
    The press's window is the budgets' window.

    Budgets at "query" granularity on a GQA model are supported as in the official code: each query head
    keeps its own selection of its KV head's entries (stored once per query head, so shared entries are
    stored several times).
    """

    budgets: Budgets = None  # type: ignore[assignment]  # required; None gets the one-line error below
    options: ClassVar[tuple[str, ...]] = ("budget", "beta", "temp", "granularity", "scores")

    def __post_init__(self) -> None:
        if not isinstance(self.budgets, Budgets):
            raise HeadscoreError("method headkv needs budgets: give --budgets or --scores")
        self.window = self.budgets.window
        self.granularity = self.budgets.granularity
        super().__post_init__()

    def nominal_budget(self, layer: int) -> int | None:
        return self.budgets.budget - self.budgets.window

    @classmethod
    def build(  # type: ignore[override]  # takes its named parameters only (make_press passes no others)
        cls, geometry: Geometry, *, budgets: Budgets | str | os.PathLike | None = None,
        scores: HeadScores | str | os.PathLike | None = None, budget: int = BUDGET, window: int = WINDOW,
        kernel: int = KERNEL, beta: float = BETA, temp: float = TEMP, granularity: str | None = None,
        beyond_prompt: str = BEYOND_PROMPT, score_dtype: str = SCORE_DTYPE,
    ) -> HeadKVPress:
        """From `budgets` (a `Budgets` or a budgets file) or `scores` (a `HeadScores` or a head-score file;
        budgets are then allocated here with `budget`, `window`, `beta`, `temp`, `granularity`)."""
        if budgets is not None:
            chosen = budgets if isinstance(budgets, Budgets) else read_budgets(budgets, geometry)
        elif scores is not None:
            head_scores = scores if isinstance(scores, HeadScores) else read_head_scores(scores)
            chosen = allocate("headkv", geometry, budget, window=window, beta=beta, temp=temp,
                              granularity=granularity, scores=head_scores)
            if not isinstance(scores, HeadScores):
                chosen.source_scores = str(scores)
        else:
            raise HeadscoreError("method headkv needs head scores (--scores) or a budgets file (--budgets)")
        press = cls(kernel=kernel, budgets=chosen, beyond_prompt=beyond_prompt, score_dtype=score_dtype)
        press.check(geometry)
        return press

    def provide_budgets(self, geometry: Geometry) -> Budgets:
        return self.budgets

    def describe(self) -> dict:
        b = self.budgets
        return {"method": self.name, "window": self.window, "kernel": self.kernel, "budget": b.budget,
                "beta": b.beta, "granularity": b.granularity, "budget_method": b.method,
                "source_scores": b.source_scores,
                **{k: v for k, v in (("beyond_prompt", self.beyond_prompt), ("score_dtype", self.score_dtype))
                   if v != getattr(HeadKVPress, k)}}


@register_press("razor")
@dataclass
class RazorPress(Press):
    """RazorAttention (Tang et al., 2024), as the HeadKV authors re-implemented it for their comparison: the
    top `full_heads` heads by head score (all layers jointly, `head_ranks`) keep their whole prompt; every
    other head keeps StreamingLLM's entries, the first `sinks` tokens plus the observation window (the recent
    `window` tokens): 4 + 8 = 12 entries by default.

    `full_heads` None: k from `budget` by `equal_kv_full_heads`, with `average_length` tokens per full head
    (None: each prompt's own length, so every prompt gets the KV of the budget). `granularity` "kv" ranks and
    keeps KV heads (query-head scores summed per KV head), "query" query heads (each stores its own copy, as
    headkv's query granularity). `compensation`: every compressed head also stores one entry summarizing its
    dropped tokens (RazorAttention's compensation token: the mean of their keys and of their values, its
    attention weight counted once per dropped token); off by default, as in the HeadKV authors' runs, who
    found it made a run about three times slower at large k.
    """

    budget: int = BUDGET
    sinks: int = SINKS
    full_heads: int | None = None
    average_length: int | None = None
    compensation: bool = False
    granularity: str = "kv"
    scores: HeadScores = field(default=None, repr=False)  # type: ignore[assignment]  # required
    source_scores: str | None = None
    _ranks: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, self.window)
        check_count(self.sinks, "sinks", 0)
        if self.full_heads is not None:
            check_count(self.full_heads, "full heads (k)", 0)
        if self.average_length is not None:
            check_count(self.average_length, "average prompt length", 1)
        if not isinstance(self.compensation, bool):
            raise HeadscoreError(f"compensation must be true or false, got {self.compensation!r}")
        if self.granularity not in ("kv", "query"):
            raise HeadscoreError(f"unknown granularity '{self.granularity}': use kv or query")
        if not isinstance(self.scores, HeadScores):
            raise HeadscoreError("method razor needs head scores (--scores: retrieval scores, as the authors)")

    @classmethod
    def build(cls, geometry: Geometry, *, scores: HeadScores | str | os.PathLike | None = None,
              granularity: str | None = None, **params: Any) -> RazorPress:
        """From `scores` (a `HeadScores` or a head-score file); granularity None: "kv" under GQA."""
        if scores is None:
            raise HeadscoreError("method razor needs head scores (--scores: retrieval scores, as the authors)")
        head_scores = scores if isinstance(scores, HeadScores) else read_head_scores(scores)
        source = None if isinstance(scores, HeadScores) else str(scores)
        press = cls(scores=head_scores, granularity=resolve_granularity(geometry, granularity),
                    source_scores=source, **params)
        press.check(geometry)
        return press

    def ranks(self, geometry: Geometry) -> torch.Tensor:
        """Every cache head's rank by score, `[layers, heads]` (computed once per geometry)."""
        shape = (geometry.layers, self.cache_heads(geometry))
        if self._ranks is None or tuple(self._ranks.shape) != shape:
            self._ranks = head_ranks(head_importance(self.scores, geometry, self.granularity))
        return self._ranks

    def check(self, geometry: Geometry) -> None:
        self.ranks(geometry)  # scores of another grid are an error here
        total = geometry.layers * self.cache_heads(geometry)
        if self.full_heads is not None and self.full_heads > total:
            raise HeadscoreError(f"razor: {self.full_heads} full heads, but the model has {total} "
                                 f"{self.granularity} heads")

    def cache_heads(self, geometry: Geometry) -> int:
        return geometry.query_heads if self.granularity == "query" else geometry.kv_heads

    def full_head_count(self, length: int) -> int:
        """k for a prompt of `length` tokens: `full_heads`, or the equal-total-KV rule."""
        if self.full_heads is not None:
            return self.full_heads
        ranks = self._ranks
        if ranks is None:
            raise HeadscoreError("razor: check the press against the model first (press.check(geometry))")
        return equal_kv_full_heads(self.budget, ranks.numel(), self.average_length or length, self.sinks,
                                   self.window)

    def head_scores(self, scores: torch.Tensor, heads: int) -> torch.Tensor:
        return streaming_scores(heads, scores.shape[1], self.sinks, scores.device)

    def layer_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        m = scores.shape[1]
        full = self.ranks(geometry)[layer] < self.full_head_count(m + self.window)
        return torch.where(full, m, min(self.sinks, m))

    def summary_entries(self, layer: int, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor,
                        heads: int) -> SummaryEntries | None:
        """The compensation token of every compressed head with dropped tokens: mean key and value of the
        positions between its sinks and its window, weighted by their number."""
        length = keys.shape[1]
        dropped = length - self.window - self.sinks
        if not self.compensation or dropped <= 0:
            return None
        head = torch.nonzero(kept < length).flatten()  # compressed heads (CPU)
        source = (head // (heads // keys.shape[0])).to(keys.device)
        span = slice(self.sinks, length - self.window)
        weight = torch.full((head.numel(),), math.log(dropped), dtype=torch.float32, device=keys.device)
        return SummaryEntries(keys=keys[:, span].mean(dim=1)[source], values=values[:, span].mean(dim=1)[source],
                              head=head.to(keys.device), log_weight=weight)

    def describe(self) -> dict:
        rule = ("given (the budget plays no part)" if self.full_heads is not None else
                f"equal total KV: k = round((B − {self.sinks} sinks − {self.window} window) · L · H / "
                f"{'average length ' + str(self.average_length) if self.average_length else 'prompt length'})")
        budget = None if self.full_heads is not None else self.budget  # a given k holds its own KV
        return {"method": self.name, "window": self.window, "budget": budget, "sinks": self.sinks,
                "full_heads": self.full_heads, "average_length": self.average_length, "full_heads_rule": rule,
                "compensation": self.compensation, "granularity": self.granularity,
                "source_scores": self.source_scores}

    def describe_at(self, length: int) -> dict:
        return {**self.describe(), "full_heads": self.full_head_count(length)}
