"""Allocation methods: HeadKV's shared pool, and the uniform (SnapKV) and pyramid (PyramidKV) baselines.

The methods are a registry (`ALLOCATIONS`, filled by `@register_allocation(name)`); `allocate(method, ...)` looks
it up when called. Each returns a `compression.budgets.Budgets`.

The HeadKV rule (official code): with B the average budget per head and w the window, B' = B − w;
pool = floor(B' / β) × layers × heads; floor = B' − floor(B' / β); budget = round(score × pool + floor).
A larger β gives a smaller shared pool; β > 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import torch

from headscore.compression.budgets import (
    Budgets,
    check_beta,
    check_budget,
    check_geometry,
    check_pyramid_beta,
    check_temp,
    heads_at,
    pool_share,
    resolve_granularity,
)
from headscore.core.defaults import (
    ADA_ALLOCATION,
    ALPHA,
    BETA,
    PYRAMID_BETA,
    PYRAMID_SCHEDULE,
    TEMP,
    WINDOW,
)
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry
from headscore.scoring.head_scores import HeadScores, group_by_kv_head


def head_importance(scores: HeadScores, geometry: Geometry, granularity: str,
                    temp: float = TEMP) -> torch.Tensor:
    """HeadKV importance at `granularity`: `[layers, heads]` float64 summing to 1.

    Mean per query head, L1-normalized, `** temp`, renormalized; for "kv", summed over the query heads that
    share a KV head. The scores must have the geometry's `layers × query_heads` grid.
    """
    found = Geometry(layers=scores.layers, query_heads=scores.heads, kv_heads=geometry.kv_heads, head_dim=0)
    found.check_matches(geometry, "head scores", kv_heads=False)
    importance = scores.importance(temp)
    return group_by_kv_head(importance, geometry.kv_heads) if granularity == "kv" else importance


def headkv_rule(importance: torch.Tensor, inner: int, beta: float) -> torch.Tensor:
    """`[..., layers, heads]` importance (each `[layers, heads]` sums to 1) -> int64 budgets
    round(score × pool + floor), B' = `inner`; leading dimensions are independent allocations.

    Rounding is half-to-even (torch.round), as in the official code; no clamp to a prompt length.
    """
    share = pool_share(inner, beta)
    pool = share * importance.shape[-2] * importance.shape[-1]
    return torch.round(importance.double() * pool + (inner - share)).to(torch.int64)


def pyramid_layer_budgets(layers: int, inner: int, pyramid_beta: float) -> torch.Tensor:
    """`[layers]` int64: linear from max = 2B' − min (layer 0) to min = floor(B' / β_p) (last layer).

    Rounded half-to-even; layers l and L−1−l sum to exactly 2B', so the total is exactly layers × B'.
    """
    low = int(inner // pyramid_beta)
    high = 2 * inner - low
    if layers == 1:
        return torch.tensor([inner], dtype=torch.int64)
    drop = torch.arange(layers, dtype=torch.int64) * (high - low)
    return torch.round(high - drop.double() / (layers - 1)).to(torch.int64)


PYRAMID_SCHEDULES = ("linear", "headkv", "kvcache-factory", "headkv-first-prompt")


def pyramid_official_budgets(layers: int, inner: int, pyramid_beta: float, length: int, window: int,
                             schedule: str = "headkv") -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' PyramidKV schedule for a prompt of `length` tokens: (`[layers]` int64 budgets, window
    excluded; `[layers]` bool, layers kept whole).

    min = B' // β_p, max = 2B' − min; when max ≥ m = length − window, max = m and min = 2B' − m; whole-number
    steps (max − min) // (layers − 1); layer l keeps max − l · steps. `headkv` (HeadKV `snapkv_utils.py`
    L130–148): a layer is kept whole when length < its budget + window. `kvcache-factory` (`PyramidKVCluster`):
    kept whole when length < B' + window; uniform B' when length < 2B'.
    """
    if schedule not in PYRAMID_SCHEDULES[1:3]:
        raise HeadscoreError(f"unknown pyramid schedule '{schedule}': use {', '.join(PYRAMID_SCHEDULES)}")
    low = int(inner // pyramid_beta)
    high = 2 * inner - low
    if high >= length - window:
        high = length - window
        low = 2 * inner - high
    steps = (high - low) // (layers - 1) if layers > 1 else 0
    budgets = high - torch.arange(layers, dtype=torch.int64) * steps
    if schedule == "headkv":
        return budgets, length < budgets + window
    if length < 2 * inner:
        budgets = torch.full((layers,), inner, dtype=torch.int64)
    return budgets, torch.full((layers,), length < inner + window)


ALLOCATIONS: dict[str, type[Allocation]] = {}
A = TypeVar("A", bound="type[Allocation]")


def register_allocation(name: str) -> Callable[[A], A]:
    """Class decorator: register an allocation under `name` (the ALLOCATION of `SCORER@ALLOCATION`, and
    `allocate --allocation NAME` for the fixed ones). The class is a dataclass whose fields are its parameters."""

    def add(cls: A) -> A:
        cls.name = name
        ALLOCATIONS[name] = cls
        return cls

    return add


@dataclass
class Allocation:
    """How many prompt positions each cache head keeps (the second half of a method, `SCORER@ALLOCATION`).

    A fixed allocation (`allocate`) gives one `Budgets` matrix per KV size (uniform, pyramid, headkv); a
    data-dependent one (`reads_scores`: ada, global) reads the token scores of the prompt at hand. `counts` is
    the one call the selection makes: a layer's `[heads]` counts (window excluded) from its scores `[heads, m]`;
    an allocation that `spans_layers` (global) gives every layer's at once (`layer_counts`).
    """

    name: ClassVar[str] = "allocation"
    summary: ClassVar[str] = ""  # one line for `--help`
    reads_scores: ClassVar[bool] = False
    spans_layers: ClassVar[bool] = False
    needs_head_scores: ClassVar[bool] = False  # built from a named head-score file (headkv-NAME)

    def allocate(self, geometry: Geometry, budget: int, window: int, granularity: str,
                 scores: HeadScores | None = None) -> Budgets:
        """The fixed `Budgets` for KV size `budget` (window included); data-dependent allocations have none."""
        raise HeadscoreError(f"allocation {self.name} depends on each prompt's token scores: it has no fixed "
                             f"budgets matrix (use it as a method, SCORER@{self.name})")

    def budgets_for(self, geometry: Geometry, budget: int, window: int, granularity: str) -> Budgets:
        """`allocate` with the allocation's own head scores, computed once per (grid, budget, window,
        granularity)."""
        key = (geometry.grid, budget, window, granularity)
        memo = self.__dict__.setdefault("_memo", {})
        if key not in memo:
            memo[key] = self.allocate(geometry, budget, window, granularity, self.head_scores())
        return memo[key]

    def head_scores(self) -> HeadScores | None:
        return None

    def counts(self, layer: int, scores: torch.Tensor, budget: int, window: int, geometry: Geometry,
               granularity: str) -> torch.Tensor:
        """Positions each head of compressed layer `layer` keeps before the window: int64 `[heads]` on the CPU
        (the selection clamps them to the `m` positions of `scores` `[heads, m]`)."""
        return self.budgets_for(geometry, budget, window, granularity).matrix[layer]

    def layer_counts(self, scores: list[torch.Tensor], budget: int, window: int, geometry: Geometry,
                     granularity: str) -> list[torch.Tensor]:
        """Every compressed layer's counts from its scores `[heads, m]` (one per layer)."""
        return [self.counts(layer, s, budget, window, geometry, granularity) for layer, s in enumerate(scores)]

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


@register_allocation("headkv")
@dataclass
class HeadKVAllocation(Allocation):
    """HeadKV: a floor for every head plus a shared pool split in proportion to head importance.

    beta: pool control, > 1; pool = floor(B'/β) × heads, so a LARGER β gives a SMALLER pool
        (β → 1: almost everything is pooled; β large: almost uniform). Paper default 1.005-1.01.
    temp: importance is raised to this power and renormalized (1 = plain L1 importance).
    As a method (`headkv-NAME`), `scores` are the head scores named NAME; `budgets` a fixed matrix instead (a
    budgets file: its KV size and window are the method's).
    """

    summary: ClassVar[str] = "HeadKV: a floor per head plus a pool shared by the head scores of --scores NAME=FILE"
    needs_head_scores: ClassVar[bool] = True
    beta: float = BETA
    temp: float = TEMP
    scores: HeadScores | None = field(default=None, repr=False, compare=False)
    budgets: Budgets | None = field(default=None, repr=False, compare=False)
    scores_name: str | None = None  # NAME of headkv-NAME
    source: str | None = field(default=None, init=False, repr=False, compare=False)  # the scores' file, if read

    def allocate(self, geometry: Geometry, budget: int, window: int, granularity: str,
                 scores: HeadScores | None = None) -> Budgets:
        check_geometry(geometry)
        check_budget(budget, window)
        check_beta(self.beta)
        check_temp(self.temp)
        if scores is None:
            raise HeadscoreError("method headkv needs head scores (--scores head_scores.json)")
        importance = head_importance(scores, geometry, granularity, self.temp)
        matrix = headkv_rule(importance, budget - window, self.beta)
        return Budgets(matrix=matrix, method="headkv", budget=budget, window=window, granularity=granularity,
                       geometry=geometry, beta=float(self.beta), temp=float(self.temp),
                       source_scores=scores.fingerprint)

    def head_scores(self) -> HeadScores | None:
        return self.scores

    def source_scores(self) -> str | None:
        """Where the budgets' head scores came from: the file read, or the scores' fingerprint."""
        if self.budgets is not None:
            return self.budgets.source_scores
        return self.source or (self.scores.fingerprint if self.scores is not None else None)

    def budgets_for(self, geometry: Geometry, budget: int, window: int, granularity: str) -> Budgets:
        return self.budgets if self.budgets is not None else super().budgets_for(geometry, budget, window,
                                                                                 granularity)


@register_allocation("uniform")
@dataclass
class UniformAllocation(Allocation):
    """SnapKV: every head keeps B − w prompt entries (plus the window). Scores are ignored."""

    summary: ClassVar[str] = "every head keeps the same number of entries (SnapKV's)"

    def allocate(self, geometry: Geometry, budget: int, window: int, granularity: str,
                 scores: HeadScores | None = None) -> Budgets:
        check_geometry(geometry)
        check_budget(budget, window)
        shape = (geometry.layers, heads_at(geometry, granularity))
        matrix = torch.full(shape, budget - window, dtype=torch.int64)
        return Budgets(matrix=matrix, method="uniform", budget=budget, window=window, granularity=granularity,
                       geometry=geometry)


@register_allocation("pyramid")
@dataclass
class PyramidAllocation(Allocation):
    """PyramidKV: per-layer budgets falling linearly from 2B' − min (first layer) to min = floor(B'/β_p)
    (last layer), every head of a layer alike; the total equals the uniform one. Scores are ignored.

    pyramid_beta: β_p ≥ 1, how far the last layer falls (1 = uniform; PyramidKV's default 20).
    pyramid_schedule: "linear" (exact interpolation, total = uniform, any prompt), or the authors' rule for the
    prompt at hand (`pyramid_official_budgets`): "headkv" or "kvcache-factory" (these decide themselves when a
    layer is kept whole; `beyond_prompt` does not apply); "headkv-first-prompt": HeadKV's rule as its code runs
    it (`SnapKVCluster.pyram_init`): each layer's budget is fixed by the first prompt this allocation sees and
    kept for every later prompt (a layer stays whole when a prompt is shorter than its budget + window), so
    results depend on the order of the samples.
    """

    summary: ClassVar[str] = "PyramidKV: budgets falling linearly over the layers (--pyramid-beta)"
    pyramid_beta: float = PYRAMID_BETA
    pyramid_schedule: str = PYRAMID_SCHEDULE

    def __post_init__(self) -> None:
        check_pyramid_beta(self.pyramid_beta)
        if self.pyramid_schedule not in PYRAMID_SCHEDULES:
            raise HeadscoreError(f"unknown pyramid schedule '{self.pyramid_schedule}': use "
                                 f"{', '.join(PYRAMID_SCHEDULES)}")

    def allocate(self, geometry: Geometry, budget: int, window: int, granularity: str,
                 scores: HeadScores | None = None) -> Budgets:
        check_geometry(geometry)
        check_budget(budget, window)
        pb = self.pyramid_beta
        check_pyramid_beta(pb)
        per_layer = pyramid_layer_budgets(geometry.layers, budget - window, pb)
        matrix = per_layer[:, None].expand(-1, heads_at(geometry, granularity)).contiguous()
        return Budgets(matrix=matrix, method="pyramid", budget=budget, window=window, granularity=granularity,
                       geometry=geometry, pyramid_beta=float(pb))

    def counts(self, layer: int, scores: torch.Tensor, budget: int, window: int, geometry: Geometry,
               granularity: str) -> torch.Tensor:
        if self.pyramid_schedule == "linear":
            return super().counts(layer, scores, budget, window, geometry, granularity)
        heads, m = scores.shape
        if self.pyramid_schedule == "headkv-first-prompt":
            first = self.__dict__.setdefault("_first", {})  # per layer, its budget from the first prompt
            if layer not in first:
                first[layer] = int(pyramid_official_budgets(geometry.layers, budget - window, self.pyramid_beta,
                                                            m + window, window, "headkv")[0][layer])
            kept = m if m + window < first[layer] + window else first[layer]
            return torch.full((heads,), kept, dtype=torch.int64)
        budgets, whole = pyramid_official_budgets(geometry.layers, budget - window, self.pyramid_beta, m + window,
                                                  window, self.pyramid_schedule)
        return torch.full((heads,), m if whole[layer] else int(budgets[layer]), dtype=torch.int64)


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


@register_allocation("ada")
@dataclass
class AdaAllocation(Allocation):
    """AdaKV: per layer, the top `(B − w) × heads` token scores over all heads jointly decide each head's count,
    with a floor of `alpha × (B − w)` per head; chosen at prefill from the prompt's scores.

    `ada_allocation`: "pool" (`adaptive_budgets`: the floor plus the top (1 − alpha) share) or "official"
    (`adaptive_budgets_official`: normalized scores, 0.8 × count + floor, as the authors run it)."""

    summary: ClassVar[str] = "AdaKV: a layer's entries pooled over its heads by token score, with a floor (--alpha)"
    reads_scores: ClassVar[bool] = True
    alpha: float = ALPHA
    ada_allocation: str = ADA_ALLOCATION

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise HeadscoreError(f"alpha must lie in [0, 1], got {self.alpha!r}")
        if self.ada_allocation not in ADA_ALLOCATIONS:
            raise HeadscoreError(f"unknown ada allocation '{self.ada_allocation}': use {', '.join(ADA_ALLOCATIONS)}")

    def counts(self, layer: int, scores: torch.Tensor, budget: int, window: int, geometry: Geometry,
               granularity: str) -> torch.Tensor:
        rule = adaptive_budgets_official if self.ada_allocation == "official" else adaptive_budgets
        return rule(scores, budget - window, self.alpha).cpu()


@register_allocation("global")
@dataclass
class GlobalAllocation(Allocation):
    """One pool across every layer and head: the top `(B − w) × heads × layers` token scores of the whole model
    are kept (KVzip's non-uniform default). Needs scores that compare across layers (the scorer declares it)."""

    summary: ClassVar[str] = "one pool over all layers and heads, the top scores win (KVzip's; comparable scorers)"
    reads_scores: ClassVar[bool] = True
    spans_layers: ClassVar[bool] = True

    def counts(self, layer: int, scores: torch.Tensor, budget: int, window: int, geometry: Geometry,
               granularity: str) -> torch.Tensor:
        raise HeadscoreError("the global allocation needs every layer's scores at once (layer_counts)")

    def layer_counts(self, scores: list[torch.Tensor], budget: int, window: int, geometry: Geometry,
                     granularity: str) -> list[torch.Tensor]:
        heads, m = scores[0].shape
        if m == 0:
            return [torch.zeros(heads, dtype=torch.int64) for _ in scores]
        flat = torch.stack([s.float() for s in scores]).reshape(-1)  # [layers · heads · m]
        pool = min((budget - window) * heads * len(scores), flat.numel())
        picked = flat.topk(pool).indices // m  # (layer, head) of every kept entry
        counts = torch.bincount(picked, minlength=len(scores) * heads).view(len(scores), heads).cpu()
        return list(counts)


def allocate(method: str, geometry: Geometry, budget: int, *, window: int = WINDOW, beta: float = BETA,
             temp: float = TEMP, granularity: str | None = None, scores: HeadScores | None = None,
             pyramid_beta: float = PYRAMID_BETA) -> Budgets:
    """The fixed budgets of allocation `method` (headkv, uniform, pyramid; the data-dependent ones, ada and
    global, are an error: they have none); granularity None = "kv" under GQA. Each allocation takes the
    parameters among `beta`, `temp`, `pyramid_beta` that are its fields."""
    granularity = resolve_granularity(geometry, granularity)
    cls = ALLOCATIONS.get(method)
    if cls is None:
        raise HeadscoreError(f"unknown allocation method '{method}': use {', '.join(ALLOCATIONS)}")
    parameters = {"beta": beta, "temp": temp, "pyramid_beta": pyramid_beta}
    builder = cls(**{f.name: parameters[f.name] for f in fields(cls) if f.name in parameters})
    return builder.allocate(geometry, budget, window, granularity, scores)


def allocate_sweep(method: str, geometry: Geometry, budgets: list[int], betas: list[float],
                   **kwargs: Any) -> list[Budgets]:
    """One `Budgets` per (budget, beta), budget-major; β only varies headkv (other methods: one per budget).

    All combinations are checked before any is returned, so a bad value fails the whole sweep.
    """
    if not budgets or not betas:
        raise HeadscoreError("a sweep needs at least one budget and one beta")
    betas = list(dict.fromkeys(betas)) if method == "headkv" else betas[:1]
    return [allocate(method, geometry, budget, beta=beta, **kwargs)
            for budget in dict.fromkeys(budgets) for beta in betas]

