"""Every scorer against a plain re-implementation of its paper's definition (loops over heads and positions,
float64), at KV and query granularity, on random tensors; a scorer written here registers and scores through the
same `ScorerInputs` path."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from headscore.compression import scorers
from headscore.compression.scorers import (
    ALL_QUERIES,
    MODIFIERS,
    SCORERS,
    CriticalScorer,
    Rope,
    Scorer,
    ScorerInputs,
    register_scorer,
)
from headscore.core.errors import HeadscoreError

BATCH, Q_HEADS, KV_HEADS, DIM, N, WINDOW = 2, 6, 2, 8, 40, 4
GROUP = Q_HEADS // KV_HEADS
GRANULARITIES = (KV_HEADS, Q_HEADS)


def rotate(x: torch.Tensor, position: float, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """RoPE by hand on one vector `[d]`: pair (i, i + r/2) of the first r = 2·len(inv_freq) dims turned by
    position · inv_freq[i], then × scaling; the rest unchanged."""
    half = inv_freq.shape[0]
    out = x.clone()
    for i in range(half):
        c, s = math.cos(position * float(inv_freq[i])), math.sin(position * float(inv_freq[i]))
        out[i] = (x[i] * c - x[i + half] * s) * scaling
        out[i + half] = (x[i + half] * c + x[i] * s) * scaling
    return out


def rotation_matrix(position: float, inv_freq: torch.Tensor, scaling: float, dim: int) -> torch.Tensor:
    return torch.stack([rotate(column, position, inv_freq, scaling) for column in torch.eye(dim, dtype=torch.float64)],
                       dim=1)


def make_inputs(heads: int, *, seed: int = 0, rope: Rope | None = None, window: int = WINDOW,
                queries: int = N, module=None) -> tuple[ScorerInputs, torch.Tensor]:
    """Random inputs (float32) and the queries before RoPE `[batch, q_heads, queries, d]` (float64)."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(BATCH, KV_HEADS, N, DIM, generator=generator)
    values = torch.randn(BATCH, KV_HEADS, N, DIM, generator=generator)
    plain = torch.randn(BATCH, Q_HEADS, queries, DIM, generator=generator, dtype=torch.float64) + 0.5
    rotated = plain.clone()
    if rope is not None:
        for b in range(BATCH):
            for h in range(Q_HEADS):
                for i in range(queries):
                    rotated[b, h, i] = rotate(plain[b, h, i], N - queries + i, rope.inv_freq.double(),
                                              rope.attention_scaling)
    inputs = ScorerInputs(keys=keys, values=values, queries=rotated.float(), window=window, heads=heads,
                          rope=rope, module=module)
    return inputs, plain


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    return [w / sum(weights) for w in weights]


def kv_of(head: int, heads: int) -> int:
    """The KV head a score head reads (itself at KV granularity)."""
    return head if heads == KV_HEADS else head // GROUP


def members(head: int, heads: int) -> list[int]:
    """The query heads a score head stands for."""
    return list(range(head * GROUP, (head + 1) * GROUP)) if heads == KV_HEADS else [head]


