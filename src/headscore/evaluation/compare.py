"""`headscore compare`: do two head-score files agree, and how many trials does a stable ranking need?

`compare_scores(A, B)`: Spearman and Kendall rank correlation (scipy.stats) of the per-query-head importance
(mean score over counted trials, L1-normalized), the share of A's top-k heads that are among B's top k, and
the L1 distance between the HeadKV budget matrices the two files give at one budget and β, as a share of A's
total (Σ|A − B| / Σ A over the prompt entries each head keeps; the window is the same for both and left out).
An L1 share of 0.1 means a tenth of the KV entries sit at other heads.

`bootstrap_stability(A)`: resamples A's counted trials with replacement (`draws` draws of n trials, fixed seed)
for n = 5, 10, 20, 50, 100, ... up to all of them, and measures each draw's distribution against the full
one: top-k overlap (mean and 5th percentile) and budget L1 share (mean and 95th percentile, the same worst 5 %
of draws). The smallest n at which at least `share` of the draws keep `overlap` of the top k is the number of
trials a stable head distribution needs. Every draw of one n is computed at once: a `[draws, trials]` count
matrix times the `[trials, heads]` score matrix.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from scipy import stats

from headscore.compression.allocation import allocate, headkv_rule
from headscore.compression.budgets import check_geometry, resolve_granularity
from headscore.core.defaults import BETA, BUDGET, WINDOW
from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_open, write_json
from headscore.core.model import Geometry, load_geometry
from headscore.core.plots import figure_format, line_plot, scatter_plot
from headscore.scoring.head_scores import HeadScores, group_by_kv_head, normalized_importance, read_head_scores

TOP_KS = (10, 20, 50)
TRIAL_COUNTS = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def scores_geometry(scores: HeadScores, *, kv_heads: int | None = None, model: str | None = None) -> Geometry:
    """The geometry of a score file: layers × query heads from its keys; KV heads from `kv_heads`, or
    `model`'s config (which must match the keys), else one KV head per query head (query granularity)."""
    if model is not None and kv_heads is not None:
        raise HeadscoreError("give either --model or --kv-heads, not both")
    if model is not None:
        geometry = load_geometry(model)
        if (geometry.layers, geometry.query_heads) != (scores.layers, scores.heads):
            raise HeadscoreError(f"the head scores are for {scores.layers} layers × {scores.heads} heads, but "
                                 f"model {model} has {geometry.layers} layers × {geometry.query_heads} heads")
        return geometry
    geometry = Geometry(layers=scores.layers, query_heads=scores.heads,
                        kv_heads=scores.heads if kv_heads is None else kv_heads, head_dim=0)
    check_geometry(geometry)
    return geometry


def top_k_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the `k` largest entries of `a` that are among the `k` largest of `b`.

    a: `[..., heads]`, b: `[heads]` or `[..., heads]`; returns `[...]` float64 in [0, 1]. Ties are broken
    by position (stable sort), so the result is deterministic.
    """
    top_a = torch.argsort(a, dim=-1, descending=True, stable=True)[..., :k]
    top_b = torch.argsort(b, dim=-1, descending=True, stable=True)[..., :k]
    in_b = torch.zeros(b.shape, dtype=torch.bool).scatter_(-1, top_b, True).expand(a.shape)
    return in_b.gather(-1, top_a).sum(-1).double() / k


def budget_l1_share(a: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Σ|a − reference| / Σ reference over each `[layers, heads]` budget matrix: `[...]` float64."""
    return (a - reference).abs().sum((-2, -1)).double() / reference.sum((-2, -1)).double()


def _budget_matrices(importance: torch.Tensor, geometry: Geometry, budget: int, window: int,
                     beta: float) -> torch.Tensor:
    """`[..., layers, query_heads]` importance -> HeadKV budgets at the geometry's default granularity."""
    if resolve_granularity(geometry, None) == "kv":
        importance = group_by_kv_head(importance, geometry.kv_heads)
    return headkv_rule(importance, budget - window, beta)


