"""The geometry `allocate` allocates over: stated on the command line, a model's config, or a score file's."""

from __future__ import annotations

import json
import os
from pathlib import Path

from headscore.compression.budgets import check_geometry
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry, load_geometry
from headscore.scoring.head_scores import read_head_scores


def score_file_geometry(scores_path: str | os.PathLike) -> Geometry | None:
    """The geometry recorded in the `metadata.json` beside a score file (written by `estimate`), if any."""
    meta = Path(scores_path).with_name("metadata.json")
    if not meta.is_file():
        return None
    try:
        return Geometry.from_dict(json.loads(meta.read_text(encoding="utf-8")).get("geometry"))
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
        recorded = score_file_geometry(scores_path)
        if recorded is not None and kv_heads is None:
            return recorded, f"{Path(scores_path).with_name('metadata.json')}"
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

