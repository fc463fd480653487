"""Per-head KV budgets: the `Budgets` matrix, the checks of every budget parameter, and granularity.

Every allocation method (`compression.allocation`) produces one `Budgets`: a `[layers, heads]` int64 matrix of
the prompt entries each head keeps (the observation window's `window` entries come on top), at KV-head (`"kv"`)
or query-head (`"query"`) granularity, plus every parameter that produced it. The budgets file is
`compression.budgets_file`; summaries and heatmaps are `compression.budget_summary`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry

GRANULARITIES = ("kv", "query")
FORMAT = "headscore-budgets/1"
SWEEP_FORMAT = "headscore-budget-sweep/1"


@dataclass
class Budgets:
    """Per-head KV budgets. `matrix` is `[layers, heads]` int64, heads = KV heads (granularity "kv") or query
    heads ("query"); each entry counts the prompt positions a head keeps, EXCLUDING the `window` entries of
    the observation window, which every head keeps on top."""

    matrix: torch.Tensor
    method: str
    budget: int
    window: int
    granularity: str
    geometry: Geometry
    beta: float | None = None
    temp: float | None = None
    pyramid_beta: float | None = None
    source_scores: str | None = None
    tuning: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None  # the memory target it was sized for (`compression.memory`), if any

    @property
    def layers(self) -> int:
        return self.matrix.shape[0]

    @property
    def heads(self) -> int:
        """Heads per layer at this granularity."""
        return self.matrix.shape[1]

    @property
    def total_entries(self) -> int:
        """KV entries kept over all heads and layers: the matrix plus the window of every head."""
        return int(self.matrix.sum()) + self.window * self.matrix.numel()

    @property
    def uniform_entries(self) -> int:
        """Entries a uniform budget B per head keeps at this granularity (the same total, up to rounding)."""
        return self.budget * self.matrix.numel()

    @property
    def query_head_entries(self) -> int:
        """Entries kept when every query head stores its own copy (the official HeadKV code): B × layers ×
        query heads for a uniform budget."""
        return self.budget * self.geometry.layers * self.geometry.query_heads

    @property
    def pool_entries(self) -> int | None:
        """HeadKV's shared pool, floor(B' / β) × layers × heads; None for other methods."""
        if self.beta is None:
            return None
        return pool_share(self.budget - self.window, self.beta) * self.matrix.numel()

    @property
    def floor_entries(self) -> int | None:
        """HeadKV's per-head floor, B' − floor(B' / β); None for other methods."""
        if self.beta is None:
            return None
        inner = self.budget - self.window
        return inner - pool_share(inner, self.beta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method": self.method,
            "budget": self.budget,
            "window": self.window,
            "beta": self.beta,
            "temp": self.temp,
            "pyramid_beta": self.pyramid_beta,
            "granularity": self.granularity,
            "geometry": self.geometry.to_dict(),
            "shape": list(self.matrix.shape),
            "total_entries": self.total_entries,
            "uniform_entries": self.uniform_entries,
            "source_scores": self.source_scores,
            **({"tuning": self.tuning} if self.tuning is not None else {}),
            **({"memory": self.memory} if self.memory is not None else {}),
            "matrix": self.matrix.tolist(),
        }


# ---------------------------------------------------------------------------------------------- validation


def check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise HeadscoreError(f"window must be a non-negative integer, got {window!r}")


def check_budget(budget: int, window: int) -> None:
    """B, entries per head with the window, must be an integer above the window `w`."""
    check_window(window)
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise HeadscoreError(f"budget must be an integer number of KV entries per head, got {budget!r}")
    if budget <= window:
        raise HeadscoreError(f"budget {budget} must exceed the observation window ({window}): every head "
                             f"keeps the window's {window} entries on top of its share")


def check_beta(beta: float) -> None:
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta <= 1:
        raise HeadscoreError(f"beta must be a finite number > 1 (a larger beta gives a smaller shared pool), "
                             f"got {beta!r}")


def check_temp(temp: float) -> None:
    if not isinstance(temp, (int, float)) or isinstance(temp, bool) or not math.isfinite(temp) or temp <= 0:
        raise HeadscoreError(f"temp must be a finite number > 0, got {temp!r}")


def check_pyramid_beta(pyramid_beta: float) -> None:
    pb = pyramid_beta
    if not isinstance(pb, (int, float)) or isinstance(pb, bool) or not math.isfinite(pb) or pb < 1:
        raise HeadscoreError(f"pyramid beta must be a finite number >= 1, got {pb!r}")


def resolve_granularity(geometry: Geometry, granularity: str | None) -> str:
    """None: "kv" when query heads share KV heads, else "query"."""
    if granularity is None:
        return "kv" if geometry.kv_heads < geometry.query_heads else "query"
    if granularity not in GRANULARITIES:
        raise HeadscoreError(f"unknown granularity '{granularity}': use kv or query")
    return granularity


def heads_at(geometry: Geometry, granularity: str) -> int:
    return geometry.kv_heads if granularity == "kv" else geometry.query_heads


def check_geometry(geometry: Geometry) -> None:
    if geometry.layers <= 0 or geometry.query_heads <= 0 or geometry.kv_heads <= 0:
        raise HeadscoreError(f"geometry needs positive layers and heads, got {geometry.layers} layers × "
                             f"{geometry.query_heads} query heads / {geometry.kv_heads} KV heads")
    if geometry.query_heads % geometry.kv_heads:
        raise HeadscoreError(f"{geometry.query_heads} query heads do not split evenly over "
                             f"{geometry.kv_heads} KV heads")



def pool_share(inner: int, beta: float) -> int:
    """floor(B' / β): each head's share of the shared pool (Python's float floor division, as upstream)."""
    return int(inner // beta)
