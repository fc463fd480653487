"""reproduce: config validation for every shipped config, and the quick study end to end (smoke test)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from headscore.compression.presses import parse_method
from headscore.core.errors import HeadscoreError
from headscore.study.reproduce import SCHEMA, STAGES, load_config, run_study

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["quick", "smollm2-135m", "llama3-8b-instruct", "mistral-7b-instruct",
                                  "ruler-qwen3-8b", "ruler-llama3.1-8b", "ruler-smollm2"])
def test_shipped_configs_validate(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.name == name
    for section, defaults in SCHEMA.items():
        assert set(config.values[section]) == set(defaults)
    if name in ("llama3-8b-instruct", "mistral-7b-instruct"):
        assert config.top["device"] == "cuda" and "/" in config.top["model"]
        assert config.section("tune")["betas"] == [1.005, 1.01, 1.1, 1.2, 1.5, 2, 5, 10]
        assert min(config.section("evaluate")["budgets"]) == 64
        assert max(config.section("evaluate")["budgets"]) == 2048
        evaluate = config.section("evaluate")
        assert evaluate["tasks"] == "longbench:data/LongBench,loogle:bigai-nlco/LooGLE,niah-official,babilong"
        assert evaluate["lengths"] is None and evaluate["depths"] is None  # niah-official's own grid
        assert evaluate["template"] == "raw"
        # the authors' numbers (docs/fidelity.md): HeadKV run_longbench.py model2maxlen, head_start_llama3.sh β
        assert evaluate["max_length"] == {"llama3-8b-instruct": 7950, "mistral-7b-instruct": 31500}[name]
        assert evaluate["beta"] == {"llama3-8b-instruct": 1.005, "mistral-7b-instruct": 1.01}[name]
        # head_start_mistral.sh sweeps all eight β on LongBench; head_start_llama3.sh runs 1.005 only
        assert evaluate["betas"] == {"llama3-8b-instruct": None,
                                     "mistral-7b-instruct": [1.005, 1.01, 1.1, 1.2, 1.5, 2, 5, 10]}[name]
        # ... and their behaviour throughout
        assert {k: evaluate[k] for k in ("granularity", "beyond_prompt", "score_dtype", "pyramid_schedule",
                                         "ada_allocation", "dtype")} == {
            "granularity": "query", "beyond_prompt": "keep", "score_dtype": "float16", "pyramid_schedule": "headkv",
            "ada_allocation": "official", "dtype": "float16"}
        assert config.section("allocate")["granularity"] == "query"
        # RazorAttention as the authors ran it: k given (B = 128: 5, 10, 20; B = 1024: 100, 500), beside razor
        assert {"razor", "razor-k5", "razor-k10", "razor-k20", "razor-k100", "razor-k500"} <= set(evaluate["methods"])
        assert evaluate["razor_compensation"] == "both"  # the paper does not say; both, labelled
        needles, estimate = config.section("needles"), config.section("estimate")
        assert (needles["min_length"], needles["max_length"], needles["lengths"], needles["template"]) == (
            0, 10000, 5, "official")
        assert needles["r2_haystack"].endswith("haystack_for_detect_r2")
        assert needles["retrieval_haystack"].endswith("haystack_for_detect") and needles["span"] == "official"
        assert (estimate["stop_rule"], estimate["rouge"], estimate["r2_weight"]) == ("official", "stemmed",
                                                                                  "released")
    if name == "mistral-7b-instruct":
        assert config.top["model"].endswith("@dca6e4b60aca009ed25ffa70c9bb65e46960a573")
    if name.startswith("ruler-"):  # the leaderboard's protocol: RULER, question after, ratios
        evaluate = config.section("evaluate")
        assert evaluate["question"] == "after" and evaluate["budgets"] == []
        assert evaluate["tasks"] in ("ruler", "ruler-synthetic") and evaluate["ratios"][-1] == 0.875
        assert {"full", "expected", "kvzip", "headkv-r2", "expected@headkv-r2", "kvzip@global"} <= set(
            evaluate["methods"])
        if name != "ruler-smollm2":
            assert evaluate["ratios"] == [0.25, 0.5, 0.75, 0.875] and evaluate["lengths"] == [4096]
            assert config.top["device"] == "cuda" and "/" in config.top["model"]
    if name == "smollm2-135m":
        assert config.section("estimate")["r2_mode"] == "teacher-forced"
        assert "razor-k5" in config.section("evaluate")["methods"]  # once per sample: cheap
    for method in config.section("evaluate")["methods"]:  # every method resolves
        assert parse_method(method).head_scores in (None, "r", "er", "r2")


@pytest.mark.parametrize(
    "text,message",
    [
        ("evaluate:\n  budgetz: [1]\n", "unknown key 'evaluate.budgetz'"),
        ("colour: red\n", "unknown key 'colour'"),
        ("evaluate: [1, 2]\n", "section 'evaluate' must be a mapping"),
        ("ablate:\n  ks: []\n", "'ablate.ks' must be a non-empty list"),
        ("beta_sweep:\n  budget: 64\n", "section 'beta_sweep' was replaced by 'tune'"),
        ("evaluate:\n  beta: 1.5\n  betas: [1.01, 2]\n", "'evaluate.betas' must be a list holding 'evaluate.beta'"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(HeadscoreError, match=re.escape(message)):
        load_config(path)


def test_missing_config_and_stage_inputs(tmp_path, headscore_cli):
    with pytest.raises(HeadscoreError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(HeadscoreError, match="unknown stage 'train'"):
        run_study(CONFIGS / "quick.yaml", results=tmp_path, stages=["train"])
    result = headscore_cli("reproduce", "--config", CONFIGS / "quick.yaml", "--results", tmp_path, "--stages",
                           "allocate")
    assert result.returncode == 2
    assert "reproduce stage 'allocate': missing" in result.stderr and "head_scores.json" in result.stderr


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    """The whole pipeline on the quick config: every stage's files, and a report whose figures exist and whose
    numbers come from the result files."""
    import pandas as pd

    lines: list[str] = []
    report = run_study(CONFIGS / "quick.yaml", results=tmp_path, log=lines.append)
    root = tmp_path / "quick"
    assert report == root / "report.md"
    text = report.read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(figures) >= 10
    assert all((root / f).is_file() for f in figures)
    for expected in ("scores-r2/heatmap.png", "scores-retrieval/heatmap.png", "scores-er/heatmap.png",
                     "evaluate/score_vs_kv.png",
                     "tune/validation_vs_beta.png", "stability/stability.png", "ablate/ablation.png",
                     "latency/latency.png", "latency/kv_bytes.png"):
        assert expected in figures
    assert "teacher-forced" in text
    stages = json.loads((root / "stages.json").read_text())
    assert set(stages) == set(STAGES)
    # numbers in the report are the result files' numbers
    summary = pd.read_csv(root / "evaluate" / "results.csv")
    full = summary[summary["method"] == "full"]["score"].mean()
    assert f"| full | all | 1.000 | {full:.3f} |" in text
    latency = pd.read_csv(root / "latency" / "latency.csv")
    assert f"{latency['kv_bytes'].iloc[0] / 2**20:.2f}" in text
    tuned = pd.read_csv(root / "tune" / "comparison.csv").iloc[0]
    assert f"B={tuned['budget']}: β={tuned['chosen_beta']:g} ({tuned['test_gain']:+.3f})" in text
    # the Table-2 section (Head-R / Head-ER / Head-R2) and the RazorAttention section, from the result files
    assert "## Head-R, Head-ER, Head-R2 (the paper's Table 2)" in text and "## RazorAttention at matched KV" in text
    er = summary[(summary["method"] == "headkv-er") & (summary["budget"] == 16)]["score"].mean()
    assert re.search(rf"\| 16 \| [0-9.]+ \| {er:.3f} \| [0-9.]+ \|", text)
    razor = summary[(summary["method"] == "razor") & (summary["budget"] == 32)]
    assert f"| {razor['kv_ratio'].mean():.3f} | {razor['score'].mean():.3f} |" in text
    assert "13.03" in text and "not this run's" in text
    fixed = summary[summary["method"] == "razor-k5"]  # k given: once per sample, beside the authors' k = 5
    assert len(fixed) == summary["sample"].nunique() and fixed["budget"].isna().all()
    assert (f"| `razor-k5` | 5 | {fixed['kv_size'].mean():.1f} | {fixed['kv_ratio'].mean():.3f} | "
            f"{fixed['score'].mean():.3f} | 128 | 13.03 |") in text
    stability = json.loads((root / "stability" / "stability.json").read_text())
    assert stability["trials"] > 0 and f"| {stability['rows'][-1]['overlap_mean']:.3f} |" in text
    # rerunning continues: every stage but the report is skipped
    lines.clear()
    run_study(CONFIGS / "quick.yaml", results=tmp_path, log=lines.append)
    assert sum("skipped" in line for line in lines) == len(STAGES) - 1


def test_stage_errors_name_the_stage(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text((CONFIGS / "quick.yaml").read_text().replace("tasks: niah,twohop", "tasks: niah,twohops"))
    scores = tmp_path / "quick"
    for which in ("r2", "retrieval", "er"):
        (scores / f"scores-{which}").mkdir(parents=True)
        (scores / f"scores-{which}" / "head_scores.json").write_text(
            json.dumps({f"{layer}-{head}": [1.0 + head] for layer in range(30) for head in range(9)}))
    with pytest.raises(HeadscoreError, match="reproduce stage 'evaluate': unknown task 'twohops'"):
        run_study(config, results=tmp_path, stages=["evaluate"])
