"""Memory targets as budgets: the largest KV size whose head-wise cache fits a number of bytes.

A user of KV tools thinks "fit the cache in 2 GiB at 32k tokens, 8 sequences". The head-wise cache of one sequence
of `context` prompt tokens holds, per compressed layer and cache head, `min(budget + window, context)` prompt
entries (the allocation's budget, window excluded), plus every KV head's generated tokens; each entry is a key
and a value of `head_dim` elements. `memory_budgets` finds the largest KV size B (window included) whose
allocation holds at most the target, by bisection (the bytes never fall as B grows, for every fixed allocation:
tested against a brute-force scan). Allocations chosen per prompt from token scores (ada, global) spend the total
of a uniform budget, so the uniform budgets size them. A hybrid model's sliding-window layers (bounded by their
window, never compressed) are not counted.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from headscore.compression.allocation import ALLOCATIONS, allocate
from headscore.compression.budgets import Budgets, check_window
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BYTES_PATTERN = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_bytes(text: str | int) -> int:
    """`"2GiB"` -> 2147483648, `"1.5 GB"` -> 1500000000, `"4096"` -> 4096 (B, KB/MB/GB/TB powers of 1000,
    KiB/MiB/GiB/TiB powers of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        found = BYTES_PATTERN.fullmatch(str(text))
        if found is None or found.group(2).lower() not in UNITS:
            raise HeadscoreError(f"memory '{text}' is not a size such as 2GiB, 512MiB, 1.5GB or 4096 (bytes)")
        value, unit = float(found.group(1)), found.group(2).lower()
    size = int(value * UNITS[unit])
    if size <= 0:
        raise HeadscoreError(f"memory must be positive, got '{text}'")
    return size


@dataclass(frozen=True)
class MemoryTarget:
    """What the cache must fit: `memory` bytes for `batch` sequences of `context` prompt tokens and
    `max_new_tokens` generated ones, stored in `dtype`."""

    memory: int
    context: int
    batch: int = 1
    dtype: str = "bfloat16"
    max_new_tokens: int = 0

    def __post_init__(self) -> None:
        for value, what, minimum in ((self.memory, "memory", 1), (self.context, "context", 1),
                                     (self.batch, "batch", 1), (self.max_new_tokens, "max new tokens", 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise HeadscoreError(f"{what} must be an integer of at least {minimum}, got {value!r}")
        if self.dtype not in ELEMENT_BYTES:
            raise HeadscoreError(f"unknown cache dtype '{self.dtype}': use {', '.join(ELEMENT_BYTES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_bytes(budgets: Budgets, target: MemoryTarget) -> int:
    """Bytes of keys and values the head-wise cache holds with `budgets` under `target`: every sequence's kept
    prompt entries (each head at most the context) plus every KV head's generated tokens."""
    geometry = budgets.geometry
    if geometry.head_dim <= 0:
        raise HeadscoreError("a memory target needs the model's head dimension: give --model")
    kept = int((budgets.matrix + budgets.window).clamp(max=target.context).sum())
    generated = geometry.layers * geometry.kv_heads * target.max_new_tokens
    return target.batch * (kept + generated) * geometry.head_dim * 2 * ELEMENT_BYTES[target.dtype]


def memory_budgets(allocation: str, geometry: Geometry, target: MemoryTarget, *, window: int,
                   granularity: str | None = None, **params: Any) -> tuple[Budgets, int]:
    """`(budgets, bytes held)` at the largest KV size B (window included, at most the context) whose cache fits
    `target`; `params`: the allocation's (`allocate`'s `beta`, `temp`, `scores`, `pyramid_beta`). Allocations
    that read token scores are sized by the uniform budgets. A target below the smallest cache (B = window + 1)
    is an error naming both."""
    check_window(window)
    cls = ALLOCATIONS.get(allocation)
    if cls is None:
        raise HeadscoreError(f"unknown allocation method '{allocation}': use {', '.join(ALLOCATIONS)}")
    sized_by = "uniform" if cls.reads_scores else allocation

    def budgets_at(budget: int) -> Budgets:
        return allocate(sized_by, geometry, budget, window=window, granularity=granularity, **params)

    low, high = window + 1, max(target.context, window + 1)
    smallest = budgets_at(low)
    if held_bytes(smallest, target) > target.memory:
        raise HeadscoreError(f"{target.memory:,} bytes cannot hold even {low} entries per head ({window} window + "
                             f"1): that cache takes {held_bytes(smallest, target):,} bytes")
    while low < high:  # the largest budget that fits: bytes never fall as the budget grows
        middle = (low + high + 1) // 2
        if held_bytes(budgets_at(middle), target) <= target.memory:
            low = middle
        else:
            high = middle - 1
    chosen = budgets_at(low)
    return chosen, held_bytes(chosen, target)
