"""Compression methods ("presses"): a token scorer × a budget allocation, RazorAttention, and the full cache.

A method is named `SCORER@ALLOCATION` (`expected@headkv-r2`, `kvzip@global`, `snapkv+critical@ada`): the scorer
(`compression.scorers`, `SCORERS`, modifiers such as `+critical`) ranks each cache head's prompt positions, the
allocation (`compression.allocation`, `ALLOCATIONS`) says how many each head keeps, and the selection is one shared
step (`kept_positions`: each head's top positions plus the observation window, in original order). A bare `SCORER`
is `SCORER@uniform`; the historical names are aliases (`METHOD_ALIASES`): `snapkv` = `snapkv@uniform`, `pyramidkv`
= `snapkv@pyramid`, `ada-snapkv` = `snapkv@ada`, `headkv-NAME` = `snapkv@headkv-NAME`. The budget is a KV size
(`budget`: entries per head, window included: the paper's KV size) or a compression `ratio` (the fraction of the
prompt's entries removed, per layer). RazorAttention (`razor`, `razor-kN`: positional non-full heads) and `full`
are presses of their own (`PRESSES`).

`make_press(name, geometry, **params)` builds any method; each parameter must apply to it (one clear error
otherwise). `make_press(name, geometry, settings=...)` takes a run's shared settings instead (CLI options, a study
config), each method using those that apply to it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import torch

from headscore.compression.allocation import (
    ALLOCATIONS,
    Allocation,
    HeadKVAllocation,
    head_importance,
)
from headscore.compression.budgets import (
    GRANULARITIES,
    Budgets,
    check_budget,
    check_window,
    resolve_granularity,
)
from headscore.compression.budgets_file import read_budgets
from headscore.compression.scorers import (
    MODIFIERS,
    SCORERS,
    Scorer,
    ScorerInputs,
    SnapKVScorer,
    StreamingScorer,
    check_integer,
    scorer_parameters,
)
from headscore.core.defaults import (
    ADA_ALLOCATION,
    BEYOND_PROMPT,
    BUDGET,
    PYRAMID_SCHEDULE,
    SCORE_DTYPE,
    SINKS,
    WINDOW,
)
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry
from headscore.scoring.head_scores import HeadScores, read_head_scores

# ---------------------------------------------------------------------------------------------- selection


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


# press parameters that select the authors' behaviour (docs/fidelity.md)
FIDELITY_OPTIONS = ("granularity", "beyond_prompt", "score_dtype", "pyramid_schedule", "ada_allocation")
BEYOND_PROMPT_MODES = ("clamp", "keep")


@dataclass(frozen=True)
class FidelityOptions:
    """The method parameters that select the authors' behaviour (docs/fidelity.md); the defaults are
    headscore's. `params()` is what `make_press` takes (each method uses those that apply to it)."""

    beyond_prompt: str = BEYOND_PROMPT
    score_dtype: str = SCORE_DTYPE
    pyramid_schedule: str = PYRAMID_SCHEDULE
    ada_allocation: str = ADA_ALLOCATION

    def params(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
    """Class decorator: register a press that is not a scorer × allocation (`full`, `razor`) under its name."""

    def add(cls: P) -> P:
        cls.name = name
        PRESSES[name] = cls
        return cls

    return add


@dataclass
class Press:
    """Base of every method. `window`: observation window (kept by every head on top of its budget).

    `granularity`: "kv" (one selection per KV head; None = "kv" under GQA) or "query" (one per query head, the
    authors' layout: 4x the entries on Llama-3). `beyond_prompt`: "clamp" (each head keeps at most the prompt)
    or "keep" (the authors: a layer whose nominal budget exceeds the prompt is kept whole).
    """

    window: int = WINDOW
    granularity: str | None = None
    beyond_prompt: str = BEYOND_PROMPT
    name = "press"  # the method's name (an instance's own for scorer × allocation methods)
    takes_budget: ClassVar[bool] = True  # its KV depends on a budget (`budget` / `ratio`)
    options: ClassVar[tuple[str, ...]] = ()  # parameters `build` takes besides the fields

    def __post_init__(self) -> None:
        check_window(self.window)
        for value, allowed, what in ((self.granularity, (None, *GRANULARITIES), "granularity"),
                                     (self.beyond_prompt, BEYOND_PROMPT_MODES, "beyond-prompt")):
            if value not in allowed:
                raise HeadscoreError(f"unknown {what} '{value}': use {', '.join(a for a in allowed if a)}")

    @classmethod
    def build(cls, geometry: Geometry, **params: Any) -> Press:
        """The press from `make_press` parameters (only its fields and `options` are passed)."""
        return cls(**params)

    def check(self, geometry: Geometry) -> None:
        """Raise if the press cannot run on a model of `geometry`."""

    def cache_heads(self, geometry: Geometry) -> int:
        """Heads the cache stores a selection for: KV heads, or query heads at "query" granularity."""
        return geometry.query_heads if resolve_granularity(geometry, self.granularity) == "query" else \
            geometry.kv_heads

    def selection_scorer(self) -> Scorer:
        """The scorer that ranks each head's positions."""
        return SnapKVScorer()

    def query_count(self) -> int:
        """How many of the last prompt queries the selection reads."""
        return self.selection_scorer().query_count(self.window)

    @property
    def extra_pass(self) -> str | None:
        return self.selection_scorer().extra_pass

    @property
    def spans_layers(self) -> bool:
        """Its counts need every layer's scores at once (compress after the whole prefill)."""
        return False

    def selection_scores(self, inputs: ScorerInputs) -> torch.Tensor:
        """One prompt's selection scores of the positions before the window: `[heads, n − window]`."""
        return inputs.scores(self.selection_scorer())[0, :, : inputs.length - inputs.window]

    def nominal_budget(self, length: int) -> int | None:
        """The budget (window excluded) the authors compare with the prompt to keep a layer whole; None: never."""
        return None

    def counts(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Positions each head of compressed layer `layer` keeps before the window, from its selection scores
        `[heads, m]`: int64 `[heads]` on the CPU (`kept_positions` clamps them to m)."""
        raise NotImplementedError

    def prompt_counts(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """`counts`, or every position of a layer kept whole (`beyond_prompt` "keep": nominal budget above the
        `m` positions of `scores` `[heads, m]`)."""
        nominal = self.nominal_budget(scores.shape[1] + self.window)
        if self.beyond_prompt == "keep" and nominal is not None and nominal > scores.shape[1]:
            return torch.full((scores.shape[0],), scores.shape[1], dtype=torch.int64)
        return self.counts(layer, scores, geometry)

    def layer_counts(self, scores: list[torch.Tensor], geometry: Geometry) -> list[torch.Tensor]:
        """Every compressed layer's counts at once (`spans_layers`), from its selection scores `[heads, m]`."""
        return [self.prompt_counts(layer, s, geometry) for layer, s in enumerate(scores)]

    def summary_entries(self, layer: int, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor,
                        heads: int) -> SummaryEntries | None:
        """Extra entries that stand for dropped ones (RazorAttention's compensation token); None: no extras.
        `keys`/`values` `[kv_heads, n, d]`: the layer's full prompt; `kept` `[heads]` the selection's counts."""
        return None

    def describe(self) -> dict:
        """The method and its parameters, for reports and metadata; the fidelity options (`FIDELITY_OPTIONS`)
        only where they differ from their defaults."""
        shown = [f.name for f in fields(self)
                 if f.init and (f.name not in FIDELITY_OPTIONS or getattr(self, f.name) != f.default)]
        return {"method": self.name, **{name: getattr(self, name) for name in shown}}

    def describe_at(self, length: int) -> dict:
        """`describe()` for one prompt of `length` tokens (the KV report; a press whose choices depend on the
        prompt's length adds them)."""
        return self.describe()


@register_press("full")
@dataclass
class FullPress(Press):
    """No compression: the plain transformers cache keeps every token (the reference)."""

    takes_budget: ClassVar[bool] = False

    def counts(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        return torch.full((scores.shape[0],), scores.shape[1], dtype=torch.int64)


def check_ratio(ratio: Any) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise HeadscoreError(f"a compression ratio is the fraction of the prompt's KV entries removed, in [0, 1), "
                             f"got {ratio!r}")


@dataclass
class ScoredPress(Press):
    """A method: `scorer` ranks each cache head's prompt positions, `allocation` says how many each keeps.

    The budget: `budget`, the KV size (entries per head, window included), or `ratio`, the fraction of each
    prompt's entries removed (KV size (1 − ratio) · n, at least the window plus one). `method`: its name as asked
    (an alias keeps its own).
    """

    scorer: Scorer = field(default_factory=SnapKVScorer)
    allocation: Allocation = field(default_factory=lambda: ALLOCATIONS["uniform"]())
    budget: int = BUDGET
    ratio: float | None = None
    method: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio is None:
            check_budget(self.budget, self.window)
        else:
            check_ratio(self.ratio)
        if self.allocation.spans_layers and not self.scorer.comparable:
            raise HeadscoreError(f"allocation {self.allocation.name} compares scores across layers; scorer "
                                 f"{self.scorer.name}'s do not compare (use one of "
                                 f"{', '.join(n for n, c in SCORERS.items() if c.comparable)})")
        self.name = self.method or f"{self.scorer.name}@{allocation_label(self.allocation)}"

    def selection_scorer(self) -> Scorer:
        return self.scorer

    @property
    def spans_layers(self) -> bool:
        return self.allocation.spans_layers

    def budget_at(self, length: int) -> int:
        """The KV size (window included) for a prompt of `length` tokens."""
        if self.ratio is None:
            return self.budget
        return max(round((1 - self.ratio) * length), self.window + 1)

    def nominal_budget(self, length: int) -> int | None:
        if getattr(self.allocation, "pyramid_schedule", "linear") != "linear":
            return None  # the authors' pyramid schedules decide themselves when a layer stays whole
        return self.budget_at(length) - self.window

    def check(self, geometry: Geometry) -> None:
        """Fixed budgets of another geometry are an error."""
        if self.allocation.reads_scores or self.ratio is not None:
            return
        budgets = self.budgets_for(geometry)
        budgets.geometry.check_matches(geometry, "budgets")
        if tuple(budgets.matrix.shape) != (geometry.layers, self.cache_heads(geometry)):
            raise HeadscoreError(f"the budgets matrix is {tuple(budgets.matrix.shape)}, not the {geometry.layers} "
                                 f"layers × {self.cache_heads(geometry)} heads of its granularity")

    def granularity_at(self, geometry: Geometry) -> str:
        return resolve_granularity(geometry, self.granularity)

    def budgets_for(self, geometry: Geometry) -> Budgets:
        """The fixed `Budgets` of this method on `geometry` (uniform, pyramid, headkv at a KV size; an error for a
        data-dependent allocation or a ratio, whose counts depend on each prompt)."""
        if self.ratio is not None:
            raise HeadscoreError(f"method {self.name} has a compression ratio: its budgets depend on each prompt")
        return self.allocation.budgets_for(geometry, self.budget, self.window, self.granularity_at(geometry))

    def counts(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        length = scores.shape[1] + self.window
        return self.allocation.counts(layer, scores, self.budget_at(length), self.window, geometry,
                                      self.granularity_at(geometry))

    def layer_counts(self, scores: list[torch.Tensor], geometry: Geometry) -> list[torch.Tensor]:
        if not self.spans_layers:
            return super().layer_counts(scores, geometry)
        length = scores[0].shape[1] + self.window
        return self.allocation.layer_counts(scores, self.budget_at(length), self.window, geometry,
                                            self.granularity_at(geometry))

    def describe(self) -> dict:
        allocation = {k: v for k, v in self.allocation.params().items() if k not in ("scores", "budgets")
                      and (k not in FIDELITY_OPTIONS or v != getattr(type(self.allocation), k, v))}
        scorer = {k: v for k, v in scorer_params(self.scorer).items()
                  if k not in FIDELITY_OPTIONS or v != getattr(SnapKVScorer, k, v)}
        described = {"method": self.name, "scorer": self.scorer.name,
                     "allocation": allocation_label(self.allocation), "window": self.window,
                     "budget": self.budget if self.ratio is None else None, "ratio": self.ratio,
                     "granularity": self.granularity, **scorer, **allocation}
        if self.beyond_prompt != BEYOND_PROMPT:
            described["beyond_prompt"] = self.beyond_prompt
        if isinstance(self.allocation, HeadKVAllocation):
            described["source_scores"] = self.allocation.source_scores()
        return described

    def describe_at(self, length: int) -> dict:
        described = self.describe()
        if self.ratio is not None:
            described["budget"] = self.budget_at(length)
        return described


def scorer_params(scorer: Scorer) -> dict[str, Any]:
    """A scorer's parameters, a modifier's with its base scorer's (plain values, for metadata)."""
    params = scorer.params()
    base = params.pop("base", None)
    return {**(scorer_params(base) if isinstance(base, Scorer) else {}), **params}


def allocation_label(allocation: Allocation) -> str:
    """`headkv-NAME` for HeadKV on the head scores named NAME, else the allocation's name."""
    named = getattr(allocation, "scores_name", None)
    return f"{allocation.name}-{named}" if named else allocation.name


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
    head_scores_name: ClassVar[str] = "r"  # retrieval scores, as the HeadKV authors ran it

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, self.window)
        check_integer(self.sinks, "sinks", 0)
        if self.full_heads is not None:
            check_integer(self.full_heads, "full heads (k)", 0)
        if self.average_length is not None:
            check_integer(self.average_length, "average prompt length", 1)
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

    def selection_scorer(self) -> Scorer:
        return StreamingScorer(sinks=self.sinks)

    def counts(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------- method names

METHOD_ALIASES = {"snapkv": "snapkv@uniform", "streaming": "streaming@uniform", "pyramidkv": "snapkv@pyramid",
                  "ada-snapkv": "snapkv@ada", "headkv": "snapkv@headkv"}
HEADKV_PREFIX = "headkv-"  # headkv-NAME: HeadKV's allocation from the head scores named NAME
RAZOR_K = re.compile(r"razor-k(0|[1-9][0-9]*)")  # razor-kN: RazorAttention with N full-cache heads
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class MethodSpec:
    """What a method name stands for: a registered press (`press`: full, razor), or a scorer (with `modifiers`)
    × an allocation; `head_scores`: the name of the head-score file it needs (`--scores NAME=FILE`), None when
    it needs none or takes them directly (`headkv` with `scores=` or `budgets=`); `full_heads`: razor-kN's N."""

    name: str
    press: str | None = None
    scorer: str | None = None
    modifiers: tuple[str, ...] = ()
    allocation: str | None = None
    head_scores: str | None = None
    full_heads: int | None = None

    @property
    def takes_budget(self) -> bool:
        return PRESSES[self.press].takes_budget and self.full_heads is None if self.press else True

    def parameters(self) -> set[str]:
        """The `make_press` parameters this method takes."""
        if self.press:
            return press_options(PRESSES[self.press])
        scorer = scorer_parameters(SCORERS[self.scorer or "snapkv"])
        for modifier in self.modifiers:
            scorer |= scorer_parameters(MODIFIERS[modifier]) - {"base"}
        allocation = {f.name for f in fields(ALLOCATIONS[self.allocation or "uniform"]) if f.init} - {"scores_name"}
        return press_options(ScoredPress) - {"scorer", "allocation", "method"} | scorer | allocation

    def extra_pass(self) -> str | None:
        return SCORERS[self.scorer].extra_pass if self.scorer else None


def parse_method(name: str) -> MethodSpec:
    """A method name (`SCORER[+MODIFIER...][@ALLOCATION]`, an alias, `full`, `razor`, `razor-kN`) -> its
    `MethodSpec`; an unknown part is one error naming the known ones."""
    fixed = RAZOR_K.fullmatch(name)
    if fixed:
        return MethodSpec(name, press="razor", head_scores=RazorPress.head_scores_name,
                          full_heads=int(fixed.group(1)))
    if name in PRESSES:
        return MethodSpec(name, press=name, head_scores=getattr(PRESSES[name], "head_scores_name", None))
    if name.startswith(HEADKV_PREFIX) and "@" not in name:
        written = f"snapkv@{name}"
    else:
        written = METHOD_ALIASES.get(name, name if "@" in name else f"{name}@uniform")
    scoring, _, allocation = written.partition("@")
    scorer, *modifiers = scoring.split("+")
    if scorer not in SCORERS:
        raise HeadscoreError(f"unknown method '{name}': scorer '{scorer}' is not one of {', '.join(SCORERS)} "
                             f"(methods: SCORER[+{'|+'.join(MODIFIERS)}][@ALLOCATION], "
                             f"{', '.join(METHOD_ALIASES)}, headkv-NAME, {', '.join(PRESSES)}, razor-kN)")
    for modifier in modifiers:
        if modifier not in MODIFIERS:
            raise HeadscoreError(f"unknown method '{name}': modifier '+{modifier}' is not one of "
                                 f"{', '.join('+' + m for m in MODIFIERS)}")
    head_scores = None
    if allocation.startswith(HEADKV_PREFIX):
        allocation, head_scores = "headkv", allocation[len(HEADKV_PREFIX):]
        if not NAME_PATTERN.fullmatch(head_scores):
            raise HeadscoreError(f"unknown method '{name}': headkv-NAME needs a score name (letters, digits, "
                                 f"-, _, .)")
    if allocation not in ALLOCATIONS:
        known = (a + ("-NAME" if ALLOCATIONS[a].needs_head_scores else "") for a in ALLOCATIONS)
        raise HeadscoreError(f"unknown method '{name}': allocation '{allocation}' is not one of {', '.join(known)}")
    return MethodSpec(name, scorer=scorer, modifiers=tuple(modifiers), allocation=allocation,
                      head_scores=head_scores)


def press_options(cls: type[Press]) -> set[str]:
    """The `make_press` parameters a registered press class takes: its fields and its `options`."""
    return {f.name for f in fields(cls) if f.init} | set(cls.options)


def known_parameters() -> set[str]:
    """Every parameter some method takes (the registries' fields)."""
    known = set().union(*(press_options(c) for c in PRESSES.values()), press_options(ScoredPress))
    for cls in (*SCORERS.values(), *MODIFIERS.values()):
        known |= scorer_parameters(cls)
    for allocation in ALLOCATIONS.values():
        known |= {f.name for f in fields(allocation) if f.init}
    return known - {"scorer", "allocation", "method", "base", "scores_name"}


def parameter_defaults() -> dict[str, Any]:
    """Every method parameter's default (the registries' fields; a name several classes share takes the first
    class's: they agree)."""
    found: dict[str, Any] = {}
    classes: tuple[Any, ...] = (ScoredPress, *PRESSES.values(), *SCORERS.values(), *MODIFIERS.values(),
                               *ALLOCATIONS.values())
    for cls in classes:
        for f in fields(cls):
            if f.init and f.name not in found and f.default is not MISSING:
                found[f.name] = f.default
    return found


def changed_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` without the entries that are their parameter's default (or None): what a run's records name,
    so that spelling a default out (the CLI passes every option) or a new parameter at its default changes
    nothing."""
    defaults = parameter_defaults()
    return {k: v for k, v in settings.items() if v is not None and not (k in defaults and v == defaults[k])}


def make_press(name: str, geometry: Geometry, settings: Mapping[str, Any] | None = None, **params: Any) -> Press:
    """The method `name` (see `parse_method`) built for `geometry`.

    `params` must all apply to the method (an inapplicable or unknown one is an error); `settings`, a run's
    shared settings (CLI options, a study config), are taken where they apply (an unknown name is an error).
    A None value stands for the default.
    Head scores: `scores` is a `HeadScores`, a head-score file, or a dict of them by name (headkv-NAME takes
    NAME's, razor "r"'s); `budgets` a `Budgets` or budgets file (method `headkv`: fixed budgets).
    """
    spec = parse_method(name)
    params = {k: v for k, v in params.items() if v is not None}  # None: the default
    given = {**{k: v for k, v in (settings or {}).items() if v is not None}, **params}
    unknown = sorted(set(given) - known_parameters())
    if unknown:
        raise HeadscoreError(f"no method takes the parameter '{unknown[0]}'")
    taken = spec.parameters()
    inapplicable = sorted(set(params) - taken)
    if inapplicable:
        raise HeadscoreError(f"method {name} takes no parameter '{inapplicable[0]}' (it takes: "
                             f"{', '.join(sorted(taken))})")
    use = {k: v for k, v in given.items() if k in taken}
    if "scores" in use:
        use["scores"] = pick_scores(use["scores"], spec)
    if spec.press:
        if spec.full_heads is not None:
            use["full_heads"] = spec.full_heads
        return PRESSES[spec.press].build(geometry, **use)
    return build_scored(spec, geometry, use)


def pick_scores(scores: Any, spec: MethodSpec) -> Any:
    """The head scores a method uses from a `scores` parameter (one, or a dict by name)."""
    if not isinstance(scores, Mapping):
        return scores
    if spec.head_scores is None:
        raise HeadscoreError(f"method {spec.name} takes one head-score file, not named ones")
    if spec.head_scores not in scores:
        raise HeadscoreError(f"method {spec.name} needs --scores {spec.head_scores}=FILE")
    return scores[spec.head_scores]


def load_scores(scores: HeadScores | str | os.PathLike | None) -> HeadScores | None:
    return scores if scores is None or isinstance(scores, HeadScores) else read_head_scores(scores)


def build_scored(spec: MethodSpec, geometry: Geometry, params: dict[str, Any]) -> ScoredPress:
    """A `ScoredPress` from a parsed name and its parameters."""
    scorer_cls = SCORERS[spec.scorer or "snapkv"]
    scorer: Scorer = scorer_cls(**{k: params.pop(k) for k in scorer_parameters(scorer_cls) if k in params})
    for modifier in spec.modifiers:
        cls: Any = MODIFIERS[modifier]
        own = scorer_parameters(cls) - {"base"}
        scorer = cls(base=scorer, **{k: params.pop(k) for k in own if k in params})
    allocation_cls = ALLOCATIONS[spec.allocation or "uniform"]
    own = {f.name for f in fields(allocation_cls) if f.init} - {"scores", "budgets", "scores_name"}
    allocation_params = {k: params.pop(k) for k in own if k in params}
    scores, budgets = params.pop("scores", None), params.pop("budgets", None)
    if allocation_cls.needs_head_scores:
        allocation_params["scores_name"] = spec.head_scores
        if budgets is not None:
            fixed = budgets if isinstance(budgets, Budgets) else read_budgets(budgets, geometry)
            allocation_params["budgets"] = fixed
            params.update(window=fixed.window, granularity=fixed.granularity, budget=fixed.budget)
        elif scores is not None:
            allocation_params["scores"] = load_scores(scores)
        else:
            needs = f"--scores {spec.head_scores}=FILE" if spec.head_scores else "--scores FILE or --budget-file"
            raise HeadscoreError(f"method {spec.name} needs head scores ({needs})")
    allocation = allocation_cls(**allocation_params)
    press = ScoredPress(scorer=scorer, allocation=allocation, method=spec.name, **params)
    if scores is not None and not isinstance(scores, HeadScores) and isinstance(allocation, HeadKVAllocation):
        allocation.source = str(scores)
    press.check(geometry)
    return press


def method_catalog() -> str:
    """What `--help` lists: every scorer, modifier and allocation with its one line, the aliases and the presses
    of their own (from the registries, so a registered scorer shows up)."""
    lines = ["Methods are SCORER[+MODIFIER][@ALLOCATION] (a bare SCORER is SCORER@uniform). Scorers (which positions "
             "each head keeps):"]
    lines += [f"  {name}: {cls.summary}" for name, cls in SCORERS.items()]
    if MODIFIERS:
        lines.append("Modifiers:")
        lines += [f"  +{name}: {cls.summary}" for name, cls in MODIFIERS.items()]
    lines.append("Allocations (how many each head keeps):")
    lines += [f"  {name}{'-NAME' if cls.needs_head_scores else ''}: {cls.summary}" for name, cls in ALLOCATIONS.items()]
    lines.append("Aliases: " + ", ".join(f"{alias} = {spelled}" for alias, spelled in METHOD_ALIASES.items())
                 + ", headkv-NAME = snapkv@headkv-NAME.")
    lines.append("Methods of their own: full (no compression), razor (RazorAttention: k full-cache heads by --scores "
                 "r=FILE, the others sinks + window), razor-kN (k = N).")
    return "\n".join(lines)
