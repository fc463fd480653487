"""The study's estimate stage runs each needle kind's trials once for all its score sets (Head-R and Head-ER on
the retrieval trials), and each set's folder equals its own single-rule run."""

from __future__ import annotations

import json

from headscore.scoring import estimate as estimate_module
from headscore.scoring.estimate import EstimateOptions, run_estimate
from headscore.study.reproduce import run_study


def test_estimate_stage_runs_the_retrieval_trials_once_for_both_sets(tiny_folder, tmp_path, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\nmodel: {tiny_folder}\ndevice: cpu\n"
                      "needles: {min_length: 150, max_length: 200, lengths: 1, depths: 2}\n"
                      "estimate: {r2_mode: teacher-forced, retrieval_mode: teacher-forced, "
                      "er_mode: teacher-forced}\n")
    calls: list[tuple[str, list[str]]] = []
    score = estimate_module.score_trial_rules

    def spy(model, tokenizer, trial, index, options, *args):
        calls.append((trial.id, [option.rule for option in options]))
        return score(model, tokenizer, trial, index, options, *args)

    monkeypatch.setattr(estimate_module, "score_trial_rules", spy)
    lines: list[str] = []
    run_study(config, results=tmp_path, stages=["needles", "estimate"], log=lines.append)
    root = tmp_path / "tiny"
    assert any("scores-retrieval, scores-er from one teacher-forced pass" in line for line in lines)
    retrieval = [rules for trial, rules in calls if trial.startswith("retrieval")]
    reasoning = [rules for trial, rules in calls if not trial.startswith("retrieval")]
    assert retrieval and all(rules == ["retrieval", "r2"] for rules in retrieval)  # once for Head-R and Head-ER
    assert reasoning and all(rules == ["r2"] for rules in reasoning)
    stages = json.loads((root / "stages.json").read_text())
    assert set(stages["estimate"]["estimate"]) == {"r2", "retrieval", "er"}
    alone = run_estimate(str(tiny_folder), root / "trials-retrieval.jsonl", tmp_path / "er-alone",
                         options=EstimateOptions(rule="r2", mode="teacher-forced"), device="cpu")
    assert alone.run == len(retrieval)
    for name in ("head_scores.json", "trials.csv", "heatmap.png"):
        assert (root / "scores-er" / name).read_bytes() == (tmp_path / "er-alone" / name).read_bytes()
