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

import importlib
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
    heads of each cache head. `score_dtype` float16 / bfloat16: computed as the authors' half-precision runs do
    (`rounded_window_attention`: the logits rounded before the softmax, the weights after it), the mean rounded
    before pooling, so their ties decide top-k as theirs."""

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
        rows = (inputs.window_attention() if self.score_dtype == "float32"
                else rounded_window_attention(inputs, SCORE_DTYPES[self.score_dtype]))
        mean = rows[..., : n - window].mean(dim=2)  # [batch, q_heads, m]
        selected = group_scores(pool_scores(mean.to(SCORE_DTYPES[self.score_dtype]), self.kernel), inputs.heads)
        return F.pad(selected, (0, window))


def rounded_window_attention(inputs: ScorerInputs, dtype: torch.dtype) -> torch.Tensor:
    """The window's attention rows as the authors' half-precision runs compute them (HeadKV `snapkv_utils.py`):
    the logits q·kᵀ rounded to `dtype`, divided by √d in `dtype`, softmaxed in float32 and rounded to `dtype`
    again. float32 `[batch, q_heads, window, n]` holding `dtype` values (no n × n: the window's rows only)."""
    queries, keys = inputs.queries[:, :, -inputs.window:].float(), inputs.keys.float()
    batch, q_heads, window, dim = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    grouped = queries.reshape(batch, kv_heads, (q_heads // kv_heads) * window, dim)
    logits = torch.matmul(grouped, keys.transpose(-1, -2)).view(batch, q_heads, window, n)
    scale = dim**-0.5 if inputs.scaling is None else inputs.scaling
    logits = logits.to(dtype).div(1 / scale).float()
    hidden = torch.arange(n, device=logits.device)[None, :] > torch.arange(window, device=logits.device)[:, None] + (
        n - window)
    return torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1).to(dtype).float()


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


@register_scorer("tova")
@dataclass(frozen=True)
class TOVAScorer(Scorer):
    """TOVA (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104): the attention the last prompt
    query pays each position. `mean_over="layer"` (the authors' rule, `tova_cache.py` and kvpress `TOVAPress`):
    averaged over all query heads of the layer, so every cache head ranks the positions alike; `"group"`:
    averaged over the query heads of each KV head only (query granularity: each head's own row)."""

    summary: ClassVar[str] = "TOVA: the last prompt token's attention, averaged over the layer's heads"
    queries: ClassVar[int | None] = 1
    mean_over: str = "layer"

    def __post_init__(self) -> None:
        if self.mean_over not in ("layer", "group"):
            raise HeadscoreError(f"tova: mean_over must be 'layer' or 'group', got {self.mean_over!r}")

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        if inputs.window >= 1:
            last = inputs.window_attention()[..., -1, :]  # [batch, q_heads, n], shared with other scorers
        else:
            if inputs.queries.shape[2] == 0:
                raise HeadscoreError("tova needs the last prompt query; the scorer inputs hold none")
            last = attention_rows(inputs.queries[:, :, -1:], inputs.keys, inputs.scaling,
                                  causal_offset=inputs.length - 1)[..., 0, :]
        if self.mean_over == "layer":
            return last.mean(dim=1, keepdim=True).expand(-1, inputs.heads, -1)
        return group_scores(last, inputs.heads)


@register_scorer("knorm")
@dataclass(frozen=True)
class KnormScorer(Scorer):
    """K-norm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", arXiv
    2406.11430): keys of the smallest L2 norm are kept (score −‖k‖; kvpress `KnormPress`)."""

    summary: ClassVar[str] = "K-norm: keys of the smallest L2 norm first"

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        return expand_heads(-inputs.keys.float().norm(dim=-1), inputs.heads)


@register_scorer("keydiff")
@dataclass(frozen=True)
class KeyDiffScorer(Scorer):
    """KeyDiff (Park et al., arXiv 2504.15364): keys least similar to the layer head's anchor are kept, score
    −cos(k, anchor) with the anchor the mean of the unit-normalized keys (kvpress `KeyDiffPress`, the
    reference). The paper's block-wise iterative eviction is a cache policy, not a score: not here."""

    summary: ClassVar[str] = "KeyDiff: keys least similar (cosine) to the mean key first"

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        keys = inputs.keys.float()
        anchor = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)
        return expand_heads(-F.cosine_similarity(keys, anchor, dim=-1), inputs.heads)


# a query count meaning "every prompt query" (`Scorer.query_count`; a recorder keeps at most the prompt's)
ALL_QUERIES = 1 << 40


def undo_rope(queries: torch.Tensor, rope: Rope, positions: torch.Tensor) -> torch.Tensor:
    """Queries before RoPE: `queries` `[..., q, d]` rotated at `positions` `[q]` (the first `2 · len(inv_freq)`
    dims rotated, the rest passed through, as transformers' partial rotary); a new float32 tensor."""
    half = rope.inv_freq.shape[0]
    angles = positions.to(torch.float32)[:, None] * rope.inv_freq.float().to(queries.device)[None]  # [q, half]
    cos, sin = angles.cos().div_(rope.attention_scaling), angles.sin().div_(rope.attention_scaling)
    source = queries.float()
    first, second = source[..., :half], source[..., half:2 * half]
    plain = torch.empty_like(source)
    # the inverse rotation of each pair (x1, x2): (x1·cos + x2·sin, x2·cos − x1·sin), written in place
    torch.mul(first, cos, out=plain[..., :half]).addcmul_(second, sin)
    torch.mul(second, cos, out=plain[..., half:2 * half]).addcmul_(first, sin, value=-1)
    plain[..., 2 * half:] = source[..., 2 * half:]
    return plain


def mean_rotation(rope: Rope | None, start: int, count: int, dim: int, device: torch.device | str) -> torch.Tensor:
    """RoPE's rotation matrix averaged over positions `start .. start + count − 1` (cos and sin scaled by
    `attention_scaling`, as the model applies them): float32 `[dim, dim]`; the identity without RoPE."""
    matrix = torch.eye(dim, device=device)
    if rope is None:
        return matrix
    rotary = 2 * rope.inv_freq.shape[0]
    positions = torch.arange(start, start + count, device=device, dtype=torch.float32)
    angles = positions[:, None] * rope.inv_freq.float().to(device)[None]
    angles = torch.cat((angles, angles), dim=-1)
    cos = angles.cos().mean(dim=0) * rope.attention_scaling  # [rotary]
    sin = angles.sin().mean(dim=0) * rope.attention_scaling
    half = rotary // 2
    swap = torch.zeros(rotary, rotary, device=device)  # rotate_half as a matrix: (x1, x2) -> (−x2, x1)
    swap[:half, half:] = -torch.eye(half, device=device)
    swap[half:, :half] = torch.eye(half, device=device)
    matrix[:rotary, :rotary] = torch.diag(cos) + sin[:, None] * swap
    return matrix


@register_scorer("expected")
@dataclass(frozen=True)
class ExpectedAttentionScorer(Scorer):
    """Expected Attention (Devoto, Jeblick and Jégou, arXiv 2510.00636; reference: kvpress
    `ExpectedAttentionPress`): the attention future queries are expected to pay each position.

    The prompt's queries (RoPE undone), all but the first `n_sink` positions (the authors' statistics: every
    context query), give a Gaussian of mean μ and covariance Σ per query head; RoPE's rotation averaged over
    the next `n_future_positions` positions, R, moves them to the future: μ' = Rμ, Σ' = RΣRᵀ. A key's expected
    attention logit is then s·μ'·k + s²·kᵀΣ'k / 2 (s the attention scaling, 1/√d: the authors' formula),
    softmaxed over the non-sink positions, averaged over the query heads of each KV head, then `(· + epsilon)`
    times the value's L2 norm. The first `n_sink` positions score above every other (kept).
    `last`: statistics from only the last `last` prompt queries instead (0: every query, the authors').
    """

    summary: ClassVar[str] = "Expected Attention: the attention expected from future queries (Gaussian), × ‖v‖"
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    last: int = 0

    def __post_init__(self) -> None:
        check_integer(self.n_future_positions, "n_future_positions", 1)
        check_integer(self.n_sink, "n_sink", 0)
        check_integer(self.last, "last", 0)
        check_number(self.epsilon, "epsilon")

    def query_count(self, window: int) -> int:
        return ALL_QUERIES if self.last == 0 else max(self.last, window)

    def statistics(self, inputs: ScorerInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Future queries' mean `[batch, q_heads, d]` and covariance `[batch, q_heads, d, d]` (None without
        `use_covariance`), float32."""
        n, captured = inputs.length, inputs.queries.shape[2]
        first = n - captured  # position of the first captured query
        skip = max(0, self.n_sink - first)
        if self.last:
            skip = max(skip, captured - self.last)
        queries = inputs.queries[:, :, skip:]
        if queries.shape[2] == 0:
            raise HeadscoreError(f"expected: no prompt queries past the {self.n_sink} sinks to estimate from")
        positions = torch.arange(first + skip, n, device=queries.device)
        plain = queries.float().clone() if inputs.rope is None else undo_rope(queries, inputs.rope, positions)
        mean = plain.mean(dim=2)
        rotation = mean_rotation(inputs.rope, n, self.n_future_positions, plain.shape[-1], plain.device)
        future_mean = mean @ rotation.T
        if not self.use_covariance:
            return future_mean, None
        centered = plain.sub_(mean[:, :, None])  # our own copy: centered in place
        covariance = centered.transpose(-1, -2) @ centered / plain.shape[2]
        return future_mean, rotation @ covariance @ rotation.T

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        n, sinks = inputs.length, min(self.n_sink, inputs.length)
        mean, covariance = self.statistics(inputs)
        batch, q_heads, dim = mean.shape
        kv_heads = inputs.kv_heads
        scale = dim**-0.5 if inputs.scaling is None else inputs.scaling
        keys = inputs.keys[:, :, sinks:].float()  # [batch, kv_heads, m, d]
        grouped_mean = mean.view(batch, kv_heads, q_heads // kv_heads, dim)
        logits = scale * grouped_mean @ keys.transpose(-1, -2)  # [batch, kv_heads, group, m]
        if covariance is not None:
            grouped_cov = covariance.view(batch, kv_heads, q_heads // kv_heads, dim, dim)
            spread = torch.einsum("bkmi,bkgij,bkmj->bkgm", keys, grouped_cov, keys)
            logits = logits + (scale * scale / 2) * spread
        expected = torch.softmax(logits, dim=-1).view(batch, q_heads, n - sinks)
        expected = group_scores(expected, inputs.heads)
        if self.use_vnorm:
            norms = expand_heads(inputs.values[:, :, sinks:].float().norm(dim=-1), inputs.heads)
            expected = (expected + self.epsilon) * norms
        return keep_first(expected, sinks)


def keep_first(scores: torch.Tensor, sinks: int) -> torch.Tensor:
    """Scores `[batch, heads, n − sinks]` with `sinks` leading positions prepended, each scored one above the
    row's highest score (kept first)."""
    if sinks == 0:
        return scores
    top = scores.amax(dim=(-2, -1), keepdim=True) + 1 if scores.shape[-1] else scores.new_ones(
        scores.shape[0], 1, 1)
    return torch.cat((top.expand(-1, scores.shape[1], sinks), scores), dim=-1)


KVZIP_SINK_SCORE = 2.0  # above any attention weight: KVzip's sinks are kept in every layer (global budgets too)


@register_scorer("kvzip")
@dataclass(frozen=True)
class KVzipScorer(Scorer):
    """KVzip (Kim et al., "Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv
    2505.23416): a position's score is the largest attention any query of a teacher-forced reconstruction of
    the prompt ("Repeat the previous context exactly." then the prompt itself, `compression.kvzip`) pays it
    within its KV head's group. Scores are attention weights in [0, 1], comparable across layers and heads (its
    `global` budget). The first `sinks` positions are kept (kvpress `KVzipPress`'s `n_sink=4`; the authors'
    code keeps the whole system prompt). Query granularity: each query head reads its KV head's scores."""

    summary: ClassVar[str] = "KVzip: the largest attention a reconstruction of the prompt pays each position"
    extra_pass: ClassVar[str | None] = "kvzip"
    comparable: ClassVar[bool] = True
    sinks: int = 4

    def __post_init__(self) -> None:
        check_integer(self.sinks, "sinks", 0)

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        found = inputs.extra.get("kvzip")
        if found is None:
            raise HeadscoreError("kvzip needs its extra pass (compression.kvzip), absent from the scorer inputs")
        if found.shape[-2:] != (inputs.kv_heads, inputs.length):
            raise HeadscoreError(f"the kvzip pass gave scores of shape {tuple(found.shape)} for "
                                 f"{inputs.kv_heads} KV heads × {inputs.length} positions")
        scores = expand_heads(found.float().to(inputs.keys.device), inputs.heads).clone()
        scores[..., : self.sinks] = KVZIP_SINK_SCORE
        return scores


@dataclass(frozen=True)
class CriticalScorer(Scorer):
    """CriticalKV's output-aware weighting (Feng et al., "Identify Critical KV Cache in LLM Inference from an
    Output Perturbation Perspective", arXiv 2502.03805; reference: kvpress `CriticalKVPress.vwl1norm`): the
    `base` scorer's scores plus `critical_epsilon` (kvpress's `epsilon`), times the L1 norm of each value after
    its head's slice of the output projection, ‖W_oʰ v‖₁ (averaged over the query heads of each KV head at KV
    granularity). The authors' two-stage budget split (half the budget by the base scores alone) needs the
    budget, which a scorer does not see: not here. Spelled `SCORER+critical`; needs the module's `o_proj`."""

    summary: ClassVar[str] = "CriticalKV: a scorer's scores × ‖W_o v‖₁, the value's norm after the output projection"
    needs_module: ClassVar[bool] = True
    base: Scorer
    critical_epsilon: float = 1e-4

    def __post_init__(self) -> None:
        if not isinstance(self.base, Scorer) or isinstance(self.base, CriticalScorer):
            raise HeadscoreError(f"critical: the base must be a scorer (not critical itself), got {self.base!r}")
        check_number(self.critical_epsilon, "critical_epsilon")
        # the declarations are the base's (per instance: they depend on it)
        for name, value in (("name", f"{self.base.name}+critical"), ("queries", self.base.queries),
                            ("extra_pass", self.base.extra_pass), ("comparable", self.base.comparable)):
            object.__setattr__(self, name, value)

    def query_count(self, window: int) -> int:
        return self.base.query_count(window)

    def projected_norms(self, inputs: ScorerInputs) -> torch.Tensor:
        """‖W_oʰ v‖₁ of every value for every query head: float32 `[batch, q_heads, n]`."""
        projection = getattr(inputs.module, "o_proj", None)
        if projection is None:
            raise HeadscoreError("the critical modifier needs the layer's attention module with an output "
                                 "projection (o_proj); these scorer inputs have none")
        batch, kv_heads, n, dim = inputs.values.shape
        q_heads = inputs.query_heads
        weight = projection.weight.detach().float().to(inputs.values.device)  # [hidden, q_heads · d]
        per_head = weight.view(weight.shape[0], q_heads, dim).permute(1, 2, 0).contiguous()  # [q_heads, d, hidden]
        values = inputs.values.float()
        norms = values.new_empty(batch, q_heads, n)
        group = q_heads // kv_heads
        # one head and PROJECTION_POSITIONS positions at a time: the head's weights (d × hidden) and the block's
        # projections stay in cache, about one o_proj's time; one batched product over all heads streams every
        # weight from memory per block (2.2× slower on a Llama-3-8B layer). Like the reference, a loop over heads.
        for head in range(q_heads):
            for start in range(0, n, PROJECTION_POSITIONS):
                block = values[:, head // group, start:start + PROJECTION_POSITIONS] @ per_head[head]
                norms[:, head, start:start + PROJECTION_POSITIONS] = block.abs_().sum(dim=-1)
        return norms

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        base = inputs.scores(self.base).float()
        norms = group_scores(self.projected_norms(inputs), inputs.heads)
        return (base + self.critical_epsilon) * norms


MODIFIERS["critical"] = CriticalScorer
PROJECTION_POSITIONS = 256  # positions per block of one head's projected values `[batch, block, hidden]`


def check_number(value: Any, what: str) -> None:
    """A non-negative real parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise HeadscoreError(f"{what} must be a non-negative number, got {value!r}")


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


# the built-in extra passes register themselves on import (after `register_extra_pass` exists: no cycle)
importlib.import_module("headscore.compression.kvzip")
