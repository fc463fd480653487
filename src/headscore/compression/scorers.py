"""Token scorers: which prompt positions each cache head keeps (the first half of a method, `SCORER@ALLOCATION`).

A scorer is a small frozen dataclass registered under its name (`@register_scorer("snapkv")`, `SCORERS`) whose
fields are its parameters and whose one method, `score(inputs)`, gives every prompt position of every cache head
a score, `[batch, heads, n]` (higher: kept first). What a layer offers at prefill is a `ScorerInputs`: the keys and
values as cached (RoPE applied), the queries of the last prompt positions, the observation window's attention rows
(computed once and shared by every scorer that reads them), the attention module, the model's rotary parameters
and the results of extra passes a scorer declared (`extra_pass`, e.g. KVzip's reconstruction). Nothing in a
scorer depends on the prefill itself, so the same scorer can rank the entries of a cache during generation.

The observation window's `window` positions are always kept (the selection step adds them), so only the scores of
the first `n − window` positions are read; a scorer may leave the window's own scores at any value.

What a scorer declares (class attributes):
- `queries`: how many of the last prompt queries it reads (None: the window's);
- `extra_pass`: the name of an extra pass over the prompt it needs (`EXTRA_PASSES`), run once per prompt;
- `comparable`: its scores compare across layers and heads (what the `global` allocation needs);
- `needs_module`: it reads the attention module (e.g. the output projection).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F

from headscore.core.attention import attention_rows
from headscore.core.defaults import KERNEL, SCORE_DTYPE, SINKS
from headscore.core.errors import HeadscoreError

SCORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# ---------------------------------------------------------------------------------------------- tensors


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D max-pool over the last axis with stride 1 and 'same' length: `[..., m]` -> `[..., m]`."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    pooled = F.max_pool1d(scores.reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2)
    return pooled[..., : shape[-1]].reshape(shape)


def group_scores(scores: torch.Tensor, heads: int, reduce: str = "mean") -> torch.Tensor:
    """Query-head scores `[..., q_heads, m]` -> `[..., heads, m]`: reduced ("mean" or "max") over the query
    heads sharing a cache head (`repeat_kv` layout); unchanged when `heads` is the query heads."""
    q_heads, m = scores.shape[-2:]
    if heads == q_heads:
        return scores
    grouped = scores.reshape(*scores.shape[:-2], heads, q_heads // heads, m)
    return grouped.mean(dim=-2) if reduce == "mean" else grouped.amax(dim=-2)


def expand_heads(scores: torch.Tensor, heads: int) -> torch.Tensor:
    """KV-head scores `[..., kv_heads, m]` -> `[..., heads, m]`, each query head reading its KV head's scores
    (unchanged when `heads` is the KV heads)."""
    kv_heads = scores.shape[-2]
    return scores if heads == kv_heads else scores.repeat_interleave(heads // kv_heads, dim=-2)


def streaming_scores(heads: int, m: int, sinks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Scores that rank the first `sinks` positions first, then the most recent ones: `[heads, m]`."""
    order = torch.arange(m, dtype=torch.float32, device=device)
    first = min(sinks, m)
    order[:first] = 2 * m - order[:first]  # sinks first, the earliest first
    return order.expand(heads, m)


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Rope:
    """The model's rotary embedding: `inv_freq` `[head_dim / 2]` and its `attention_scaling` (cos and sin are
    multiplied by it); positions are the tokens' indices in their prompt."""

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0


