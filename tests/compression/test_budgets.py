"""Budgets: the HeadKV rule against a plain re-computation on the official score files, GQA grouping,
the baselines, the budgets file, and bad input (library and CLI)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from headscore.cli.geometry import resolve_geometry
from headscore.compression.allocation import (
    HeadKVAllocation,
    PyramidAllocation,
    UniformAllocation,
    allocate,
    allocate_sweep,
    head_importance,
)
from headscore.compression.budget_summary import summarize
from headscore.compression.budgets import Budgets
from headscore.compression.budgets_file import read_budget_sweep, read_budgets, write_allocations, write_budgets
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry
from headscore.scoring.head_scores import HeadScores, read_head_scores, write_head_scores

OFFICIAL = [f"{model}_{kind}_heads.json" for model in ("Meta-Llama-3-8B-Instruct", "Mistral-7B-Instruct-v0.2")
            for kind in ("retrieval", "retrieval_reasoning")]
LLAMA = Geometry(layers=32, query_heads=32, kv_heads=8, head_dim=128)
SMOL = Geometry(layers=30, query_heads=9, kv_heads=3, head_dim=64)


def reference_budgets(raw: dict, layers: int, heads: int, kv_heads: int, budget: int, window: int,
                      beta: float, temp: float, granularity: str) -> list[list[int]]:
    """The rule of issue 4, written as plain loops over the raw JSON."""
    means = [[0.0] * heads for _ in range(layers)]
    for layer in range(layers):
        for head in range(heads):
            values = raw[f"{layer}-{head}"]
            means[layer][head] = sum(values) / len(values) if values else 0.0
    total = sum(sum(row) for row in means)
    powered = [[(m / total) ** temp for m in row] for row in means]
    norm = sum(sum(row) for row in powered)
    score = [[p / norm for p in row] for row in powered]
    if granularity == "kv":
        group = heads // kv_heads
        score = [[sum(row[k * group + g] for g in range(group)) for k in range(kv_heads)] for row in score]
    n_heads = len(score[0])
    inner = budget - window
    pool = math.floor(inner / beta) * layers * n_heads
    floor = inner - math.floor(inner / beta)
    return [[round(s * pool + floor) for s in row] for row in score]


@pytest.mark.parametrize("name", OFFICIAL)
def test_headkv_rule_on_official_files(data_dir, name):
    """On the authors' four score files (reduced to per-head means, tests/data/headkv: allocation depends on
    nothing else) the rule equals a plain re-computation."""
    path = data_dir / "headkv" / name
    raw = json.loads(path.read_text())
    scores = read_head_scores(path, 32, 32)
    for budget, beta, granularity in [(128, 1.01, "query"), (128, 1.01, "kv"), (256, 1.005, "kv"),
                                      (512, 1.2, "query"), (1024, 2.0, "kv"), (64, 1.5, "query")]:
        result = allocate("headkv", LLAMA, budget, beta=beta, granularity=granularity, scores=scores)
        expected = reference_budgets(raw, 32, 32, 8, budget, 8, beta, 1.0, granularity)
        assert result.matrix.dtype == torch.int64
        assert result.matrix.tolist() == expected, (budget, beta, granularity)
        heads = 8 if granularity == "kv" else 32
        n = 32 * heads
        # every head rounds once: the sum is (B − w) per head within half an entry per head
        assert abs(int(result.matrix.sum()) - (budget - 8) * n) <= n / 2
        assert result.total_entries == int(result.matrix.sum()) + 8 * n
        assert abs(result.total_entries - result.uniform_entries) <= n / 2
        assert int(result.matrix.min()) >= (budget - 8) - math.floor((budget - 8) / beta)


def test_temp_sharpens_and_matches_reference(data_dir):
    path = data_dir / "headkv" / OFFICIAL[1]
    raw = json.loads(path.read_text())
    scores = read_head_scores(path)
    flat = allocate("headkv", LLAMA, 256, beta=1.01, temp=1.0, scores=scores, granularity="query")
    sharp = allocate("headkv", LLAMA, 256, beta=1.01, temp=2.0, scores=scores, granularity="query")
    assert sharp.matrix.tolist() == reference_budgets(raw, 32, 32, 8, 256, 8, 1.01, 2.0, "query")
    assert sharp.matrix.max() > flat.matrix.max()


def test_larger_beta_means_smaller_pool(data_dir):
    scores = read_head_scores(data_dir / "headkv" / OFFICIAL[0])
    small_beta = allocate("headkv", LLAMA, 128, beta=1.01, scores=scores)
    large_beta = allocate("headkv", LLAMA, 128, beta=4.0, scores=scores)
    assert large_beta.pool_entries < small_beta.pool_entries
    assert large_beta.floor_entries > small_beta.floor_entries
    assert large_beta.matrix.max() < small_beta.matrix.max()


def test_fixtures_describe_the_official_files(data_dir):
    """The committed fixtures hold what tests/data/README.md says: 32 × 32 heads, one mean per head; the
    summary records the full files' trials per head, zeros and largest per-trial value (r2: at most 10 / N,
    below 0.5 for answers of 20+ tokens)."""
    summary = json.loads((data_dir / "headkv" / "summary.json").read_text())
    assert sorted(summary) == sorted(OFFICIAL)
    for name in OFFICIAL:
        scores = read_head_scores(data_dir / "headkv" / name)
        facts = summary[name]
        assert (scores.layers, scores.heads) == (facts["layers"], facts["heads"]) == (32, 32)
        assert scores.num_trials == 1 and len(facts["trials_per_head"]) == 1
        assert 0 < facts["zeros"] < 32 * 32 * facts["trials_per_head"][0]
        assert float(scores.mean().max()) <= facts["max"]
        if "reasoning" in name:
            assert facts["max"] < 0.5
    assert summary[OFFICIAL[1]]["trials_per_head"] == [74]  # the count DESIGN.md quotes for Llama-3 r2


@pytest.mark.parametrize("name", OFFICIAL)
def test_fixtures_equal_the_full_files(data_dir, reference_dir, name):
    """Extra, where the authors' full files exist: the fixture is their per-head mean, so every budget is the
    same, and the summary matches the file."""
    import hashlib

    full_path = reference_dir / "headkv" / name
    full, reduced = read_head_scores(full_path), read_head_scores(data_dir / "headkv" / name)
    assert torch.equal(full.mean(), reduced.mean())
    for granularity in ("query", "kv"):
        assert torch.equal(allocate("headkv", LLAMA, 256, beta=1.01, granularity=granularity, scores=full).matrix,
                           allocate("headkv", LLAMA, 256, beta=1.01, granularity=granularity,
                                    scores=reduced).matrix)
    facts = json.loads((data_dir / "headkv" / "summary.json").read_text())[name]
    raw = json.loads(full_path.read_text())
    assert facts["sha256"] == hashlib.sha256(full_path.read_bytes()).hexdigest()
    assert facts["zeros"] == sum(v == 0 for values in raw.values() for v in values)
    assert facts["trials_per_head"] == sorted({len(values) for values in raw.values()})


@pytest.fixture
def sparse_scores(random_scores):
    """Factory: float64 head scores of 5 trials, zero below 0.6 (sparse, like real retrieval scores)."""

    def make(layers: int, heads: int, seed: int = 0):
        return random_scores(layers, heads, trials=5, seed=seed, dtype=torch.float64, zero_below=0.6)

    return make


def test_kv_granularity_on_smollm2_geometry(sparse_scores):
    scores = sparse_scores(30, 9)
    scores.trials[4][5] = []  # a head with no counted trial scores 0
    result = allocate("headkv", SMOL, 128, beta=1.01, scores=scores)
    assert result.granularity == "kv" and tuple(result.matrix.shape) == (30, 3)
    raw = {f"{layer}-{head}": scores.trials[layer][head] for layer in range(30) for head in range(9)}
    assert result.matrix.tolist() == reference_budgets(raw, 30, 9, 3, 128, 8, 1.01, 1.0, "kv")
    assert abs(int(result.matrix.sum()) - 120 * 90) <= 45
    query = allocate("headkv", SMOL, 128, beta=1.01, scores=scores, granularity="query")
    assert tuple(query.matrix.shape) == (30, 9)
    assert query.total_entries == pytest.approx(3 * result.total_entries, abs=30 * 9)
    # the KV-head importance is the sum over its group of three query heads
    query_importance = head_importance(scores, SMOL, "query")
    assert torch.allclose(head_importance(scores, SMOL, "kv")[:, 1], query_importance[:, 3:6].sum(-1))
    assert summarize(result)["query_head_entries"] == 128 * 30 * 9


def test_uniform_and_pyramid():
    uniform = allocate("uniform", SMOL, 128)
    assert uniform.matrix.unique().tolist() == [120] and uniform.total_entries == 128 * 90
    assert uniform.beta is None and uniform.pyramid_beta is None
    for layers, budget, pb in [(30, 128, 20), (32, 256, 20), (7, 100, 3.5), (1, 64, 20)]:
        geometry = Geometry(layers=layers, query_heads=4, kv_heads=2, head_dim=8)
        pyramid = PyramidAllocation(pyramid_beta=pb).allocate(geometry, budget, 8, "kv", None)
        per_layer = pyramid.matrix[:, 0].tolist()
        inner = budget - 8
        assert (pyramid.matrix == pyramid.matrix[:, :1]).all()
        assert int(pyramid.matrix.sum()) == inner * layers * 2  # same total as uniform, exactly
        if layers > 1:
            low = math.floor(inner / pb)
            assert per_layer[-1] == low and per_layer[0] == 2 * inner - low
            assert all(a >= b for a, b in zip(per_layer, per_layer[1:], strict=False))
            step = (2 * inner - 2 * low) / (layers - 1)
            assert all(abs(v - (2 * inner - low - i * step)) <= 0.5 for i, v in enumerate(per_layer))


def test_builders_are_the_convenience_function(sparse_scores):
    scores = sparse_scores(30, 9, seed=3)
    direct = HeadKVAllocation(beta=1.2, temp=1.5).allocate(SMOL, 200, 16, "query", scores)
    via = allocate("headkv", SMOL, 200, window=16, beta=1.2, temp=1.5, granularity="query", scores=scores)
    assert torch.equal(direct.matrix, via.matrix)
    assert torch.equal(UniformAllocation().allocate(SMOL, 64, 8, "query", None).matrix,
                       allocate("uniform", SMOL, 64, granularity="query").matrix)
    mha = Geometry(layers=2, query_heads=4, kv_heads=4, head_dim=8)
    assert allocate("uniform", mha, 64).granularity == "query"


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 1.0}, "beta must be"), ({"beta": 0.5}, "beta must be"),
    ({"beta": float("nan")}, "beta must be"),
    ({"budget": 8}, "must exceed the observation window"), ({"budget": 4}, "must exceed"),
    ({"temp": 0.0}, "temp must be"), ({"granularity": "layer"}, "unknown granularity"),
    ({"scores": None}, "needs head scores"), ({"method": "snapkv"}, "unknown allocation method"),
    ({"scores": "wrong-grid"}, "query heads, but the model has"),
])
def test_bad_input_raises(kwargs, message, sparse_scores):
    args = {"method": "headkv", "budget": 128, "scores": sparse_scores(30, 9)}
    args.update(kwargs)
    if args["scores"] == "wrong-grid":
        args["scores"] = sparse_scores(30, 8)
    method, budget = args.pop("method"), args.pop("budget")
    with pytest.raises(HeadscoreError, match=message):
        allocate(method, SMOL, budget, **args)


def test_all_zero_scores_raise():
    with pytest.raises(HeadscoreError, match="all zero"):
        allocate("headkv", SMOL, 128, scores=HeadScores(30, 9))


def test_write_read_roundtrip_and_determinism(tmp_path, sparse_scores):
    scores = sparse_scores(30, 9)
    budgets = allocate("headkv", SMOL, 128, scores=scores)
    write_budgets(tmp_path / "a.json", budgets)
    write_budgets(tmp_path / "b.json", budgets)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    back = read_budgets(tmp_path / "a.json", SMOL)
    assert isinstance(back, Budgets)
    assert torch.equal(back.matrix, budgets.matrix) and back.matrix.dtype == torch.int64
    assert (back.method, back.budget, back.window, back.beta, back.temp, back.granularity) == \
        ("headkv", 128, 8, 1.01, 1.0, "kv")
    assert back.source_scores == scores.fingerprint and back.total_entries == budgets.total_entries
    payload = json.loads((tmp_path / "a.json").read_text())
    assert payload["total_entries"] == budgets.total_entries and payload["shape"] == [30, 3]
    assert payload["geometry"]["kv_heads"] == 3 and "versions" in payload
    other = Geometry(layers=30, query_heads=9, kv_heads=9, head_dim=64)
    with pytest.raises(HeadscoreError, match="but the model has 30 layers × 9 query heads / 9 KV heads"):
        read_budgets(tmp_path / "a.json", other)


def test_sweep_file_and_selector(tmp_path, sparse_scores):
    scores = sparse_scores(30, 9)
    sweep = allocate_sweep("headkv", SMOL, [128, 256], [1.01, 1.5, 1.01], scores=scores)
    assert [(b.budget, b.beta) for b in sweep] == [(128, 1.01), (128, 1.5), (256, 1.01), (256, 1.5)]
    write_budgets(tmp_path / "sweep.json", sweep)
    assert len(read_budget_sweep(tmp_path / "sweep.json", SMOL)) == 4
    chosen = read_budgets(tmp_path / "sweep.json", budget=256, beta=1.5)
    assert torch.equal(chosen.matrix, sweep[3].matrix)
    with pytest.raises(HeadscoreError, match="2 entries match budget=128"):
        read_budgets(tmp_path / "sweep.json", budget=128)
    assert len(allocate_sweep("uniform", SMOL, [64, 128], [1.01, 2.0])) == 2  # β does not vary baselines


def test_write_allocations_files_and_figures(tmp_path, sparse_scores):
    sweep = allocate_sweep("headkv", SMOL, [64, 128], [1.01, 2.0], scores=sparse_scores(30, 9))
    written = write_allocations(sweep, tmp_path / "one" / "budgets.json", plot=tmp_path / "one" / "b.png")
    assert written == [tmp_path / "one" / "budgets.json"]
    assert [b.beta for b in read_budget_sweep(written[0])] == [1.01, 2.0, 1.01, 2.0]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(
        ["budgets.json", "b_B64_beta1.01.png", "b_B64_beta2.png", "b_B128_beta1.01.png", "b_B128_beta2.png"])
    written = write_allocations(sweep, tmp_path / "split" / "budgets.json", split=True)
    assert [p.name for p in written] == ["budgets_B64_beta1.01.json", "budgets_B64_beta2.json",
                                         "budgets_B128_beta1.01.json", "budgets_B128_beta2.json"]
    assert torch.equal(read_budgets(written[3]).matrix, sweep[3].matrix)
    single = write_allocations(sweep[:1], tmp_path / "single.json", plot=tmp_path / "single.png")
    assert single == [tmp_path / "single.json"] and (tmp_path / "single.png").is_file()
    assert read_budgets(single[0]).budget == 64
    tagged = write_allocations(sweep[:1], tmp_path / "tagged.json", split=True, plot=tmp_path / "tagged.png")
    assert tagged == [tmp_path / "tagged_B64_beta1.01.json"] and (tmp_path / "tagged_B64_beta1.01.png").is_file()


@pytest.mark.parametrize("edit, message", [
    (lambda p: {**p, "matrix": p["matrix"][:-1]}, "matrix is not 30 layers × 3 heads"),
    (lambda p: {**p, "format": "x"}, "not a headscore budgets object"),
    (lambda p: {**p, "matrix": [[-1] * 3] * 30}, "non-negative integer"),
    (lambda p: {**p, "budget": "128"}, "field 'budget'"),
    (lambda p: {k: v for k, v in p.items() if k != "geometry"}, "missing or malformed"),
])
def test_read_rejects_malformed(tmp_path, edit, message):
    write_budgets(tmp_path / "ok.json", allocate("uniform", SMOL, 128))
    payload = json.loads((tmp_path / "ok.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps(edit(payload)))
    with pytest.raises(HeadscoreError, match=message):
        read_budgets(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(HeadscoreError, match="is empty"):
        read_budgets(tmp_path / "empty.json")


def test_geometry_resolution(tmp_path, sparse_scores):
    scores_path = tmp_path / "head_scores.json"
    write_head_scores(scores_path, sparse_scores(4, 6))
    (tmp_path / "metadata.json").write_text(json.dumps({"geometry": {"layers": 4, "query_heads": 6,
                                                                    "kv_heads": 2, "head_dim": 16}}))
    geometry, origin = resolve_geometry(scores_path=scores_path)
    assert (geometry.layers, geometry.query_heads, geometry.kv_heads) == (4, 6, 2)
    assert "metadata.json" in origin
    stated, origin = resolve_geometry(layers=32, heads=32, kv_heads=8, scores_path=scores_path)
    assert (stated.layers, stated.kv_heads, origin) == (32, 8, "stated")
    with pytest.raises(HeadscoreError, match="both --layers and --heads"):
        resolve_geometry(layers=32)
    with pytest.raises(HeadscoreError, match="not both"):
        resolve_geometry(model="smollm2-135m", layers=32, heads=32)
    with pytest.raises(HeadscoreError, match="do not split evenly"):
        resolve_geometry(layers=2, heads=9, kv_heads=2)


@pytest.fixture
def run_cli(headscore_cli):
    """`headscore allocate ARGS...` in this process, 200 columns wide."""
    return lambda *args: headscore_cli("allocate", *args, env={"COLUMNS": "200"})


def test_cli_official_file_with_plot(data_dir, tmp_path, run_cli):
    scores = data_dir / "headkv" / OFFICIAL[3]
    out, plot = tmp_path / "budgets.json", tmp_path / "budgets.png"
    done = run_cli("--scores", scores, "--layers", 32, "--heads", 32, "--kv-heads", 8, "--budgets", "128,256",
                   "--betas", 1.01, "--out", out, "--plot", plot)
    assert done.returncode == 0, done.stderr
    sweep = read_budget_sweep(out, LLAMA)
    assert [(b.budget, b.granularity) for b in sweep] == [(128, "kv"), (256, "kv")]
    raw = json.loads(scores.read_text())
    assert sweep[1].matrix.tolist() == reference_budgets(raw, 32, 32, 8, 256, 8, 1.01, 1.0, "kv")
    assert (tmp_path / "budgets_B128_beta1.01.png").stat().st_size > 0
    assert (tmp_path / "budgets_B256_beta1.01.png").stat().st_size > 0
    assert "top-10 pool share" in done.stdout


@pytest.mark.parametrize("case", ["beta", "budget", "negative", "nan", "empty", "geometry"])
def test_cli_bad_input_one_line_no_output(tmp_path, case, sparse_scores, run_cli):
    scores = tmp_path / "head_scores.json"
    write_head_scores(scores, sparse_scores(30, 9))
    args = ["--scores", scores, "--layers", 30, "--heads", 9, "--kv-heads", 3]
    if case == "beta":
        args += ["--betas", "1.0"]
    elif case == "budget":
        args += ["--budgets", "8"]
    elif case == "negative":
        scores.write_text(scores.read_text().replace("[", "[-0.5, ", 1))
    elif case == "nan":
        scores.write_text(scores.read_text().replace("[", "[NaN, ", 1))
    elif case == "empty":
        scores.write_text("")
    elif case == "geometry":
        args[-3:] = [32, "--kv-heads", 8]
    out = tmp_path / "budgets.json"
    done = run_cli(*args, "--out", out, "--plot", tmp_path / "b.png")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headscore: error: "), done.stderr
    assert not out.exists() and not (tmp_path / "b.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head_scores.json"]


def test_cli_reads_an_authors_file_as_is(data_dir, tmp_path, run_cli):
    """No --model, no metadata: layers × heads come from the file's keys; kv granularity asks for --kv-heads."""
    scores = tmp_path / OFFICIAL[1]
    scores.write_bytes((data_dir / "headkv" / OFFICIAL[1]).read_bytes())
    out = tmp_path / "budgets.json"
    done = run_cli("--scores", scores, "--out", out)
    assert done.returncode == 0, done.stderr
    budgets = read_budgets(out)
    assert (budgets.layers, budgets.heads, budgets.granularity) == (32, 32, "query")
    raw = json.loads(scores.read_text())
    assert budgets.matrix.tolist() == reference_budgets(raw, 32, 32, 32, 128, 8, 1.01, 1.0, "query")
    assert "score file's keys" in done.stdout

    refused = run_cli("--scores", scores, "--granularity", "kv", "--out", tmp_path / "kv.json")
    assert refused.returncode == 2 and not (tmp_path / "kv.json").exists()
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--kv-heads" in lines[0] and "--model" in lines[0], refused.stderr

    done = run_cli("--scores", scores, "--kv-heads", 8, "--out", tmp_path / "kv.json")
    assert done.returncode == 0, done.stderr
    kv = read_budgets(tmp_path / "kv.json")
    assert (kv.layers, kv.heads, kv.granularity) == (32, 8, "kv")
    assert kv.matrix.tolist() == reference_budgets(raw, 32, 32, 8, 128, 8, 1.01, 1.0, "kv")


