"""HeadScores: per-trial scores of every (layer, query head), in the HeadKV / Retrieval-Head JSON format.

The file is one JSON object on one line, keys `"<layer>-<head>"` in layer-major order, values lists of
per-trial floats. This module is the one reader and writer of that format.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headscore.core.defaults import TEMP
from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_write_text, fingerprint_bytes, read_json
from headscore.core.model import Geometry


@dataclass
class HeadScores:
    """`trials[l][h]` is the list of per-trial scores of query head `h` in layer `l`."""

    layers: int
    heads: int
    trials: list[list[list[float]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.trials:
            self.trials = [[[] for _ in range(self.heads)] for _ in range(self.layers)]

    @classmethod
    def from_tensor(cls, per_trial: torch.Tensor) -> HeadScores:
        """From a `[trials, layers, heads]` tensor of per-trial scores."""
        _, layers, heads = per_trial.shape
        values = per_trial.permute(1, 2, 0).double().tolist()
        return cls(layers=layers, heads=heads, trials=values)

    def add_trial(self, scores: torch.Tensor) -> None:
        """Append one trial's `[layers, heads]` scores."""
        for layer, row in enumerate(scores.double().tolist()):
            for head, value in enumerate(row):
                self.trials[layer][head].append(value)

    def to_tensor(self) -> torch.Tensor:
        """Per-trial scores as `[trials, layers, heads]` float64; every head must hold the same number."""
        counts = {len(values) for row in self.trials for values in row}
        if len(counts) != 1:
            raise HeadscoreError(f"head scores hold different numbers of trials per head ({min(counts)} to "
                                 f"{max(counts)}): per-trial scores need one count for all heads")
        return torch.tensor(self.trials, dtype=torch.float64).permute(2, 0, 1)

    @property
    def num_trials(self) -> int:
        """Number of trials of the head with the most entries (official files hold equal-length lists)."""
        return max(len(values) for row in self.trials for values in row)

    def mean(self) -> torch.Tensor:
        """Mean over each head's trials, `[layers, heads]` float64; a head with no trials scores 0."""
        return torch.tensor([[sum(v) / len(v) if v else 0.0 for v in row] for row in self.trials],
                            dtype=torch.float64)

    def importance(self, temp: float = TEMP) -> torch.Tensor:
        """L1-normalized mean score raised to `temp` and renormalized: `[layers, heads]`, sums to 1."""
        return normalized_importance(self.mean(), temp)

    @property
    def fingerprint(self) -> str:
        return fingerprint_bytes(to_json_line(self))


def normalized_importance(mean: torch.Tensor, temp: float = TEMP) -> torch.Tensor:
    """`[..., layers, heads]` mean scores -> `mean / sum`, then `** temp`, renormalized, each `[layers, heads]`
    on its own (leading dimensions: independent score sets). All-zero scores raise a HeadscoreError."""
    total = mean.sum((-2, -1), keepdim=True)
    if not bool((total > 0).all()):
        raise HeadscoreError("head scores are all zero: no head has any score to normalize")
    weights = (mean / total) ** temp
    return weights / weights.sum((-2, -1), keepdim=True)


def group_by_kv_head(importance: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum `[..., layers, query_heads]` over the query heads that share a KV head: `[..., layers, kv_heads]`.

    Query head `h` uses KV head `h // (query_heads // kv_heads)` (transformers' `repeat_kv` layout).
    """
    query_heads = importance.shape[-1]
    if query_heads % kv_heads:
        raise HeadscoreError(f"{query_heads} query heads do not split evenly over {kv_heads} KV heads")
    return importance.unflatten(-1, (kv_heads, query_heads // kv_heads)).sum(-1)


def to_json_line(scores: HeadScores) -> str:
    payload = {f"{layer}-{head}": scores.trials[layer][head]
               for layer in range(scores.layers) for head in range(scores.heads)}
    return json.dumps(payload)


def write_head_scores(path: str | Path, scores: HeadScores) -> None:
    """Write the HeadKV format: one JSON object on one line, layer-major `"layer-head"` keys."""
    atomic_write_text(path, to_json_line(scores))


def read_head_scores(path: str | os.PathLike, layers: int | None = None, heads: int | None = None) -> HeadScores:
    """Read a HeadKV-format score file (ours or the official ones), validating it.

    With `layers` / `heads` given, a file of another geometry is an error.
    """
    path = Path(path)
    payload = read_json(path, "head-score file")
    if not isinstance(payload, dict) or not payload:
        raise HeadscoreError(f"head-score file {path} is not a non-empty JSON object")
    cells: dict[tuple[int, int], Sequence] = {}
    for key, values in payload.items():
        try:
            layer, head = (int(part) for part in key.split("-"))
        except ValueError:
            raise HeadscoreError(f"head-score file {path}: key '{key}' is not 'layer-head'") from None
        if not isinstance(values, list):
            raise HeadscoreError(f"head-score file {path}: value of '{key}' is not a list")
        for value in values:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise HeadscoreError(f"head-score file {path}: head {key} has a non-finite or non-numeric "
                                     f"score ({value!r})")
            if value < 0:
                raise HeadscoreError(f"head-score file {path}: head {key} has a negative score ({value})")
        cells[(layer, head)] = values
    file_layers = max(layer for layer, _ in cells) + 1
    file_heads = max(head for _, head in cells) + 1
    if len(cells) != file_layers * file_heads:
        raise HeadscoreError(f"head-score file {path} lacks heads: {len(cells)} keys for a "
                             f"{file_layers} × {file_heads} grid")
    if layers is not None or heads is not None:
        found = Geometry(layers=file_layers, query_heads=file_heads, kv_heads=file_heads, head_dim=0)
        model = Geometry(layers=file_layers if layers is None else layers,
                         query_heads=file_heads if heads is None else heads, kv_heads=file_heads, head_dim=0)
        found.check_matches(model, f"the head scores in {path}", kv_heads=False)
    trials = [[[float(v) for v in cells[(layer, head)]] for head in range(file_heads)]
              for layer in range(file_layers)]
    return HeadScores(layers=file_layers, heads=file_heads, trials=trials)
