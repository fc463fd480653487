"""report.md's Table-2 (Head-R / Head-ER / Head-R2) and RazorAttention sections, from small result files."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from scipy import stats

from headscore.core.model import Geometry
from headscore.evaluation.evaluate import COMPENSATED
from headscore.scoring.head_scores import HeadScores, write_head_scores
from headscore.study.report import (
    THEIR_RAZOR,
    ablation_section,
    at_beta,
    babilong_section,
    beta_sweep_section,
    head_distribution,
    razor_section,
)

GEOMETRY = Geometry(layers=2, query_heads=4, kv_heads=2, head_dim=8)


def test_head_distribution_counts_zeros_top_share_and_half_heads():
    means = [0.0, 0.0, 1.0, 3.0, 0.5, 0.5, 0.0, 5.0, 0.0, 0.0]  # total 10, one layer of 10 heads
    scores = HeadScores.from_tensor(torch.tensor(means, dtype=torch.float64).view(1, 1, 10))
    d = head_distribution(scores)
    assert d["zero_share"] == pytest.approx(0.5)
    assert d["top10_share"] == pytest.approx(5.0 / 10)  # the top 10 % = one head, 5 of 10
    assert d["half_heads"] == 1 and d["heads"] == 10  # 5 reaches half of 10
    scores = HeadScores.from_tensor(torch.tensor([[[4.0, 3.0, 2.0, 1.0]]], dtype=torch.float64))
    assert head_distribution(scores)["half_heads"] == 2  # 4 < 5, 4 + 3 >= 5


def score_sets(root, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sets = {}
    for name in ("retrieval", "er", "r2"):
        per_trial = torch.rand(3, 2, 4, generator=generator, dtype=torch.float64)
        per_trial[:, 0, 0] = 0.0  # one zero-score head
        (root / f"scores-{name}").mkdir(parents=True)
        sets[name] = HeadScores.from_tensor(per_trial)
        write_head_scores(root / f"scores-{name}" / "head_scores.json", sets[name])
    return sets


def results_frame():
    rows = []
    for sample, length in enumerate((300, 420)):
        rows.append({"method": "full", "budget": None, "score": 1.0, "kv_ratio": 1.0, "full_heads": None,
                     "sample": sample})
        for budget in (16, 32):
            for index, method in enumerate(("headkv-r", "headkv-er", "headkv-r2")):
                rows.append({"method": method, "budget": budget, "score": (index + sample + budget / 16) / 5,
                             "kv_ratio": budget / length, "full_heads": None, "sample": sample})
            rows.append({"method": "razor", "budget": budget, "score": sample / 2, "kv_ratio": 0.1 * budget / 16,
                         "full_heads": (budget - 12) * 4 // length + sample, "sample": sample})
    return pd.DataFrame(rows)


def test_ablation_section_numbers_come_from_the_files(tmp_path):
    sets = score_sets(tmp_path)
    results = results_frame()
    text = "".join(ablation_section(tmp_path, GEOMETRY, 16, 1.01, 8, results))
    assert "**Head-ER**: r2 rule, retrieval needles" in text
    assert "| Head-R | 3 | 12.5% |" in text  # 1 of 8 heads scores zero
    a, b = sets["er"].importance().flatten(), sets["r2"].importance().flatten()
    assert f"| Head-ER vs Head-R2 | {stats.spearmanr(a, b).statistic:.3f} |" in text
    means = results.groupby(["budget", "method"])["score"].mean()
    for budget in (16, 32):
        cells = " | ".join(f"{means[(budget, m)]:.3f}" for m in ("headkv-r", "headkv-er", "headkv-r2"))
        assert f"| {budget} | {cells} |" in text
    assert "Head-ER (`headkv-er`)" in text
    without = "".join(ablation_section(tmp_path, GEOMETRY, 16, 1.01, 8, results[results["method"] == "full"]))
    assert "runs none of headkv-r, headkv-er, headkv-r2" in without


def test_razor_section_ours_beside_theirs():
    results = results_frame()
    text = "".join(razor_section(results))
    for budget in (16, 32):
        razor = results[(results["method"] == "razor") & (results["budget"] == budget)]
        r2 = results[(results["method"] == "headkv-r2") & (results["budget"] == budget)]
        low, high = int(razor["full_heads"].min()), int(razor["full_heads"].max())
        assert (f"| {budget} | `razor` | {low}–{high} | {razor['kv_ratio'].mean():.3f} | {razor['score'].mean():.3f} | "
                f"{r2['kv_ratio'].mean():.3f} | {r2['score'].mean():.3f} | 1.000 |") in text
    assert "not this run's" in text and "RazorAttention (theirs)" in text
    for budget, k, value in THEIR_RAZOR:
        assert f"| {budget} | {k} | {value:.2f} |" in text
    assert "| 1024 | 500 | 29.58 | 32.95 | 32.90 |" in text
    assert "does not run razor" in "".join(razor_section(results[results["method"] != "razor"]))


def test_razor_section_shows_fixed_k_rows_beside_theirs():
    """razor-kN rows (no budget) get their own table: k, the KV size they held, KV ratio and score from the
    results, the authors' score at the same k where they ran it; compensation on is said."""
    results = results_frame()
    fixed = []
    for sample in range(2):
        for k, size in ((5, 40.0 + sample), (3, 20.0), (500, 300.0 + 2 * sample)):
            fixed.append({"method": f"razor-k{k}", "budget": None, "score": (k % 7 + sample) / 10,
                          "kv_ratio": size / 400, "kv_size": size, "full_heads": k, "compensation": False,
                          "sample": sample})
    both = pd.concat([results, pd.DataFrame(fixed)], ignore_index=True)
    text = "".join(razor_section(both))
    frame = pd.DataFrame(fixed)
    order = []
    for k, (budget, value) in ((3, ("-", "-")), (5, (128, "13.03")), (500, (1024, "29.58"))):
        group = frame[frame["method"] == f"razor-k{k}"]
        line = (f"| `razor-k{k}` | {k} | {group['kv_size'].mean():.1f} | {group['kv_ratio'].mean():.3f} | "
                f"{group['score'].mean():.3f} | {budget} | {value} |")
        assert line in text
        order.append(text.index(line))
    assert order == sorted(order)  # in order of k
    assert "Compensation token off" in text
    frame["compensation"] = True
    on = "".join(razor_section(pd.concat([results, frame], ignore_index=True)))
    assert "Compensation token **on**" in on
    labelled = frame.assign(method=frame["method"] + COMPENSATED)
    both = "".join(razor_section(pd.concat([results, pd.DataFrame(fixed), labelled], ignore_index=True)))
    assert "Run both ways" in both and "| `razor-k5` | 5 |" in both and "| `razor-k5 (compensation)` | 5 |" in both
    assert "RazorAttention at a given k" not in "".join(razor_section(results))


