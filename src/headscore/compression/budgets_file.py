"""The budgets file: `write_budgets` / `read_budgets` are the one writer and reader of `budgets.json` (one
`Budgets` object, or a sweep of them), and `write_allocations` writes the files (and heatmaps) of a sweep."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from headscore.compression.allocation import ALLOCATIONS
from headscore.compression.budget_summary import plot_budgets
from headscore.compression.budgets import (
    FORMAT,
    GRANULARITIES,
    SWEEP_FORMAT,
    Budgets,
    check_budget,
    check_geometry,
    heads_at,
)
from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_write_text, read_json, versions
from headscore.core.model import Geometry


def _dumps(payload: dict[str, Any]) -> str:
    """Indented JSON with every matrix row on one line (readable and diff-friendly)."""
    rows: dict[str, list[int]] = {}

    def marked(item: dict[str, Any]) -> dict[str, Any]:
        marks = [f"@@row-{len(rows) + i}@@" for i in range(len(item["matrix"]))]
        rows.update(zip(marks, item["matrix"], strict=True))
        rows[f"@@shape-{len(rows)}@@"] = item["shape"]
        return {**item, "shape": f"@@shape-{len(rows) - 1}@@", "matrix": marks}

    if "budgets" in payload:
        payload = {**payload, "budgets": [marked(item) for item in payload["budgets"]]}
    else:
        payload = marked(payload)
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    for mark, row in rows.items():
        text = text.replace(f'"{mark}"', json.dumps(row), 1)
    return text + "\n"


def write_budgets(path: str | os.PathLike, budgets: Budgets | list[Budgets]) -> None:
    """Write one `Budgets` (a budgets object) or a list (a sweep: `{"format", "versions", "budgets": [...]}`),
    atomically."""
    if isinstance(budgets, Budgets):
        payload = {**budgets.to_dict(), "versions": versions()}
    else:
        if not budgets:
            raise HeadscoreError("no budgets to write")
        payload = {"format": SWEEP_FORMAT, "versions": versions(), "budgets": [b.to_dict() for b in budgets]}
    atomic_write_text(path, _dumps(payload))


def _number(value: Any, where: str, name: str, *, optional: bool = False, integer: bool = False):
    if value is None and optional:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise HeadscoreError(f"{where}: field '{name}' is not {'an integer' if integer else 'a number'}")
    return value


def budgets_from_dict(item: Any, where: str) -> Budgets:
    """Parse and validate one budgets object (as written by `Budgets.to_dict`)."""
    if not isinstance(item, dict) or item.get("format") != FORMAT:
        raise HeadscoreError(f"{where} is not a headscore budgets object (format {FORMAT})")
    try:
        geometry = Geometry.from_dict(item["geometry"])
        method, granularity, rows = item["method"], item["granularity"], item["matrix"]
    except (KeyError, TypeError, ValueError) as error:
        raise HeadscoreError(f"{where}: missing or malformed field {error}") from None
    if method not in ALLOCATIONS:
        raise HeadscoreError(f"{where}: unknown method '{method}'")
    if granularity not in GRANULARITIES:
        raise HeadscoreError(f"{where}: unknown granularity '{granularity}'")
    check_geometry(geometry)
    shape = (geometry.layers, heads_at(geometry, granularity))
    if (not isinstance(rows, list) or len(rows) != shape[0]
            or any(not isinstance(row, list) or len(row) != shape[1] for row in rows)):
        raise HeadscoreError(f"{where}: the matrix is not {shape[0]} layers × {shape[1]} heads, as its "
                             f"geometry and granularity '{granularity}' require")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for row in rows for v in row):
        raise HeadscoreError(f"{where}: the matrix holds a value that is not a non-negative integer")
    budgets = Budgets(matrix=torch.tensor(rows, dtype=torch.int64).reshape(shape), method=method,
                      budget=_number(item.get("budget"), where, "budget", integer=True),
                      window=_number(item.get("window"), where, "window", integer=True),
                      granularity=granularity, geometry=geometry,
                      beta=_number(item.get("beta"), where, "beta", optional=True),
                      temp=_number(item.get("temp"), where, "temp", optional=True),
                      pyramid_beta=_number(item.get("pyramid_beta"), where, "pyramid_beta", optional=True),
                      source_scores=item.get("source_scores"),
                      tuning=item.get("tuning") if isinstance(item.get("tuning"), dict) else None,
                      memory=item.get("memory") if isinstance(item.get("memory"), dict) else None)
    check_budget(budgets.budget, budgets.window)
    return budgets


def read_budget_sweep(path: str | os.PathLike, geometry: Geometry | None = None) -> list[Budgets]:
    """Every `Budgets` in a budgets file (one for a single object, all of a sweep), validated; with
    `geometry` given, a file for another geometry is an error."""
    path = Path(path)
    payload = read_json(path, "budgets file")
    if isinstance(payload, dict) and payload.get("format") == SWEEP_FORMAT:
        items = payload.get("budgets")
        if not isinstance(items, list) or not items:
            raise HeadscoreError(f"budgets file {path} holds an empty sweep")
        found = [budgets_from_dict(item, f"budgets file {path} (entry {i})") for i, item in enumerate(items)]
    else:
        found = [budgets_from_dict(payload, f"budgets file {path}")]
    if geometry is not None:
        for budgets in found:
            budgets.geometry.check_matches(geometry, f"the budgets in {path}")
    return found


def read_budgets(path: str | os.PathLike, geometry: Geometry | None = None, *, budget: int | None = None,
                 beta: float | None = None, method: str | None = None) -> Budgets:
    """The one `Budgets` of a budgets file; in a sweep, the one matching `budget` / `beta` / `method`
    (exactly one must match). With `geometry` given, a file for another geometry is an error."""
    found = read_budget_sweep(path, geometry)
    chosen = [b for b in found if (budget is None or b.budget == budget)
              and (method is None or b.method == method)
              and (beta is None or (b.beta is not None and math.isclose(b.beta, beta)))]
    if len(chosen) != 1:
        wanted = ", ".join(f"{k}={v}" for k, v in (("budget", budget), ("beta", beta), ("method", method))
                           if v is not None) or "no selector"
        held = ", ".join(f"(budget={b.budget}, beta={b.beta}, method={b.method})" for b in found)
        raise HeadscoreError(f"budgets file {path}: {len(chosen)} entries match {wanted}; it holds {held}")
    return chosen[0]



def sweep_path(path: str | os.PathLike, budgets: Budgets) -> Path:
    """`budgets.json` -> `budgets_B128_beta1.01.json` (or `_B128` for methods without β): one file per
    combination of a sweep, and one figure per combination."""
    path = Path(path)
    tag = f"_B{budgets.budget}" + (f"_beta{budgets.beta:g}" if budgets.beta is not None else "")
    return path.with_name(f"{path.stem}{tag}{path.suffix}")


def write_allocations(results: list[Budgets], out: str | os.PathLike, *, split: bool = False,
                      plot: str | os.PathLike | None = None) -> list[Path]:
    """Write the budgets of `allocate_sweep`: one file `out` (one `Budgets`, or the whole sweep), or with `split`
    one file per combination, named by `sweep_path` (a single combination too, so names always say which);
    with `plot`, one heatmap per combination (named by `sweep_path` with `split` or several combinations).
    Returns the budgets files written."""
    if not results:
        raise HeadscoreError("no budgets to write")
    many = len(results) > 1
    if split:
        written = [sweep_path(out, result) for result in results]
        for path, result in zip(written, results, strict=True):
            write_budgets(path, result)
    else:
        written = [Path(out)]
        write_budgets(out, results if many else results[0])
    if plot is not None:
        for result in results:
            plot_budgets(result, sweep_path(plot, result) if split or many else plot)
    return written
