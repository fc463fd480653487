"""compare: rank statistics, top-k overlap and budget L1 against plain computations; bootstrap determinism."""

from __future__ import annotations

import json
import math

import pytest
import torch

from headscore.compression.allocation import allocate
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry
from headscore.evaluation.compare import (
    bootstrap_stability,
    compare_scores,
    run_bootstrap,
    scores_geometry,
    top_k_overlap,
    trial_counts,
    write_stability,
)
from headscore.scoring.head_scores import HeadScores, write_head_scores

LAYERS, HEADS, KV = 4, 6, 3


def random_scores(seed: int, trials: int = 12, zeros: float = 0.3) -> HeadScores:
    """Per-trial scores with exact zeros (ties in the ranking), as real files have."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(trials, LAYERS, HEADS, generator=generator, dtype=torch.float64)
    values[torch.rand(trials, LAYERS, HEADS, generator=generator) < zeros] = 0.0
    values[:, 0, 0] = 0.0  # one head never scores: ties at zero
    values[:, 1, 1] = 0.0
    return HeadScores.from_tensor(values)


def plain_ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for position in range(i, j + 1):
            ranks[order[position]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def plain_spearman(x: list[float], y: list[float]) -> float:
    rx, ry = plain_ranks(x), plain_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def plain_kendall_b(x: list[float], y: list[float]) -> float:
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx * dy > 0:
                concordant += 1
            else:
                discordant += 1
    return (concordant - discordant) / math.sqrt((concordant + discordant + ties_x) *
                                                 (concordant + discordant + ties_y))


def plain_overlap(a: list[float], b: list[float], k: int) -> float:
    top = lambda v: sorted(range(len(v)), key=lambda i: (-v[i], i))[:k]  # noqa: E731
    return len(set(top(a)) & set(top(b))) / k


def plain_importance(scores: HeadScores) -> list[float]:
    means = [sum(v) / len(v) for row in scores.trials for v in row]
    return [m / sum(means) for m in means]


def test_compare_matches_plain_statistics():
    a, b = random_scores(1), random_scores(2, trials=9)
    geometry = Geometry(layers=LAYERS, query_heads=HEADS, kv_heads=KV, head_dim=0)
    result = compare_scores(a, b, geometry=geometry, budget=24, beta=1.2, window=4, ks=(3, 5, 10, 100))
    ia, ib = plain_importance(a), plain_importance(b)
    assert result.spearman == pytest.approx(plain_spearman(ia, ib), abs=1e-12)
    assert result.kendall == pytest.approx(plain_kendall_b(ia, ib), abs=1e-12)
    assert set(result.overlap) == {3, 5, 10}  # k above the number of heads is left out
    for k, value in result.overlap.items():
        assert value == plain_overlap(ia, ib, k)
    ma = allocate("headkv", geometry, 24, window=4, beta=1.2, scores=a).matrix.tolist()
    mb = allocate("headkv", geometry, 24, window=4, beta=1.2, scores=b).matrix.tolist()
    distance = sum(abs(x - y) for ra, rb in zip(ma, mb, strict=True) for x, y in zip(ra, rb, strict=True))
    assert result.granularity == "kv" and len(ma[0]) == KV
    assert result.budget_l1 == pytest.approx(distance / sum(map(sum, ma)))
    assert (result.trials_a, result.trials_b) == (12, 9)
    same = compare_scores(a, a, geometry=geometry, budget=24, beta=1.2, window=4)
    assert same.spearman == pytest.approx(1.0) and same.budget_l1 == 0.0


def test_top_k_overlap_batched_equals_loop():
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (7, 30), generator=generator).double()  # many ties
    b = torch.randint(0, 5, (30,), generator=generator).double()
    got = top_k_overlap(a, b, 8)
    assert got.tolist() == [plain_overlap(row.tolist(), b.tolist(), 8) for row in a]


def test_geometry_from_keys_and_bad_input(tmp_path, headscore_cli):
    scores = random_scores(0)
    assert scores_geometry(scores).kv_heads == HEADS
    assert scores_geometry(scores, kv_heads=2).kv_heads == 2
    with pytest.raises(HeadscoreError, match="do not split evenly"):
        scores_geometry(scores, kv_heads=4)
    other = HeadScores.from_tensor(torch.rand(3, LAYERS + 1, HEADS, dtype=torch.float64))
    with pytest.raises(HeadscoreError, match="compare needs one geometry"):
        compare_scores(scores, other, geometry=scores_geometry(scores))
    path_a, path_b = tmp_path / "a.json", tmp_path / "b.json"
    write_head_scores(path_a, scores)
    write_head_scores(path_b, other)
    run = headscore_cli("compare", path_a, path_b)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "one geometry" in run.stderr


def test_bootstrap_equals_plain_resampling_and_is_deterministic(tmp_path):
    scores = random_scores(4, trials=23, zeros=0.1)
    geometry = Geometry(layers=LAYERS, query_heads=HEADS, kv_heads=KV, head_dim=0)
    settings = {"geometry": geometry, "draws": 30, "seed": 5, "k": 6, "budget": 20, "beta": 1.1, "window": 4}
    result = bootstrap_stability(scores, **settings)
    assert [row["trials"] for row in result.rows] == trial_counts(23) == [5, 10, 20, 23]
    assert bootstrap_stability(scores, **settings).rows == result.rows
    assert bootstrap_stability(scores, **{**settings, "seed": 6}).rows != result.rows
    # one n by a plain loop over draws: the same picks, a HeadScores per draw, plain overlap and L1
    full = plain_importance(scores)
    full_matrix = allocate("headkv", geometry, 20, window=4, beta=1.1, scores=scores).matrix
    per_trial = scores.to_tensor()
    n = 10
    picks = torch.randint(23, (30, n), generator=torch.Generator().manual_seed(5 * 1_000_003 + n))
    overlaps, distances = [], []
    for draw in picks:
        drawn = HeadScores.from_tensor(per_trial[draw])
        overlaps.append(plain_overlap(plain_importance(drawn), full, 6))
        matrix = allocate("headkv", geometry, 20, window=4, beta=1.1, scores=drawn).matrix
        distances.append(float((matrix - full_matrix).abs().sum() / full_matrix.sum()))
    row = result.rows[1]
    assert row["overlap_mean"] == pytest.approx(sum(overlaps) / 30)
    assert row["l1_mean"] == pytest.approx(sum(distances) / 30)
    assert row["share_stable"] == pytest.approx(sum(o >= 0.9 for o in overlaps) / 30)
    stable = [r["trials"] for r in result.rows if r["share_stable"] >= 0.95]
    assert result.stable_at == (stable[0] if stable else None)
    files = write_stability(result, tmp_path / "stability")
    assert all(f.is_file() for f in files)
    assert json.loads(files[0].read_text())["rows"] == result.rows


def test_bootstrap_of_identical_trials_is_stable_at_once(tmp_path):
    one = torch.rand(LAYERS, HEADS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scores = HeadScores.from_tensor(one.expand(8, -1, -1).clone())
    result = bootstrap_stability(scores, geometry=scores_geometry(scores), draws=10, k=5, budget=16, window=4)
    assert all(r["overlap_mean"] == 1.0 and r["l1_mean"] == 0.0 for r in result.rows)
    assert result.stable_at == 5
    uneven = HeadScores(layers=1, heads=2, trials=[[[1.0, 2.0], [1.0]]])
    path = tmp_path / "uneven.json"
    write_head_scores(path, uneven)
    with pytest.raises(HeadscoreError, match="different numbers of trials"):
        run_bootstrap(path)


def test_compare_cli_json_and_plots(tmp_path, headscore_cli):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_head_scores(a, random_scores(1))
    write_head_scores(b, random_scores(2))
    run = headscore_cli("compare", a, b, "--json", "--budgets", "24", "--betas", "1.2", "--window", "4", "--kv-heads",
                        "3", "--plot", tmp_path / "scatter.png")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    geometry = Geometry(layers=LAYERS, query_heads=HEADS, kv_heads=KV, head_dim=0)
    direct = compare_scores(random_scores(1), random_scores(2), geometry=geometry, budget=24, beta=1.2, window=4)
    assert data["spearman"] == pytest.approx(direct.spearman) and data["budget_l1"] == pytest.approx(direct.budget_l1)
    assert (tmp_path / "scatter.png").is_file()
    run = headscore_cli("compare", a, "--bootstrap", "--draws", "20", "--k", "5", "--budgets", "16", "--window",
                        "4", "--plot", tmp_path / "stab.png")
    assert run.returncode == 0, run.stderr
    assert "stable" in run.stdout and (tmp_path / "stab.png").is_file()
    run = headscore_cli("compare", a, "--plot", "x.txt")
    assert run.returncode == 2 and "two head-score files" in run.stderr
