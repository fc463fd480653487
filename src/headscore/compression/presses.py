"""SnapKV-style selection at prefill, and the compression methods ("presses") built on it.

The last `window` prompt tokens form the observation window. Their queries' attention over the earlier
`m = context − window` tokens is averaged over the window (`window_scores`), smoothed by a 1-D max-pool
(`pool_scores`), averaged over the query heads of each KV group (`group_scores`), and each head keeps its top
`budget` positions (`kept_positions`) plus the window, in original order.

A press is a small dataclass: `head_scores` turns the window scores of one layer into per-head selection
scores `[heads, m]`, `layer_budgets` says how many positions each head keeps `[heads]` (excluding the
window). Budgets are in the budget format of `headscore.allocation` (`Budgets.matrix`, window excluded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from headscore.compression.budgets import allocate, check_budget
from headscore.core.attention import attention_rows
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry

METHODS = ("full", "streaming", "snapkv", "pyramidkv", "ada-snapkv", "headkv")


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

    `budgets`: int64 `[heads]` on the CPU (clamped to m). Returns `(head, position, kept)`: int64 `[total]`
    head and position of every kept entry on the scores' device, head-major with positions ascending
    (original order), and the CPU int64 `[heads]` count per head (window included). Variable-length
    without loops over heads and without device syncs: the lengths are known on the CPU.
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


def streaming_scores(heads: int, m: int, sinks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Scores that rank the first `sinks` positions first, then the most recent ones: `[heads, m]`."""
    order = torch.arange(m, dtype=torch.float32, device=device)
    first = min(sinks, m)
    order[:first] = 2 * m - order[:first]  # sinks first, the earliest first
    return order.expand(heads, m)


# ---------------------------------------------------------------------------------------------- presses


@dataclass
class Press:
    """Base of every method. `window`: observation window (kept by every head on top of its budget);
    `kernel`: max-pool width smoothing the window scores."""

    window: int = 8
    kernel: int = 7
    name: ClassVar[str] = "press"

    def cache_heads(self, geometry: Geometry) -> int:
        """Heads the cache stores a selection for: KV heads, or query heads for query-granularity budgets."""
        return geometry.kv_heads

    def head_scores(self, scores: torch.Tensor, heads: int) -> torch.Tensor:
        """One layer's window scores `[q_heads, m]` -> selection scores `[heads, m]` (pool, then group mean)."""
        return group_scores(pool_scores(scores, self.kernel), heads)

    def layer_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Positions each head keeps before the window: int64 `[heads]` on the CPU, at most `m`."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.name, "window": self.window, "kernel": self.kernel}


@dataclass
class FullPress(Press):
    """No compression: the plain transformers cache keeps every token (the reference)."""

    name: ClassVar[str] = "full"

    def layer_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        return torch.full((scores.shape[0],), scores.shape[1], dtype=torch.int64)


@dataclass
class _MatrixPress(Press):
    """A press whose budgets are a fixed `[layers, heads]` matrix from `headscore.allocation`."""

    budget: int = 128
    _matrix: torch.Tensor | None = field(default=None, init=False, repr=False)

    def budget_matrix(self, geometry: Geometry) -> torch.Tensor:
        raise NotImplementedError

    def layer_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        if self._matrix is None:
            self._matrix = self.budget_matrix(geometry)
        return self._matrix[layer].clamp(max=scores.shape[1])

    def describe(self) -> dict:
        return {**super().describe(), "budget": self.budget}


def uniform_matrix(geometry: Geometry, budget: int, window: int) -> torch.Tensor:

    return allocate("uniform", geometry, budget, window=window, granularity="kv").matrix


@dataclass
class StreamingPress(_MatrixPress):
    """StreamingLLM: `sinks` attention-sink tokens plus the most recent tokens, `budget` per head (window
    included)."""

    sinks: int = 4
    name: ClassVar[str] = "streaming"

    def budget_matrix(self, geometry: Geometry) -> torch.Tensor:
        return uniform_matrix(geometry, self.budget, self.window)

    def head_scores(self, scores: torch.Tensor, heads: int) -> torch.Tensor:
        return streaming_scores(heads, scores.shape[1], self.sinks, scores.device)

    def describe(self) -> dict:
        return {**super().describe(), "sinks": self.sinks}


@dataclass
class SnapKVPress(_MatrixPress):
    """SnapKV: every head keeps `budget` entries (window included), chosen by its window scores."""

    name: ClassVar[str] = "snapkv"

    def budget_matrix(self, geometry: Geometry) -> torch.Tensor:
        return uniform_matrix(geometry, self.budget, self.window)


@dataclass
class PyramidKVPress(_MatrixPress):
    """PyramidKV: budgets fall linearly over the layers (`pyramid_beta` sets how far), SnapKV selection."""

    pyramid_beta: float = 20.0
    name: ClassVar[str] = "pyramidkv"

    def budget_matrix(self, geometry: Geometry) -> torch.Tensor:

        return allocate("pyramid", geometry, self.budget, window=self.window, granularity="kv",
                        pyramid_beta=self.pyramid_beta).matrix

    def describe(self) -> dict:
        return {**super().describe(), "pyramid_beta": self.pyramid_beta}


@dataclass
class AdaSnapKVPress(_MatrixPress):
    """AdaKV on SnapKV: per layer, the top `(budget − window) × heads` scores over all heads jointly, with a
    floor of `alpha × (budget − window)` per head; budgets are data-dependent, chosen at prefill."""

    alpha: float = 0.2
    name: ClassVar[str] = "ada-snapkv"

    def layer_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:

        check_budget(self.budget, self.window)
        return adaptive_budgets(scores, self.budget - self.window, self.alpha).cpu()

    def describe(self) -> dict:
        return {**super().describe(), "alpha": self.alpha}


@dataclass
class HeadKVPress(Press):
    """HeadKV: per-head budgets from `headscore.allocation` (`Budgets`, window excluded), SnapKV selection.

    Budgets at "query" granularity on a GQA model are supported as in the official code: each query head
    keeps its own selection of its KV head's entries (stored once per query head, so shared entries are
    stored several times).
    """

    budgets: object = None  # headscore.allocation.Budgets
    name: ClassVar[str] = "headkv"

    def __post_init__(self) -> None:
        if self.budgets is None:
            raise HeadscoreError("method headkv needs budgets: give --budgets or --scores")
        self.window = self.budgets.window

    def check(self, geometry: Geometry) -> None:
        """A budgets matrix for another geometry is an error."""
        want = (geometry.layers, self.cache_heads(geometry))
        got = tuple(self.budgets.matrix.shape)
        given = self.budgets.geometry
        if (given.layers, given.query_heads, given.kv_heads) != (geometry.layers, geometry.query_heads,
                                                                 geometry.kv_heads) or got != want:
            raise HeadscoreError(f"budgets are for {given.layers} layers × {given.query_heads} query heads / "
                                 f"{given.kv_heads} KV heads ({got[0]} × {got[1]} matrix), but the model has "
                                 f"{geometry.layers} layers × {geometry.query_heads} query heads / "
                                 f"{geometry.kv_heads} KV heads")

    def cache_heads(self, geometry: Geometry) -> int:
        return geometry.query_heads if self.budgets.granularity == "query" else geometry.kv_heads

    def layer_budgets(self, layer: int, scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        return self.budgets.matrix[layer].clamp(max=scores.shape[1])

    def describe(self) -> dict:
        b = self.budgets
        return {**super().describe(), "budget": b.budget, "beta": b.beta, "granularity": b.granularity,
                "budget_method": b.method, "source_scores": b.source_scores}
