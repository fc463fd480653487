"""Memory targets: the largest KV size whose head-wise cache fits, against a brute-force scan, and the bytes held
against the cache itself."""

from __future__ import annotations

import json

import pytest
import torch

from headscore.compression.allocation import allocate
from headscore.compression.memory import MemoryTarget, held_bytes, memory_budgets, parse_bytes
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry

GEOMETRY = Geometry(layers=3, query_heads=4, kv_heads=2, head_dim=8)


def brute_force(allocation, target, window, **params):
    """The largest B in [window + 1, context] whose bytes fit, by trying every B (no monotonicity assumed)."""
    sized_by = "uniform" if allocation in ("ada", "global") else allocation
    best = None
    for budget in range(window + 1, target.context + 1):
        budgets = allocate(sized_by, GEOMETRY, budget, window=window, **params)
        element = {"float32": 4, "bfloat16": 2, "float16": 2}[target.dtype]
        kept = sum(min(v + window, target.context) for row in budgets.matrix.tolist() for v in row)
        generated = GEOMETRY.layers * GEOMETRY.kv_heads * target.max_new_tokens
        if target.batch * (kept + generated) * GEOMETRY.head_dim * 2 * element <= target.memory:
            best = budget
    return best


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 1024**3 and parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes("4096") == 4096 and parse_bytes(512) == 512 and parse_bytes("3kib") == 3072
    for bad in ("two GB", "1 parsec", "0", "-5MB"):
        with pytest.raises(HeadscoreError, match="memory"):
            parse_bytes(bad)


@pytest.mark.parametrize("allocation", ["uniform", "pyramid", "headkv", "ada", "global"])
@pytest.mark.parametrize("beta", [1.01, 1.5])
def test_the_kv_size_is_the_largest_that_fits(allocation, beta, random_scores):
    scores = random_scores(GEOMETRY.layers, GEOMETRY.query_heads, seed=3, zero_below=0.6)
    params = {"beta": beta, "scores": scores, "pyramid_beta": 3.0}
    for memory, context, batch, new, dtype in ((20_000, 120, 1, 0, "float32"), (9_000, 300, 2, 5, "bfloat16"),
                                               (60_000, 90, 3, 17, "float16"), (150_000, 200, 1, 0, "float32")):
        target = MemoryTarget(memory, context, batch, dtype, new)
        budgets, held = memory_budgets(allocation, GEOMETRY, target, window=4, **params)
        want = brute_force(allocation, target, 4, **params)
        assert budgets.budget == want, (allocation, memory, context)
        assert held == held_bytes(budgets, target) <= memory
        if want < context:  # one more entry per head would not fit
            bigger = allocate("uniform" if allocation in ("ada", "global") else allocation, GEOMETRY, want + 1,
                              window=4, **params)
            assert held_bytes(bigger, target) > memory
    with pytest.raises(HeadscoreError, match="cannot hold even 5 entries per head"):
        memory_budgets(allocation, GEOMETRY, MemoryTarget(100, 50), window=4, **params)


def test_bytes_held_are_the_caches(tiny_llama):
    """The bytes `held_bytes` predicts are those the head-wise cache stores after generation."""
    from headscore.compression.generation import generate_ids
    from headscore.compression.presses import make_press

    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (1, 60))
    target = MemoryTarget(6_000, 60, 1, "float32", 5)
    budgets, held = memory_budgets("uniform", geometry, target, window=4)
    press = make_press("snapkv", geometry, budget=budgets.budget, window=4)
    tokens, report = generate_ids(model, ids, press, max_new_tokens=6, eos=())
    assert len(tokens) == 6  # the last token is never cached: 5 generated entries per KV head
    assert report.kv_bytes == held


def test_cli_allocate_memory(tmp_path, headscore_cli):
    out = tmp_path / "budgets.json"
    result = headscore_cli("allocate", "--allocation", "uniform", "--memory", "64MiB", "--context", "4096",
                           "--batch", "2", "--max-new-tokens", "64", "--out", out)
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    # SmolLM2: 30 layers × 3 KV heads × 64 dims × key and value × 2 bytes per token and head
    per_token = 30 * 3 * 64 * 2 * 2
    assert written["budget"] == (64 * 2**20 // 2) // per_token - 64
    assert written["memory"]["bytes_held"] <= 64 * 2**20 and written["memory"]["context"] == 4096
    failed = headscore_cli("allocate", "--allocation", "uniform", "--memory", "64MiB", "--out", out)
    assert failed.returncode != 0 and "needs --context" in failed.stderr and "\n" not in failed.stderr.strip()


def test_cli_compress_memory_holds_what_it_planned(tmp_path, tiny_folder, headscore_cli):
    context = tmp_path / "context.txt"
    context.write_text("The vault code is 4812. " * 30, encoding="utf-8")
    report = tmp_path / "report.json"
    result = headscore_cli("compress", "--model", tiny_folder, "--method", "snapkv@pyramid", "--memory", "20KB",
                           "--context-file", context, "--question", "What is the vault code?",
                           "--max-new-tokens", "4", "--report", report)
    assert result.returncode == 0, result.stderr
    written = json.loads(report.read_text())
    target = written["metadata"]["memory_target"]
    assert target["memory"] == 20_000 and target["bytes_held"] <= 20_000
    assert written["report"]["kv_bytes"] == target["bytes_held"]  # the plan is what the cache held
    assert written["metadata"]["press"]["budget"] == target["budget"]
    refused = headscore_cli("compress", "--model", tiny_folder, "--method", "full", "--memory", "20KB",
                            "--context-file", context, "--question", "What?")
    assert refused.returncode != 0 and "memory target sizes a scorer × allocation method" in refused.stderr
