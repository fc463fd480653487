"""Summaries of a `Budgets` (totals, min / median / max, the pool, the top heads) and its heatmap."""

from __future__ import annotations

import os
from typing import Any

import torch

from headscore.compression.budgets import Budgets
from headscore.core.plots import head_heatmap


def summarize(budgets: Budgets, top: int = 10) -> dict[str, Any]:
    """Numbers for the summary: totals vs uniform, min / median / max per head, the pool and the top heads."""
    flat = budgets.matrix.flatten()
    pool, floor = budgets.pool_entries, budgets.floor_entries
    order = torch.argsort(flat, descending=True, stable=True)[:top]
    extra = flat - (floor or 0)  # above the floor (HeadKV: the pool share; other methods have no pool)
    top_heads = [{"layer": int(i) // budgets.heads, "head": int(i) % budgets.heads,
                  "budget": int(flat[i]),
                  "pool_share": float(extra[i]) / pool if pool else None} for i in order.tolist()]
    return {
        "total_entries": budgets.total_entries,
        "uniform_entries": budgets.uniform_entries,
        "query_head_entries": budgets.query_head_entries,
        "min": int(flat.min()), "median": int(flat.median()), "max": int(flat.max()),
        "pool_entries": pool, "floor_entries": floor,
        "top_pool_share": float(extra[order].sum()) / pool if pool else None,
        "top": top_heads,
    }


def plot_budgets(budgets: Budgets, path: str | os.PathLike) -> None:
    """Heatmap of the budget matrix (layers down, heads across)."""

    beta = f", β={budgets.beta:g}" if budgets.beta is not None else ""
    head_heatmap(budgets.matrix, path,
                 title=f"{budgets.method} budgets (B={budgets.budget}, w={budgets.window}{beta})",
                 xlabel="KV head" if budgets.granularity == "kv" else "query head",
                 cbar_label="prompt entries kept (excluding the window)")