@dataclass
class Comparison:
    """Agreement of two head-score files (see the module docstring); `overlap` maps k to the top-k share."""

    a: str
    b: str
    layers: int
    query_heads: int
    kv_heads: int
    granularity: str
    trials_a: int
    trials_b: int
    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float
    overlap: dict[int, float]
    budget: int
    beta: float
    window: int
    budget_l1: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: NaN (a rank correlation of constant scores) becomes null."""
        data = {**asdict(self), "overlap": {str(k): v for k, v in self.overlap.items()}}
        return {key: None if isinstance(value, float) and not math.isfinite(value) else value
                for key, value in data.items()}


def compare_scores(a: HeadScores, b: HeadScores, *, geometry: Geometry, budget: int = BUDGET, beta: float = BETA,
                   window: int = WINDOW, ks: tuple[int, ...] = TOP_KS, names: tuple[str, str] = ("A", "B"),
                   ) -> Comparison:
    """Rank correlation, top-k overlap and budget L1 share of two score files of one geometry."""
    if (a.layers, a.heads) != (b.layers, b.heads):
        raise HeadscoreError(f"{names[0]} is for {a.layers} layers × {a.heads} heads but {names[1]} for "
                             f"{b.layers} × {b.heads}: compare needs one geometry")
    budgets_a = allocate("headkv", geometry, budget, window=window, beta=beta, scores=a)
    budgets_b = allocate("headkv", geometry, budget, window=window, beta=beta, scores=b)
    imp_a, imp_b = a.importance().flatten(), b.importance().flatten()
    spearman = stats.spearmanr(imp_a.numpy(), imp_b.numpy())
    kendall = stats.kendalltau(imp_a.numpy(), imp_b.numpy())
    heads = imp_a.numel()
    return Comparison(
        a=names[0], b=names[1], layers=a.layers, query_heads=a.heads, kv_heads=geometry.kv_heads,
        granularity=budgets_a.granularity, trials_a=a.num_trials, trials_b=b.num_trials,
        spearman=float(spearman.statistic), spearman_p=float(spearman.pvalue),
        kendall=float(kendall.statistic), kendall_p=float(kendall.pvalue),
        overlap={k: float(top_k_overlap(imp_a, imp_b, k)) for k in ks if k <= heads},
        budget=budget, beta=float(beta), window=window,
        budget_l1=float(budget_l1_share(budgets_b.matrix, budgets_a.matrix)))


def trial_counts(total: int) -> list[int]:
    """The n of the bootstrap: 5, 10, 20, 50, 100, ... below `total`, then `total` itself."""
    return [n for n in TRIAL_COUNTS if n < total] + [total]


@dataclass
class Stability:
    """Bootstrap stability of one score file; `rows` has one entry per trial count n."""

    source: str
    trials: int
    draws: int
    seed: int
    k: int
    overlap: float
    share: float
    budget: int
    beta: float
    window: int
    granularity: str
    rows: list[dict[str, float]] = field(default_factory=list)
    stable_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_stability(scores: HeadScores, *, geometry: Geometry, draws: int = 200, seed: int = 0, k: int = 20,
                        overlap: float = 0.9, share: float = 0.95, budget: int = BUDGET, beta: float = BETA,
                        window: int = WINDOW, source: str = "A") -> Stability:
    """Resample the counted trials of `scores` (with replacement) at every n of `trial_counts`; see the module
    docstring. Draws of one n come from a generator seeded by (seed, n), so adding an n changes no other row."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise HeadscoreError(f"draws must be a positive integer, got {draws!r}")
    if not 0 < overlap <= 1 or not 0 < share <= 1:
        raise HeadscoreError(f"the stability criterion needs 0 < overlap <= 1 and 0 < share <= 1, got "
                             f"{overlap} and {share}")
    per_trial = scores.to_tensor()  # [trials, layers, heads]
    trials = per_trial.shape[0]
    if trials == 0:
        raise HeadscoreError(f"{source} holds no trials to resample")
    heads = per_trial[0].numel()
    if not 1 <= k <= heads:
        raise HeadscoreError(f"top-k needs 1 <= k <= {heads} heads, got {k}")
    full = allocate("headkv", geometry, budget, window=window, beta=beta, scores=scores)  # validates the settings
    full_importance = normalized_importance(per_trial.mean(0)).flatten()
    flat = per_trial.reshape(trials, heads)
    result = Stability(source=source, trials=trials, draws=draws, seed=seed, k=k, overlap=overlap, share=share,
                       budget=budget, beta=float(beta), window=window, granularity=full.granularity)
    for n in trial_counts(trials):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + n)
        picks = torch.randint(trials, (draws, n), generator=generator)
        counts = torch.zeros(draws, trials, dtype=torch.float64).scatter_add_(
            1, picks, torch.ones(draws, n, dtype=torch.float64))
        means = (counts @ flat / n).reshape(draws, *per_trial.shape[1:])  # [draws, layers, heads]
        importance = normalized_importance(means)
        kept = top_k_overlap(importance.flatten(1), full_importance, k)
        l1 = budget_l1_share(_budget_matrices(importance, geometry, budget, window, beta), full.matrix)
        result.rows.append({
            "trials": n, "overlap_mean": float(kept.mean()), "overlap_p05": float(torch.quantile(kept, 0.05)),
            "share_stable": float((kept >= overlap - 1e-12).double().mean()),
            "l1_mean": float(l1.mean()), "l1_p95": float(torch.quantile(l1, 0.95)),
        })
    result.stable_at = next((int(row["trials"]) for row in result.rows if row["share_stable"] >= share - 1e-12), None)
    return result


