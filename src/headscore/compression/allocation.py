"""Allocation methods: HeadKV's shared pool, and the uniform (SnapKV) and pyramid (PyramidKV) baselines.

The methods are a registry (`ALLOCATIONS`, filled by `@register_allocation(name)`); `allocate(method, ...)` looks
it up when called. Each returns a `compression.budgets.Budgets`.

The HeadKV rule (official code): with B the average budget per head and w the window, B' = B − w;
pool = floor(B' / β) × layers × heads; floor = B' − floor(B' / β); budget = round(score × pool + floor).
A larger β gives a smaller shared pool; β > 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

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
from headscore.core.defaults import BETA, PYRAMID_BETA, TEMP, WINDOW
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


PYRAMID_SCHEDULES = ("linear", "headkv", "kvcache-factory")


def pyramid_official_budgets(layers: int, inner: int, pyramid_beta: float, length: int, window: int,
                             schedule: str = "headkv") -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' PyramidKV schedule for a prompt of `length` tokens: (`[layers]` int64 budgets, window
    excluded; `[layers]` bool, layers kept whole).

    min = B' // β_p, max = 2B' − min; when max ≥ m = length − window, max = m and min = 2B' − m; whole-number
    steps (max − min) // (layers − 1); layer l keeps max − l · steps. `headkv` (HeadKV `snapkv_utils.py`
    L130–148): a layer is kept whole when length < its budget + window. `kvcache-factory` (`PyramidKVCluster`):
    kept whole when length < B' + window; uniform B' when length < 2B'.
    """
    if schedule not in PYRAMID_SCHEDULES[1:]:
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


ALLOCATIONS: dict[str, type] = {}
A = TypeVar("A", bound=type)


def register_allocation(name: str) -> Callable[[A], A]:
    """Class decorator: register an allocation method under `name` (`allocate --method NAME`). The class is a
    dataclass whose fields are its parameters (taken from `allocate`'s keywords of the same names) with an
    `allocate(geometry, budget, window, granularity, scores) -> Budgets` method."""

    def add(cls: A) -> A:
        ALLOCATIONS[name] = cls
        return cls

    return add


@register_allocation("headkv")
@dataclass
class HeadKVAllocation:
    """HeadKV: a floor for every head plus a shared pool split in proportion to head importance.

    beta: pool control, > 1; pool = floor(B'/β) × heads, so a LARGER β gives a SMALLER pool
        (β → 1: almost everything is pooled; β large: almost uniform). Paper default 1.005-1.01.
    temp: importance is raised to this power and renormalized (1 = plain L1 importance).
    """

    beta: float = BETA
    temp: float = TEMP

    def allocate(self, geometry: Geometry, budget: int, window: int, granularity: str,
                 scores: HeadScores | None) -> Budgets:
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


@register_allocation("uniform")
@dataclass
class UniformAllocation:
    """SnapKV: every head keeps B − w prompt entries (plus the window). Scores are ignored."""

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
class PyramidAllocation:
    """PyramidKV: per-layer budgets falling linearly from 2B' − min (first layer) to min = floor(B'/β_p)
    (last layer), every head of a layer alike; the total equals the uniform one. Scores are ignored.

    pyramid_beta: β_p ≥ 1, how far the last layer falls (1 = uniform; PyramidKV's default 20).
    """

    pyramid_beta: float = PYRAMID_BETA

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


def allocate(method: str, geometry: Geometry, budget: int, *, window: int = WINDOW, beta: float = BETA,
             temp: float = TEMP, granularity: str | None = None, scores: HeadScores | None = None,
             pyramid_beta: float = PYRAMID_BETA) -> Budgets:
    """Budgets for `method` (a name in `ALLOCATIONS`: headkv, uniform, pyramid); granularity None = "kv" under
    GQA. Each method takes the parameters among `beta`, `temp`, `pyramid_beta` that are its fields."""
    granularity = resolve_granularity(geometry, granularity)
    cls = ALLOCATIONS.get(method)
    if cls is None:
        raise HeadscoreError(f"unknown allocation method '{method}': use {', '.join(ALLOCATIONS)}")
    parameters = {"beta": beta, "temp": temp, "pyramid_beta": pyramid_beta}
    builder = cls(**{f.name: parameters[f.name] for f in fields(cls)})
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