def sweep_frame() -> pd.DataFrame:
    """A β-sweep result table: headkv-r2 at 2 budgets × 3 β on two LongBench datasets of different sizes and a
    NIAH task, plus full; scores drawn so the best β differs per budget."""
    generator = torch.Generator().manual_seed(5)
    rows = []
    for budget in (64, 128):
        for beta in (1.005, 1.01, 2.0):
            for task, count in (("longbench:qasper", 3), ("loogle:computation", 1), ("niah", 2)):
                for sample in range(count):
                    rows.append({"task": task, "sample": f"{task}-{sample}", "method": f"headkv-r2 (β={beta:g})",
                                 "budget": budget, "beta": beta, "score": float(torch.rand(1, generator=generator)),
                                 "kv_ratio": 0.1, "compensation": None})
    rows.append({"task": "niah", "sample": "niah-0", "method": "full", "budget": None, "beta": None, "score": 1.0,
                 "kv_ratio": 1.0, "compensation": None})
    return pd.DataFrame(rows)


def test_beta_sweep_section_marks_the_best_on_test_beside_tunes_choice(tmp_path):
    """The best β per budget: the mean over the LongBench/LooGLE tasks of each task's mean (plain loops here),
    beside tune's choice read from its comparison.csv; the other sections read evaluate.beta's rows by name."""
    results = sweep_frame()
    pd.DataFrame([{"method": "headkv-r2", "budget": 128, "chosen_beta": 1.01}]).to_csv(
        tmp_path / "comparison.csv", index=False)
    text = "".join(beta_sweep_section(results, tmp_path))
    for budget in (64, 128):
        means = {}
        for beta in (1.005, 1.01, 2.0):
            task_means = []
            for task in ("longbench:qasper", "loogle:computation"):  # niah left out: the run has LongBench tasks
                values = [r["score"] for r in results.to_dict("records")
                          if r["budget"] == budget and r["beta"] == beta and r["task"] == task]
                task_means.append(sum(values) / len(values))
            means[beta] = sum(task_means) / len(task_means)
        best = max(means, key=lambda b: means[b])
        cells = " | ".join(f"**{means[b]:.4f}**" if b == best else f"{means[b]:.4f}" for b in (1.005, 1.01, 2.0))
        tuned = "1.01" if budget == 128 else "-"
        assert f"| `headkv-r2` | {budget} | {cells} | {best:g} | {tuned} |" in text
    main = at_beta(results, 1.01)
    assert set(main["method"]) == {"headkv-r2", "full"} and set(main["beta"].dropna()) == {1.01}
    assert len(main) == 2 * 6 + 1
    assert "sweeps no β" in "".join(beta_sweep_section(main, tmp_path))