def plot_comparison(a: HeadScores, b: HeadScores, path: str | os.PathLike, names: tuple[str, str]) -> None:
    """Scatter of per-head importance, A across and B up (symmetric-log axes: zeros stay visible)."""
    scatter_plot(a.importance().flatten().tolist(), b.importance().flatten().tolist(), path,
                 title="per-head importance (share of total score)", xlabel=Path(names[0]).name,
                 ylabel=Path(names[1]).name, log=True)


def plot_stability(stability: Stability, path: str | os.PathLike) -> None:
    """Top-k overlap (mean, 5th percentile) and budget L1 share (mean) against the number of trials."""
    xs = [float(row["trials"]) for row in stability.rows]
    k = stability.k
    line_plot({f"top-{k} overlap, mean": (xs, [row["overlap_mean"] for row in stability.rows], None),
               f"top-{k} overlap, 5th percentile": (xs, [row["overlap_p05"] for row in stability.rows], None),
               "budget L1 share, mean": (xs, [row["l1_mean"] for row in stability.rows], None)},
              path, title=f"stability of {Path(stability.source).name} ({stability.draws} draws)",
              xlabel="trials resampled", ylabel="vs all trials", xscale="symlog")


def write_stability(stability: Stability, out_dir: str | Path) -> list[Path]:
    """`stability.json`, `stability.csv` and `stability.png` in `out_dir` (each written atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "stability.json", stability.to_dict())
    with atomic_open(out_dir / "stability.csv") as handle:
        pd.DataFrame(stability.rows).to_csv(handle, index=False)
    plot_stability(stability, out_dir / "stability.png")
    return [out_dir / "stability.json", out_dir / "stability.csv", out_dir / "stability.png"]


def run_compare(a: str | Path, b: str | Path, *, budget: int = BUDGET, beta: float = BETA, window: int = WINDOW,
                kv_heads: int | None = None, model: str | None = None,
                plot: str | Path | None = None) -> Comparison:
    """`headscore compare A B` from Python: read both files, compare them, draw the scatter if asked."""
    if plot is not None:
        figure_format(plot)
    first, second = read_head_scores(a), read_head_scores(b)
    geometry = scores_geometry(first, kv_heads=kv_heads, model=model)
    comparison = compare_scores(first, second, geometry=geometry, budget=budget, beta=beta, window=window,
                                names=(str(a), str(b)))
    if plot is not None:
        plot_comparison(first, second, plot, (str(a), str(b)))
    return comparison


def run_bootstrap(a: str | Path, *, budget: int = BUDGET, beta: float = BETA, window: int = WINDOW,
                  kv_heads: int | None = None, model: str | None = None, draws: int = 200, seed: int = 0,
                  k: int = 20, overlap: float = 0.9, share: float = 0.95,
                  plot: str | Path | None = None) -> Stability:
    """`headscore compare A --bootstrap` from Python: the stability table, and its figure if asked."""
    if plot is not None:
        figure_format(plot)
    scores = read_head_scores(a)
    geometry = scores_geometry(scores, kv_heads=kv_heads, model=model)
    stability = bootstrap_stability(scores, geometry=geometry, draws=draws, seed=seed, k=k, overlap=overlap,
                                    share=share, budget=budget, beta=beta, window=window, source=str(a))
    if plot is not None:
        plot_stability(stability, plot)
    return stability