@pytest.mark.parametrize("command", ["allocate", "build-needles"])
def test_cli_out_naming_a_folder_is_one_clear_line(tmp_path, command, sparse_scores, headscore_cli):
    scores = tmp_path / "head_scores.json"
    write_head_scores(scores, sparse_scores(30, 9))
    folder = tmp_path / "existing"
    folder.mkdir()
    args = ["--scores", scores] if command == "allocate" else ["--min-length", 300, "--max-length", 300,
                                                               "--lengths", 1, "--depths", 1]
    done = headscore_cli(command, *args, "--out", folder, env={"COLUMNS": "200"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"headscore: error: cannot write {folder}: it is a folder; give a " \
                                           "file path", done.stderr
    assert list(folder.iterdir()) == []


def test_one_geometry_mismatch_message(tmp_path, random_scores):
    """Budgets files, presses and head scores used on another model say it the same way (Geometry.check_matches);
    Geometry.from_dict reads what to_dict wrote."""
    from headscore.compression.presses import make_press

    small, model = Geometry(layers=2, query_heads=4, kv_heads=2, head_dim=8), SMOL
    assert Geometry.from_dict(model.to_dict()) == model
    assert Geometry.from_dict({"layers": 2, "query_heads": 4, "kv_heads": 2}) == Geometry(2, 4, 2, 0)
    budgets = allocate("uniform", small, 64)
    write_budgets(tmp_path / "b.json", budgets)
    write_head_scores(tmp_path / "s.json", random_scores(2, 4, trials=1))
    expected = f"are for {small.describe()}, but the model has {model.describe()}"
    assert expected == "are for 2 layers × 4 query heads / 2 KV heads, but the model has 30 layers × 9 query " \
                       "heads / 3 KV heads"
    with pytest.raises(HeadscoreError, match=f"the budgets in {tmp_path / 'b.json'} {expected}"):
        read_budgets(tmp_path / "b.json", model)
    with pytest.raises(HeadscoreError, match=f"^budgets {expected}"):
        make_press("headkv", model, budgets=budgets)
    scores_expected = f"are for {small.describe(False)}, but the model has {model.describe(False)}"
    with pytest.raises(HeadscoreError, match=f"^head scores {scores_expected}"):
        allocate("headkv", model, 64, scores=read_head_scores(tmp_path / "s.json"))
    with pytest.raises(HeadscoreError, match=scores_expected):
        read_head_scores(tmp_path / "s.json", model.layers, model.query_heads)