def test_babilong_section_is_their_per_length_accuracy():
    """Accuracy × 100 per length: each qa task's mean there, then their mean (eval_babilong.py's per-split
    average over datasets), the average over lengths, and each task's mean over lengths; plain loops here."""
    generator = torch.Generator().manual_seed(2)
    rows = []
    for method, budget in (("full", None), ("headkv-r2", 128)):
        for task in ("qa1", "qa2"):
            for length in ("0k", "1k", "16k"):
                for number in range(3 if task == "qa1" else 2):
                    rows.append({"task": f"babilong:{task}", "sample": f"babilong-{task}-{length}-{number}",
                                 "method": method, "budget": budget,
                                 "score": float(torch.rand(1, generator=generator) > 0.5)})
    text = "".join(babilong_section(pd.DataFrame(rows)))
    assert "| method | budget | 0k | 1k | 16k | average | qa1 | qa2 |" in text
    for method, budget in (("full", "all"), ("headkv-r2", 128)):
        cell = {}
        for task in ("qa1", "qa2"):
            for length in ("0k", "1k", "16k"):
                values = [r["score"] for r in rows if r["method"] == method and r["task"] == f"babilong:{task}"
                          and r["sample"].split("-")[2] == length]
                cell[task, length] = 100 * sum(values) / len(values)
        per_length = [(cell["qa1", n] + cell["qa2", n]) / 2 for n in ("0k", "1k", "16k")]
        per_task = [sum(cell[t, n] for n in ("0k", "1k", "16k")) / 3 for t in ("qa1", "qa2")]
        expected = [f"{v:.1f}" for v in (*per_length, sum(per_length) / 3, *per_task)]
        assert f"| `{method}` | {budget} | " + " | ".join(expected) + " |" in text
    assert babilong_section(pd.DataFrame(rows).assign(task="niah")) == []


def test_leaderboard_section_averages_tasks_and_writes_its_files(tmp_path):
    import json

    import pandas as pd

    from headscore.study.report import leaderboard_section

    rows = []
    for task, scores in (("ruler:vt", {"snapkv": (1.0, 0.0), "kvzip": (1.0, 1.0)}),
                         ("ruler:cwe", {"snapkv": (0.5, 0.5), "kvzip": (0.0, 0.0)})):
        rows.append({"task": task, "sample": f"{task}-0", "method": "full", "ratio": None, "score": 1.0,
                     "kv_bytes": 1000, "ratio_achieved": 0.0, "question": "after", "prediction": "x",
                     "answers": "x"})
        for method, (low, high) in scores.items():
            for ratio, score in ((0.5, low), (0.875, high)):
                rows.append({"task": task, "sample": f"{task}-0", "method": method, "ratio": ratio,
                             "score": score, "kv_bytes": 1000 * (1 - ratio), "ratio_achieved": ratio,
                             "question": "after", "prediction": "y", "answers": "x"})
    lines = leaderboard_section(pd.DataFrame(rows), tmp_path)
    text = "".join(lines)
    # per task first, then over tasks: snapkv (1 + 0.5) / 2 at 0.5, (0 + 0.5) / 2 at 0.875
    assert "| snapkv | 0.750 | 0.250 |" in text and "| kvzip | 0.500 | 0.500 |" in text
    assert "Full cache: 1.000" in text and "question after" in text
    assert (tmp_path / "score_vs_ratio.png").is_file() and (tmp_path / "score_vs_bytes.png").is_file()
    table = pd.read_csv(tmp_path / "leaderboard.csv")
    assert len(table) == 8 and set(table.columns) >= {"task", "method", "ratio", "score", "kv_bytes"}
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and {p["method"] for p in predictions} == {"snapkv", "kvzip"}
    assert leaderboard_section(pd.DataFrame(rows).assign(ratio=None), tmp_path) == []
