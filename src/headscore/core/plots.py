"""Generic figures (matplotlib Agg, no pyplot global state), written atomically and deterministically.

Every figure is saved without timestamps in its metadata, so the same data gives the same bytes.
Stages add their own generic figure functions here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import torch

from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_open

# Metadata entries that would carry a timestamp or a version string, dropped for reproducible bytes.
_METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None},
             "pdf": {"CreationDate": None, "Creator": None, "Producer": None}}


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def figure_format(path: str | os.PathLike) -> str:
    """The format of a figure path from its suffix (png, svg or pdf); anything else is a HeadscoreError.

    Call it before a long run to reject a bad figure path early."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in _METADATA:
        raise HeadscoreError(f"cannot write figure {path}: use a .png, .svg or .pdf file name")
    return fmt


def save_figure(figure, path: str | os.PathLike) -> None:
    """Write `figure` atomically; the format comes from the suffix (png, svg or pdf), without timestamps."""
    fmt = figure_format(path)

    with matplotlib.rc_context({"svg.hashsalt": "headscore"}), atomic_open(path, "wb") as handle:
        figure.savefig(handle, format=fmt, metadata=_METADATA[fmt], bbox_inches="tight")


def _ticks(count: int, most: int = 16) -> list[int]:
    step = max(1, -(-count // most))
    return list(range(0, count, step))


def head_heatmap(matrix: torch.Tensor, path: str | os.PathLike, *, title: str, xlabel: str = "head",
                 ylabel: str = "layer", cbar_label: str = "") -> None:
    """Heatmap of a `[layers, heads]` matrix, layer 0 at the top, written atomically to `path`."""
    grid_heatmap(matrix, path, title=title, xlabel=xlabel, ylabel=ylabel, cbar_label=cbar_label)


def grid_heatmap(matrix: torch.Tensor, path: str | os.PathLike, *, title: str, xlabel: str, ylabel: str,
                 cbar_label: str = "", xticklabels: list[str] | None = None, yticklabels: list[str] | None = None,
                 vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis") -> None:
    """Heatmap of a `[rows, columns]` matrix, row 0 at the top; tick labels default to the indices."""
    if matrix.ndim != 2 or matrix.numel() == 0:
        raise HeadscoreError(f"heatmap needs a non-empty 2-D matrix, got shape {tuple(matrix.shape)}")
    values = matrix.detach().to("cpu", torch.float64).numpy()
    rows, columns = values.shape
    figure = _new_figure(min(14.0, 2.5 + 0.3 * max(columns, 8)), min(12.0, 1.5 + 0.22 * max(rows, 8)))
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", origin="upper", interpolation="nearest", cmap=cmap, vmin=vmin,
                        vmax=vmax)
    if xticklabels is None:
        axes.set_xticks(_ticks(columns))
    else:
        axes.set_xticks(range(columns), xticklabels, rotation=45 if columns > 6 else 0)
    if yticklabels is None:
        axes.set_yticks(_ticks(rows))
    else:
        axes.set_yticks(range(rows), yticklabels)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    colorbar = figure.colorbar(image, ax=axes)
    if cbar_label:
        colorbar.set_label(cbar_label)
    save_figure(figure, path)


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
              path: str | os.PathLike, *, title: str, xlabel: str, ylabel: str,
              xscale: str = "symlog") -> None:
    """Lines of y against x, one per named series `{label: (xs, ys, spread or None)}`; a spread is drawn as a
    shaded ± band. `xscale` 'symlog' suits counts that start at 0 (0, 1, 4, 16, ...); 'linear' otherwise."""
    if not series:
        raise HeadscoreError("line plot needs at least one series")
    figure = _new_figure(6.4, 4.2)
    axes = figure.add_subplot()
    for label, (xs, ys, spread) in series.items():
        line = axes.plot(xs, ys, marker="o", label=label)[0]
        if spread is not None:
            low = [y - s for y, s in zip(ys, spread, strict=True)]
            high = [y + s for y, s in zip(ys, spread, strict=True)]
            axes.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if xscale == "symlog":
        axes.set_xscale("symlog", linthresh=1)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    save_figure(figure, path)


def scatter_plot(xs: list[float], ys: list[float], path: str | os.PathLike, *, title: str, xlabel: str,
                 ylabel: str, log: bool = False) -> None:
    """Points (x, y) with the y = x diagonal. `log`: symmetric-log axes, linear below the smallest non-zero
    value, so values spanning decades show and zeros stay on the plot."""
    if len(xs) != len(ys) or not xs:
        raise HeadscoreError("scatter plot needs two equally long, non-empty lists of values")
    figure = _new_figure(5.4, 5.0)
    axes = figure.add_subplot()
    axes.scatter(xs, ys, s=10, alpha=0.6)
    low, high = min(min(xs), min(ys)), max(max(xs), max(ys))
    axes.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
    positive = [v for v in (*xs, *ys) if v > 0]
    if log and positive:
        axes.set_xscale("symlog", linthresh=min(positive))
        axes.set_yscale("symlog", linthresh=min(positive))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    save_figure(figure, path)


# the authors' needle-in-a-haystack colours (run_needle_visulize.py's LinearSegmentedColormap "custom_cmap")
NIAH_COLORS = ("#F0496E", "#EBB839", "#0CD79F")


def niah_panels(panels: Mapping[str, torch.Tensor], path: str | os.PathLike, *, lengths: Sequence[int],
                depths: Sequence[float], title: str) -> None:
    """Needle-in-a-haystack heatmaps in the layout of the HeadKV/PyramidKV figures, one panel per name, stacked:
    each `[depths, lengths]` score grid (0–1; NaN: not run) with depth 0 at the top, their red-yellow-green
    colours, grey cell borders, x "Token Limit" (ticks rotated 45°), y "Depth Percent", a "Score" colour bar;
    a panel's title is its name and mean score."""
    from matplotlib.colors import LinearSegmentedColormap

    if not panels:
        raise HeadscoreError("needle heatmaps need at least one panel")
    cmap = LinearSegmentedColormap.from_list("custom_cmap", list(NIAH_COLORS))
    width = max(8.0, 3.0 + 0.45 * len(lengths))
    figure = _new_figure(width, (1.2 + 0.32 * len(depths)) * len(panels) + 0.6)
    figure.suptitle(title)
    for row, (name, grid) in enumerate(panels.items()):
        values = grid.detach().to("cpu", torch.float64).numpy()
        if values.shape != (len(depths), len(lengths)):
            raise HeadscoreError(f"needle heatmap {name}: grid {values.shape} is not depths × lengths "
                                 f"({len(depths)} × {len(lengths)})")
        axes = figure.add_subplot(len(panels), 1, row + 1)
        image = axes.pcolormesh(values, cmap=cmap, vmin=0.0, vmax=1.0, edgecolors="grey", linewidth=0.5)
        axes.invert_yaxis()
        axes.set_xticks([i + 0.5 for i in range(len(lengths))], [str(v) for v in lengths], rotation=45)
        axes.set_yticks([i + 0.5 for i in range(len(depths))], [f"{v:g}" for v in depths])
        axes.set_xlabel("Token Limit")
        axes.set_ylabel("Depth Percent")
        finite = values[~torch.isnan(grid.detach().to("cpu", torch.float64)).numpy()]
        axes.set_title(f"{name}: {finite.mean():.3f}" if finite.size else name)
        figure.colorbar(image, ax=axes).set_label("Score")
    save_figure(figure, path)
