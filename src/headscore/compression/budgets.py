"""Per-head KV budgets: HeadKV's shared pool, and the uniform (SnapKV) and pyramid (PyramidKV) baselines.

Every method produces one `Budgets`: a `[layers, heads]` int64 matrix of the prompt entries each head keeps
(the observation window's `window` entries come on top), at KV-head (`"kv"`) or query-head (`"query"`)
granularity, plus every parameter that produced it. `write_budgets` / `read_budgets` are the one reader and
writer of `budgets.json`. The methods are a registry (`ALLOCATIONS`, filled by `@register_allocation(name)`);
`allocate(method, ...)` looks it up, and every check and default of a budget lives in this module.

The HeadKV rule (official code): with B the average budget per head and w the window, B' = B − w;
pool = floor(B' / β) × layers × heads; floor = B' − floor(B' / β); budget = round(score × pool + floor).
A larger β gives a smaller shared pool; β > 1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_write_text, read_json, versions
from headscore.core.model import Geometry, load_geometry
from headscore.core.plots import head_heatmap
from headscore.scoring.head_scores import HeadScores, group_by_kv_head, read_head_scores

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


def head_importance(scores: HeadScores, geometry: Geometry, granularity: str,
                    temp: float = 1.0) -> torch.Tensor:
    """HeadKV importance at `granularity`: `[layers, heads]` float64 summing to 1.

    Mean per query head, L1-normalized, `** temp`, renormalized; for "kv", summed over the query heads that
    share a KV head. The scores must have the geometry's `layers × query_heads` grid.
    """
    if (scores.layers, scores.heads) != (geometry.layers, geometry.query_heads):
        raise HeadscoreError(f"head scores are for {scores.layers} layers × {scores.heads} query heads, but "
                             f"the model has {geometry.layers} layers × {geometry.query_heads} query heads")
    importance = scores.importance(temp)
    return group_by_kv_head(importance, geometry.kv_heads) if granularity == "kv" else importance


# ---------------------------------------------------------------------------------------------- the rules


def pool_share(inner: int, beta: float) -> int:
    """floor(B' / β): each head's share of the shared pool (Python's float floor division, as upstream)."""
    return int(inner // beta)


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

    beta: float = 1.01
    temp: float = 1.0

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

    pyramid_beta: float = 20.0

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


def allocate(method: str, geometry: Geometry, budget: int, *, window: int = 8, beta: float = 1.01,
             temp: float = 1.0, granularity: str | None = None, scores: HeadScores | None = None,
             pyramid_beta: float = 20.0) -> Budgets:
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


# ---------------------------------------------------------------------------------------------- the file


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
        geo = item["geometry"]
        geometry = Geometry(layers=int(geo["layers"]), query_heads=int(geo["query_heads"]),
                            kv_heads=int(geo["kv_heads"]), head_dim=int(geo.get("head_dim") or 0),
                            max_context=geo.get("max_context"), compressed_layers=geo.get("compressed_layers"))
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
                      tuning=item.get("tuning") if isinstance(item.get("tuning"), dict) else None)
    check_budget(budgets.budget, budgets.window)
    return budgets


def _check_against(budgets: Budgets, geometry: Geometry, where: str) -> None:
    file_geo, want = budgets.geometry, geometry
    if file_geo.grid != want.grid:
        raise HeadscoreError(f"{where} is for {file_geo.layers} layers × {file_geo.query_heads} query heads "
                             f"/ {file_geo.kv_heads} KV heads, but the model has {want.layers} layers × "
                             f"{want.query_heads} query heads / {want.kv_heads} KV heads")


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
            _check_against(budgets, geometry, f"budgets file {path}")
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


# ---------------------------------------------------------------------------------------------- helpers


def score_file_geometry(scores_path: str | os.PathLike) -> Geometry | None:
    """The geometry recorded in the `metadata.json` beside a score file (written by `estimate`), if any."""
    meta = Path(scores_path).with_name("metadata.json")
    if not meta.is_file():
        return None
    try:
        geo = json.loads(meta.read_text(encoding="utf-8")).get("geometry")
        return Geometry(layers=int(geo["layers"]), query_heads=int(geo["query_heads"]),
                        kv_heads=int(geo["kv_heads"]), head_dim=int(geo.get("head_dim") or 0),
                        max_context=geo.get("max_context"), compressed_layers=geo.get("compressed_layers"))
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None


def resolve_geometry(*, model: str | None = None, layers: int | None = None, heads: int | None = None,
                     kv_heads: int | None = None, scores_path: str | os.PathLike | None = None,
                     default_model: str | None = None, granularity: str | None = None) -> tuple[Geometry, str]:
    """The geometry to allocate over and where it came from.

    Stated `layers` + `heads` (+ `kv_heads`, default `heads`) win; else `model`'s config; else the
    metadata.json beside the score file; else `default_model`'s config if its shape matches the score file's
    `"layer-head"` keys, else those keys themselves (an authors' file as is), with `kv_heads` if stated
    (granularity `kv` needs it); without a score file, `default_model`'s config.
    """

    if layers is not None or heads is not None:
        if model is not None:
            raise HeadscoreError("give either --model or a stated geometry (--layers/--heads/--kv-heads), "
                                 "not both")
        if layers is None or heads is None:
            raise HeadscoreError("a stated geometry needs both --layers and --heads (and --kv-heads under "
                                 "GQA)")
        geometry = Geometry(layers=layers, query_heads=heads,
                            kv_heads=heads if kv_heads is None else kv_heads, head_dim=0)
        check_geometry(geometry)
        return geometry, "stated"
    if model is not None:
        if kv_heads is not None:
            raise HeadscoreError("give either --model or a stated geometry (--layers/--heads/--kv-heads), "
                                 "not both")
        return load_geometry(model), f"model {model}"
    if scores_path is not None:
        geometry = score_file_geometry(scores_path)
        if geometry is not None and kv_heads is None:
            return geometry, f"{Path(scores_path).with_name('metadata.json')}"
        found = read_head_scores(scores_path)
        if kv_heads is None and default_model is not None:
            default = load_geometry(default_model)
            if (default.layers, default.query_heads) == (found.layers, found.heads):
                return default, f"model {default_model}"
        if kv_heads is None and granularity == "kv":
            raise HeadscoreError(f"--granularity kv needs the number of KV heads: the score file {scores_path} "
                                 f"gives {found.layers} layers × {found.heads} query heads only; add --kv-heads "
                                 "(e.g. 8 for Llama-3-8B and Mistral-7B) or --model")
        geometry = Geometry(layers=found.layers, query_heads=found.heads,
                            kv_heads=found.heads if kv_heads is None else kv_heads, head_dim=0)
        check_geometry(geometry)
        return geometry, "the score file's keys" + ("" if kv_heads is None else " and --kv-heads")
    if kv_heads is not None:
        raise HeadscoreError("--kv-heads alone needs --scores or --layers/--heads")
    if default_model is None:
        raise HeadscoreError("no geometry: give --model or --layers/--heads/--kv-heads")
    return load_geometry(default_model), f"model {default_model}"


def summarize(budgets: Budgets, top: int = 10) -> dict[str, Any]:
    """Numbers for the summary: totals vs uniform, min / median / max per head, the pool and the top heads."""
    flat = budgets.matrix.flatten()
    pool, floor = budgets.pool_entries, budgets.floor_entries
    order = torch.argsort(flat, descending=True, stable=True)[:top]
    extra = (flat - floor) if floor is not None else None
    top_heads = [{"layer": int(i) // budgets.heads, "head": int(i) % budgets.heads,
                  "budget": int(flat[i]),
                  "pool_share": (float(extra[i]) / pool) if pool else None} for i in order.tolist()]
    return {
        "total_entries": budgets.total_entries,
        "uniform_entries": budgets.uniform_entries,
        "query_head_entries": budgets.query_head_entries,
        "min": int(flat.min()), "median": int(flat.median()), "max": int(flat.max()),
        "pool_entries": pool, "floor_entries": floor,
        "top_pool_share": (float(extra[order].sum()) / pool) if pool else None,
        "top": top_heads,
    }


def plot_budgets(budgets: Budgets, path: str | os.PathLike) -> None:
    """Heatmap of the budget matrix (layers down, heads across)."""

    beta = f", β={budgets.beta:g}" if budgets.beta is not None else ""
    head_heatmap(budgets.matrix, path,
                 title=f"{budgets.method} budgets (B={budgets.budget}, w={budgets.window}{beta})",
                 xlabel="KV head" if budgets.granularity == "kv" else "query head",
                 cbar_label="prompt entries kept (excluding the window)")


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
