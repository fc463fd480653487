"""Latency and memory against context length: the full cache vs one compressed cache, side by side.

For each length, one NIAH prompt of that many tokens is prefilled once (`generation.prefill`: full keys and
values plus window scores) and answered twice, on the full cache and on the compressed method's cache built from
that prefill; the KV report of each run is kept: prefill seconds (the shared prefill, plus the selection for
the compressed one), mean decode seconds per token, and KV bytes. Used by `make reproduce` for the report's latency /
memory figure; `bench/bench_compress.py` is the careful benchmark (interleaved repeats, medians).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from headscore.compression.generation import cache_report, compress_state, decode, prefill
from headscore.compression.presses import FullPress, make_press
from headscore.core.defaults import BETA, BUDGET, WINDOW
from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_open, versions, write_json
from headscore.core.model import Geometry, load_model, resolve_device
from headscore.core.plots import line_plot
from headscore.core.prompts import encode_prompt
from headscore.evaluation.tasks import get_task, task_samples

TABLE_FILE = "latency.csv"


def measure_lengths(model: Any, tokenizer: Any, lengths: Sequence[int], presses: dict[str, Any],
                    max_new_tokens: int = 16) -> list[dict[str, Any]]:
    """One row per (length, press label): context tokens, prefill s, decode s/token, KV bytes, KV ratio. Each
    length's prompt is prefilled once for every press (`compress_state`); the compressed presses share a window."""

    limit = getattr(model.config, "max_position_embeddings", None)
    too_long = [n for n in lengths if limit and n + max_new_tokens > limit]
    if too_long:
        raise HeadscoreError(f"latency: length {too_long[0]} + {max_new_tokens} new tokens exceeds the model's "
                             f"context of {limit}")
    samples = task_samples(get_task("niah", lengths=list(lengths), depths=[50.0], num_needles=1), tokenizer)
    geometry = Geometry.from_config(model.config)
    windows = {press.window for press in presses.values() if not isinstance(press, FullPress)}
    if len(windows) > 1:
        raise HeadscoreError(f"latency: the compressed methods share one prefill, so one window; got {sorted(windows)}")
    rows = []
    for sample in samples:
        ids = torch.tensor([encode_prompt(tokenizer, sample.prompt, sample.template)["input_ids"]])
        state = prefill(model, ids, next(iter(windows), WINDOW))
        for label, press in presses.items():
            began = time.perf_counter()
            cache = compress_state(state, press)
            selection = time.perf_counter() - began
            # no stop tokens: every run decodes exactly max_new_tokens, so per-token times compare
            tokens, seconds = decode(model, cache, state.logits, max_new_tokens)
            report = cache_report(cache, press, geometry, state.length, len(tokens), state.seconds + selection,
                                  seconds)
            rows.append({"target_length": sample.target_length, "context_tokens": report.context_tokens,
                         "method": label, "prefill_seconds": round(report.prefill_seconds, 4),
                         "decode_seconds_per_token": round(report.decode_per_token or 0.0, 5),
                         "kv_bytes": report.kv_bytes, "full_kv_bytes": report.full_kv_bytes,
                         "kv_ratio": round(report.ratio, 5), "generated_tokens": report.generated_tokens})
    return rows


def run_latency(model_name: str, out_dir: str | Path, *, lengths: Sequence[int], method: str = "headkv",
                label: str | None = None, budget: int = BUDGET, beta: float = BETA, scores: str | None = None,
                full_heads: int | None = None, max_new_tokens: int = 16, device: str = "auto",
                dtype: str | None = None) -> list[dict[str, Any]]:
    """Measure `full` and `method` at every length; write latency.csv, latency.png, kv_bytes.png, metadata.
    `full_heads`: razor's k given directly (razor-kN)."""

    out_dir = Path(out_dir)
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    geometry = Geometry.from_config(model.config)
    label = label or method
    presses = {"full": make_press("full", geometry),
               label: make_press(method, geometry, settings={"budget": budget, "beta": beta, "scores": scores,
                                                              "full_heads": full_heads})}
    rows = measure_lengths(model, tokenizer, lengths, presses, max_new_tokens)
    frame = pd.DataFrame(rows)
    with atomic_open(out_dir / TABLE_FILE) as handle:
        frame.to_csv(handle, index=False)
    series_time, series_bytes = {}, {}
    for name, group in frame.groupby("method", sort=False):
        xs = [float(v) for v in group["context_tokens"]]
        series_time[f"{name} prefill (s)"] = (xs, [float(v) for v in group["prefill_seconds"]], None)
        series_time[f"{name} decode (ms/token)"] = (xs, [1000 * float(v) for v in group["decode_seconds_per_token"]],
                                                    None)
        series_bytes[name] = (xs, [float(v) / 2**20 for v in group["kv_bytes"]], None)
    line_plot(series_time, out_dir / "latency.png", title=f"latency vs context: full vs {label} (B={budget})",
              xlabel="context tokens", ylabel="seconds / milliseconds", xscale="linear")
    line_plot(series_bytes, out_dir / "kv_bytes.png", title=f"KV cache size: full vs {label} (B={budget})",
              xlabel="context tokens", ylabel="KV cache (MiB)", xscale="linear")
    write_json(out_dir / "metadata.json", {
        "model": model_name, "geometry": geometry.to_dict(), "method": method, "label": label, "budget": budget,
        "beta": beta, "scores": scores, **({"full_heads": full_heads} if full_heads is not None else {}),
        "lengths": list(lengths), "max_new_tokens": max_new_tokens,
        "device": resolve_device(device), "dtype": str(model.dtype).removeprefix("torch."), "versions": versions()})
    return rows