@dataclass(eq=False)
class ScorerInputs:
    """What one layer offers a scorer at prefill, for a batch of prompts of one length `n` (one prompt: batch 1).

    `keys`, `values` `[batch, kv_heads, n, d]` as cached (RoPE applied); `queries` `[batch, q_heads, q, d]` the
    last q prompt positions' queries (RoPE applied, q ≥ `window` unless the prompt is shorter); `heads`: the cache
    heads a score is wanted for (KV heads, or query heads at "query" granularity); `layer`: the compressed slot;
    `module`: the layer's attention module (None where not available); `rope`: the model's rotary parameters
    (None: no RoPE); `extra`: per extra pass, its result for this layer (see `EXTRA_PASSES`).
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    window: int
    heads: int
    scaling: float | None = None
    layer: int = 0
    module: Any = None
    rope: Rope | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    _window_attention: torch.Tensor | None = field(default=None, repr=False)
    _scores: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def query_heads(self) -> int:
        return self.queries.shape[1]

    def window_attention(self) -> torch.Tensor:
        """Softmax rows of the last `window` queries over all n keys, causal inside the window: float32
        `[batch, q_heads, window, n]`; computed on first use, then shared by every scorer of these inputs."""
        if self._window_attention is None:
            n, window = self.length, self.window
            if window > self.queries.shape[2]:
                raise HeadscoreError(f"the scorer inputs hold {self.queries.shape[2]} queries, fewer than the "
                                     f"observation window ({window})")
            self._window_attention = attention_rows(self.queries[:, :, self.queries.shape[2] - window:], self.keys,
                                                    self.scaling, causal_offset=n - window)
        return self._window_attention

    def scores(self, scorer: Scorer) -> torch.Tensor:
        """`scorer.score(self)`, computed once per scorer (equal scorers share it): `[batch, heads, n]`."""
        key = (scorer, self.heads)
        if key not in self._scores:
            self._scores[key] = scorer.score(self)
        return self._scores[key]


# ---------------------------------------------------------------------------------------------- registry

SCORERS: dict[str, type[Scorer]] = {}
MODIFIERS: dict[str, type[Scorer]] = {}  # SCORER+MODIFIER: a scorer class whose `base` field is another scorer
S = TypeVar("S", bound="type[Scorer]")


def register_scorer(name: str) -> Callable[[S], S]:
    """Class decorator: register a scorer dataclass under `name` (the SCORER of `SCORER@ALLOCATION`)."""

    def add(cls: S) -> S:
        cls.name = name
        SCORERS[name] = cls
        return cls

    return add


@dataclass(frozen=True)
class Scorer:
    """Base of every scorer (see the module docstring). Subclasses are frozen dataclasses: equal parameters
    give equal (hashable) scorers, whose scores a prompt computes once."""

    name: ClassVar[str] = "scorer"
    summary: ClassVar[str] = ""  # one line for `--help`
    queries: ClassVar[int | None] = None
    extra_pass: ClassVar[str | None] = None
    comparable: ClassVar[bool] = False
    needs_module: ClassVar[bool] = False

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        """`[batch, inputs.heads, n]` scores of every prompt position (higher: kept first)."""
        raise NotImplementedError

    def query_count(self, window: int) -> int:
        """How many of the last prompt queries the scorer reads."""
        return window if self.queries is None else max(self.queries, window)

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def scorer_parameters(cls: type[Scorer]) -> set[str]:
    """The parameters (dataclass fields) a scorer takes."""
    return {f.name for f in fields(cls) if f.init}


# ---------------------------------------------------------------------------------------------- scorers


@register_scorer("snapkv")
@dataclass(frozen=True)
class SnapKVScorer(Scorer):
    """SnapKV: the window queries' mean attention, max-pooled over `kernel` positions, averaged over the query
    heads of each cache head. `score_dtype`: the window scores are rounded to it before pooling (the authors'
    fp16 runs)."""

    summary: ClassVar[str] = "SnapKV: the observation window's mean attention, max-pooled (the paper's selection)"
    comparable: ClassVar[bool] = True  # attention probabilities: every head's row sums to one
    kernel: int = KERNEL
    score_dtype: str = SCORE_DTYPE

    def __post_init__(self) -> None:
        check_integer(self.kernel, "kernel", 1)
        if self.score_dtype not in SCORE_DTYPES:
            raise HeadscoreError(f"unknown score dtype '{self.score_dtype}': use {', '.join(SCORE_DTYPES)}")

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        n, window = inputs.length, inputs.window
        if window == 0:
            return inputs.keys.new_zeros(inputs.keys.shape[0], inputs.heads, n, dtype=torch.float32)
        mean = inputs.window_attention()[..., : n - window].mean(dim=2)  # [batch, q_heads, m]
        selected = group_scores(pool_scores(mean.to(SCORE_DTYPES[self.score_dtype]), self.kernel), inputs.heads)
        return F.pad(selected, (0, window))


@register_scorer("streaming")
@dataclass(frozen=True)
class StreamingScorer(Scorer):
    """StreamingLLM: the first `sinks` positions (attention sinks), then the most recent ones."""

    summary: ClassVar[str] = "StreamingLLM: the first `sinks` tokens, then the most recent ones"
    sinks: int = SINKS

    def __post_init__(self) -> None:
        check_integer(self.sinks, "sinks", 0)

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        n, window = inputs.length, inputs.window
        ranked = streaming_scores(inputs.heads, n - window, self.sinks, inputs.keys.device)
        return F.pad(ranked, (0, window)).expand(inputs.keys.shape[0], -1, -1)


@register_scorer("random")
@dataclass(frozen=True)
class RandomScorer(Scorer):
    """Uniformly random scores, seeded by `seed` and the layer (the same prompt, layer and seed give the same
    selection): the floor every leaderboard shows."""

    summary: ClassVar[str] = "random positions (seeded): the floor of every comparison"
    comparable: ClassVar[bool] = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_integer(self.seed, "seed", 0)

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}-{inputs.layer}".encode()))
        shape = (inputs.keys.shape[0], inputs.heads, inputs.length)
        return torch.rand(shape, generator=generator).to(inputs.keys.device)


def check_integer(value: Any, what: str, minimum: int) -> None:
    """An integer parameter, at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer" if minimum == 0 else \
            f"an integer of at least {minimum}"
        raise HeadscoreError(f"{what} must be {kind}, got {value!r}")


# ---------------------------------------------------------------------------------------------- extra passes

# name -> function(model, tokenizer, input_ids [n], keys, values) -> per compressed layer a tensor the scorer
# reads from `ScorerInputs.extra[name]` (with a batch dimension of 1 added), e.g. KVzip's `[kv_heads, n]`
ExtraPass = Callable[..., list[torch.Tensor]]
EXTRA_PASSES: dict[str, ExtraPass] = {}


def register_extra_pass(name: str) -> Callable[[ExtraPass], ExtraPass]:
    """Function decorator: register an extra pass over a prompt under `name` (a scorer's `extra_pass`)."""

    def add(function: ExtraPass) -> ExtraPass:
        EXTRA_PASSES[name] = function
        return function

    return add