def last_attention(inputs: ScorerInputs) -> torch.Tensor:
    """The last query's softmax row per query head, by hand: float64 `[batch, q_heads, n]`."""
    keys, query = inputs.keys.double(), inputs.queries[:, :, -1].double()
    rows = torch.zeros(BATCH, Q_HEADS, N, dtype=torch.float64)
    for b in range(BATCH):
        for h in range(Q_HEADS):
            logits = [float(query[b, h] @ keys[b, h // GROUP, j]) / math.sqrt(DIM) for j in range(N)]
            rows[b, h] = torch.tensor(softmax(logits), dtype=torch.float64)
    return rows


@pytest.mark.parametrize("heads", GRANULARITIES)
@pytest.mark.parametrize("mean_over", ["layer", "group"])
def test_tova(heads, mean_over):
    inputs, _ = make_inputs(heads)
    rows = last_attention(inputs)
    found = SCORERS["tova"](mean_over=mean_over).score(inputs)
    assert found.shape == (BATCH, heads, N)
    for b in range(BATCH):
        for head in range(heads):
            chosen = range(Q_HEADS) if mean_over == "layer" else members(head, heads)
            want = sum(rows[b, h] for h in chosen) / len(chosen)
            torch.testing.assert_close(found[b, head].double(), want, rtol=1e-5, atol=1e-7)
    # the window's attention is shared: computed once for SnapKV, read by TOVA; without a window, recomputed
    inputs.scores(SCORERS["snapkv"]())
    shared = inputs._window_attention
    assert torch.equal(inputs.scores(SCORERS["tova"](mean_over=mean_over)), found)
    assert inputs._window_attention is shared
    bare = ScorerInputs(keys=inputs.keys, values=inputs.values, queries=inputs.queries[:, :, -1:], window=0,
                        heads=heads)
    torch.testing.assert_close(SCORERS["tova"](mean_over=mean_over).score(bare), found, rtol=1e-5, atol=1e-7)
    assert SCORERS["tova"]().query_count(0) == 1


@pytest.mark.parametrize("heads", GRANULARITIES)
def test_knorm_and_keydiff(heads):
    inputs, _ = make_inputs(heads)
    keys = inputs.keys.double()
    knorm, keydiff = SCORERS["knorm"]().score(inputs), SCORERS["keydiff"]().score(inputs)
    assert knorm.shape == keydiff.shape == (BATCH, heads, N)
    for b in range(BATCH):
        for head in range(heads):
            kv = kv_of(head, heads)
            anchor = sum(keys[b, kv, j] / keys[b, kv, j].norm() for j in range(N)) / N
            for j in range(N):
                key = keys[b, kv, j]
                assert float(knorm[b, head, j]) == pytest.approx(-math.sqrt(float((key * key).sum())), rel=1e-6)
                cosine = float(key @ anchor) / (float(key.norm()) * float(anchor.norm()))
                assert float(keydiff[b, head, j]) == pytest.approx(-cosine, abs=1e-6)


def expected_reference(inputs: ScorerInputs, plain: torch.Tensor, heads: int, *, n_future: int = 512,
                       n_sink: int = 4, covariance: bool = True, vnorm: bool = True, epsilon: float = 0.0,
                       last: int = 0) -> torch.Tensor:
    """Expected Attention by its definition, float64: Gaussian statistics of the pre-RoPE queries (positions ≥
    n_sink), moved by the mean rotation of the next n_future positions, exp(μ·k/√d + kᵀΣk/2d) normalized
    over the non-sink keys, group mean, × ‖v‖, sinks above all."""
    rope = inputs.rope
    captured = plain.shape[2]
    first = N - captured
    use = [i for i in range(captured) if first + i >= n_sink and (last == 0 or i >= captured - last)]
    if rope is None:
        rotation = torch.eye(DIM, dtype=torch.float64)
    else:
        rotation = sum(rotation_matrix(N + t, rope.inv_freq.double(), rope.attention_scaling, DIM)
                       for t in range(n_future)) / n_future
    keys, values = inputs.keys.double(), inputs.values.double()
    out = torch.zeros(BATCH, heads, N, dtype=torch.float64)
    for b in range(BATCH):
        per_head = []
        for h in range(Q_HEADS):
            samples = plain[b, h, use]  # [m, d]
            mean = samples.mean(dim=0)
            cov = sum(torch.outer(x - mean, x - mean) for x in samples) / len(use)
            mean, cov = rotation @ mean, rotation @ cov @ rotation.T
            logits = []
            for j in range(n_sink, N):
                key = keys[b, h // GROUP, j]
                logit = float(mean @ key) / math.sqrt(DIM)
                if covariance:
                    logit += float(key @ cov @ key) / (2 * DIM)
                logits.append(logit)
            per_head.append(softmax(logits))
        for head in range(heads):
            for j in range(n_sink, N):
                score = sum(per_head[h][j - n_sink] for h in members(head, heads)) / len(members(head, heads))
                if vnorm:
                    score = (score + epsilon) * float(values[b, kv_of(head, heads), j].norm())
                out[b, head, j] = score
        out[b, :, :n_sink] = out[b, :, n_sink:].max() + 1
    return out


ROPES = {"none": None, "rope": Rope(1.0 / 10000 ** (torch.arange(0, DIM, 2) / DIM)),
         "scaled-partial": Rope(1.0 / 100 ** (torch.arange(0, DIM // 2, 2) / (DIM // 2)), attention_scaling=1.3)}


@pytest.mark.parametrize("heads", GRANULARITIES)
@pytest.mark.parametrize("rope", ROPES, ids=list(ROPES))
def test_expected_attention(heads, rope):
    inputs, plain = make_inputs(heads, rope=ROPES[rope])
    scorer = SCORERS["expected"]()
    assert scorer.query_count(WINDOW) == ALL_QUERIES  # every prompt query, the authors' statistics
    found = scorer.score(inputs)
    want = expected_reference(inputs, plain, heads)
    assert found.shape == (BATCH, heads, N) and found.dtype == torch.float32
    torch.testing.assert_close(found.double(), want, rtol=2e-4, atol=1e-6)
    assert torch.equal(found, scorer.score(inputs))  # deterministic


@pytest.mark.parametrize("options", [dict(use_covariance=False, epsilon=0.01, n_sink=0, n_future_positions=3),
                                     dict(use_vnorm=False, last=10, n_sink=2)])
def test_expected_attention_options(options):
    inputs, plain = make_inputs(KV_HEADS, rope=ROPES["rope"], queries=12)  # only the last 12 queries held
    names = {"use_covariance": "covariance", "use_vnorm": "vnorm", "n_future_positions": "n_future"}
    found = SCORERS["expected"](**options).score(inputs)
    want = expected_reference(inputs, plain, KV_HEADS, **{names.get(k, k): v for k, v in options.items()})
    torch.testing.assert_close(found.double(), want, rtol=2e-4, atol=1e-6)


class Projection(torch.nn.Module):
    """An attention module with only an output projection (what the critical modifier reads)."""

    def __init__(self, hidden: int = 5) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.o_proj = torch.nn.Linear(Q_HEADS * DIM, hidden, bias=False)


@pytest.mark.parametrize("heads", GRANULARITIES)
@pytest.mark.parametrize("base", ["snapkv", "knorm", "expected"])
def test_critical(heads, base, monkeypatch):
    module = Projection()
    inputs, _ = make_inputs(heads, module=module)
    base_scorer = SCORERS[base]()
    scorer = MODIFIERS["critical"](base=base_scorer)
    assert scorer.name == f"{base}+critical" and scorer.needs_module
    assert scorer.query_count(WINDOW) == base_scorer.query_count(WINDOW)
    assert (scorer.extra_pass, scorer.comparable) == (base_scorer.extra_pass, base_scorer.comparable)
    monkeypatch.setattr(scorers, "PROJECTION_POSITIONS", 7)  # several blocks of positions
    found = inputs.scores(scorer)
    base_scores = inputs.scores(base_scorer).double()  # shared, computed once
    weight = module.o_proj.weight.detach().double()
    values = inputs.values.double()
    for b in range(BATCH):
        for head in range(heads):
            for j in range(N):
                norms = [float((weight[:, h * DIM:(h + 1) * DIM] @ values[b, h // GROUP, j]).abs().sum())
                         for h in members(head, heads)]
                want = (float(base_scores[b, head, j]) + 1e-4) * sum(norms) / len(norms)
                assert float(found[b, head, j]) == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_critical_declarations_follow_the_base():
    critical = CriticalScorer(base=SCORERS["kvzip"]())
    assert (critical.name, critical.extra_pass, critical.comparable) == ("kvzip+critical", "kvzip", True)
    assert CriticalScorer(base=SCORERS["snapkv"]()) == CriticalScorer(base=SCORERS["snapkv"]())
    inputs, _ = make_inputs(KV_HEADS)
    with pytest.raises(HeadscoreError, match="o_proj"):
        CriticalScorer(base=SCORERS["knorm"]()).score(inputs)
    with pytest.raises(HeadscoreError, match="base"):
        CriticalScorer(base=critical)


@pytest.mark.parametrize("name, options, match", [
    ("tova", dict(mean_over="heads"), "mean_over"),
    ("expected", dict(n_future_positions=0), "n_future_positions"),
    ("expected", dict(epsilon=-1.0), "epsilon"),
    ("expected", dict(n_sink=-1), "n_sink"),
    ("kvzip", dict(sinks=1.5), "sinks"),
])
def test_bad_parameters(name, options, match):
    with pytest.raises(HeadscoreError, match=match):
        SCORERS[name](**options)


def test_every_scorer_has_a_summary_and_documented_defaults():
    for name in ("tova", "knorm", "keydiff", "expected", "kvzip"):
        cls = SCORERS[name]
        assert cls.name == name and cls.summary and "arXiv" in (cls.__doc__ or "")
    assert SCORERS["kvzip"].extra_pass in scorers.EXTRA_PASSES  # registered by importing the scorers
    assert SCORERS["expected"]() == SCORERS["expected"](n_future_positions=512, n_sink=4, use_covariance=True,
                                                        use_vnorm=True, epsilon=0.0)


def test_a_scorer_defined_here_registers_and_scores(monkeypatch):
    """Keys' negative distance to the window's mean query: written here, used through the registry."""
    monkeypatch.setattr(scorers, "SCORERS", dict(SCORERS))  # registered for this test only

    @register_scorer("near-query")
    @dataclass(frozen=True)
    class NearQuery(Scorer):
        summary: ClassVar[str] = "keys nearest the window's mean query"
        power: float = 2.0

        def score(self, inputs: ScorerInputs) -> torch.Tensor:
            mean = inputs.queries[:, :, -inputs.window:].float().mean(dim=2)  # [batch, q_heads, d]
            keys = inputs.keys.float().repeat_interleave(inputs.query_heads // inputs.kv_heads, dim=1)
            distance = (keys - mean[:, :, None]).norm(dim=-1) ** self.power
            return scorers.group_scores(-distance, inputs.heads)

    assert scorers.SCORERS["near-query"] is NearQuery and "near-query" not in SCORERS
    for heads in GRANULARITIES:
        inputs, _ = make_inputs(heads)
        found = inputs.scores(scorers.SCORERS["near-query"](power=1.0))
        assert found is inputs.scores(NearQuery(power=1.0))  # computed once per equal scorer
        for b in range(BATCH):
            for head in range(heads):
                for j in range(N):
                    distances = []
                    for h in members(head, heads):
                        mean = inputs.queries[b, h, -WINDOW:].double().mean(dim=0)
                        distances.append(float((inputs.keys[b, h // GROUP, j].double() - mean).norm()))
                    assert float(found[b, head, j]) == pytest.approx(-sum(distances) / len(distances), rel=1e-5)
