"""A score rule is one registry entry: a third rule written here (top-1 attention mass) is accepted by
`estimate`, `allocate` and `evaluate` with no other edit, and its entry decides the success check and the
decode length."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from headscore.cli import app
from headscore.compression.allocation import allocate
from headscore.compression.budgets_file import read_budgets
from headscore.core.model import Geometry
from headscore.scoring.estimate import EstimateOptions
from headscore.scoring.head_scores import read_head_scores
from headscore.scoring.rules import RULES, ScoreRule, get_rule, rule_for_scores

CALLS: list[tuple[int, ...]] = []


def top1_mass(probs: torch.Tensor, span: tuple[int, int], tokens: torch.Tensor | None = None,
              prompt_ids: torch.Tensor | None = None, *, answer_tokens: int = 1) -> torch.Tensor:
    """Per step, a head whose top-1 position lies in the span adds its attention weight there, / N."""
    CALLS.append(tuple(probs.shape))
    start, end = span
    weight, top = probs.max(dim=-1)  # [steps, layers, heads]
    inside = (top >= start) & (top < end)
    return (weight * inside).sum(dim=0) / (end - start)


@pytest.fixture
def top1(monkeypatch) -> ScoreRule:
    rule = ScoreRule(name="top1", score=top1_mass, success="rouge", decode_length="span", scores_name="top1",
                     description="top-1 attention mass inside the span, / N")
    monkeypatch.setitem(RULES, "top1", rule)
    CALLS.clear()
    return rule


def test_the_entry_carries_the_success_check_and_decode_length(top1):
    assert get_rule("top1") is top1 and rule_for_scores("top1") is top1 and rule_for_scores("r").name == "retrieval"
    options = EstimateOptions(rule="top1", f1_threshold=0.9, rouge_threshold=0.4)
    assert options.success(f1=0.0, rouge=0.5) and not options.success(f1=1.0, rouge=0.3)  # ROUGE, not F1
    assert top1.decode_steps(answer_tokens=3, span_tokens=5) == 5
    assert get_rule("r2").decode_steps(answer_tokens=3, span_tokens=5) == 3
    assert EstimateOptions(rule="r2").success(f1=0.6, rouge=0.0)


def test_a_third_rule_through_estimate_allocate_evaluate(top1, tiny_folder, tmp_path, no_plots):
    from headscore.scoring.trials import build_needle_trials, write_trials

    trials = tmp_path / "trials.jsonl"
    write_trials(trials, build_needle_trials("smollm2-135m", kind="retrieval", min_length=120, max_length=150,
                                             lengths=1, depths=2))
    runner = CliRunner()
    scores = tmp_path / "top1" / "head_scores.json"
    done = runner.invoke(app, ["estimate", "--trials", str(trials), "--rule", "top1", "--mode", "teacher-forced",
                               "--model", str(tiny_folder), "--out", str(scores.parent)])
    assert done.exit_code == 0, done.output
    metadata = json.loads((scores.parent / "metadata.json").read_text())
    assert metadata["method"] == "top1" and metadata["rule"] == top1.description
    assert len(CALLS) == 6 and all(shape[1:3] == (2, 4) for shape in CALLS)  # 6 trials, [N, layers, heads, ...]
    head_scores = read_head_scores(scores)
    assert head_scores.num_trials == 6 and float(head_scores.mean().sum()) > 0

    budgets = tmp_path / "budgets.json"
    done = runner.invoke(app, ["allocate", "--scores", str(scores), "--budgets", "24", "--out", str(budgets)])
    assert done.exit_code == 0, done.output
    geometry = Geometry(layers=2, query_heads=4, kv_heads=2, head_dim=4)
    expected = allocate("headkv", geometry, 24, scores=head_scores)
    assert torch.equal(read_budgets(budgets, geometry).matrix, expected.matrix)

    out = tmp_path / "evaluation"
    done = runner.invoke(app, ["evaluate", "--model", str(tiny_folder), "--scores", f"top1={scores}",
                               "--methods", "full,headkv-top1", "--budgets", "24", "--tasks", "niah",
                               "--lengths", "150", "--depths", "50", "--num-needles", "1", "--template", "raw",
                               "--out", str(out)])
    assert done.exit_code == 0, done.output
    rows = (out / "results.csv").read_text().splitlines()
    assert [row.split(",")[5] for row in rows[1:]] == ["full", "headkv-top1"]
    assert json.loads((out / "metadata.json").read_text())["options"]["scores_files"] == {"top1": str(scores)}
