"""`report.md` for a reproduce run: every figure, with every number read from the run's own result files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from headscore.compression.presses import RAZOR_K
from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_write_text, hardware
from headscore.core.model import Geometry, load_geometry
from headscore.core.plots import line_plot, niah_panels
from headscore.evaluation.compare import compare_scores
from headscore.evaluation.evaluate import COMPENSATED
from headscore.evaluation.tasks.niah_official import NiahOfficialTask, overlap_score, rouge_score_x10
from headscore.evaluation.tune import comparison_markdown, validation_markdown
from headscore.scoring.head_scores import HeadScores, read_head_scores


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def top_heads(scores_path: Path, k: int = 10) -> list[tuple[int, int, float]]:

    importance = read_head_scores(scores_path).importance()
    values, flat = importance.flatten().topk(min(k, importance.numel()))
    heads = importance.shape[1]
    return [(int(i) // heads, int(i) % heads, float(v)) for v, i in zip(values, flat, strict=True)]


def stability_section(folder: Path) -> list[str]:
    """The bootstrap table, the stable trial count and the figure, from `stability/stability.json`."""
    data = read_json(folder / "stability.json")
    if not data["trials"]:
        return [f"The {data['source']} scores hold no counted trial: nothing to resample.\n"]
    k, overlap, share = data["k"], data["overlap"], data["share"]
    lines = [f"`headscore compare --bootstrap` on `{data['source']}`: its {data['trials']} counted trials resampled "
             f"with replacement, {data['draws']} draws per n (seed {data['seed']}); each draw's top-{k} heads and "
             f"budgets (B={data['budget']}, β={data['beta']:g}, per {data['granularity']} head) against those of "
             "all trials.\n\n",
             markdown_table(["trials n", f"top-{k} overlap mean", "5th percentile", f"draws with overlap ≥ "
                             f"{overlap:g}", "budget L1 share mean", "95th percentile"],
                            [[r["trials"], f"{r['overlap_mean']:.3f}", f"{r['overlap_p05']:.3f}",
                              f"{r['share_stable']:.1%}", f"{r['l1_mean']:.3f}", f"{r['l1_p95']:.3f}"]
                             for r in data["rows"]])]
    stable = data["stable_at"]
    lines.append(f"Stable (top-{k} overlap ≥ {overlap:g} in at least {share:.0%} of draws) from **{stable} trials**.\n"
                 if stable else f"Not stable (top-{k} overlap ≥ {overlap:g} in {share:.0%} of draws) at any n up to "
                 f"{data['trials']} trials: more trials are needed.\n")
    lines.append("![stability vs trials](stability/stability.png)\n")
    return lines


def tune_section(folder: Path) -> list[str]:
    """Validation table, chosen β per budget and the held-out comparison, from the files `tune` wrote."""
    meta = read_json(folder / "metadata.json")
    validation = pd.read_csv(folder / "validation.csv").to_dict("records")
    comparison = pd.read_csv(folder / "comparison.csv").to_dict("records")
    baselines = meta["options"]["baselines"]
    split = meta["split"]
    lines = [f"`headscore tune`: every β of the grid ran on the {len(split['validation'])} validation samples only "
             f"(seed {meta['options']['seed']}, val fraction {meta['options']['val_fraction']:g}); the chosen β "
             f"then ran on the {len(split['test'])} held-out test samples beside the default β "
             f"({meta['options']['default_beta']:g}) and the baselines. Rule: {meta['rule']}.\n\n",
             validation_markdown(validation), "\n![validation score vs beta](tune/validation_vs_beta.png)\n\n",
             "Held-out test split:\n\n", comparison_markdown(comparison, baselines)]
    chosen = ", ".join(f"B={r['budget']}: β={r['chosen_beta']:g} ({r['test_gain']:+.3f})" for r in comparison)
    lines.append(f"\nChosen β per budget (held-out gain over the default β): {chosen}.\n")
    return lines


NIAH_OFFICIAL_DIR = "niah-official"  # the report's needle figures, beside report.md


def niah_official_section(results: pd.DataFrame, root: Path, model: str) -> list[str]:
    """The authors' needle-in-a-haystack test (`niah-official`): per budget one figure of heatmaps in their
    layout, the full cache first, then every method at that budget (methods without a budget, razor-kN, in one
    more figure); and per method and budget their two numbers, both from the predictions: the heatmaps' score
    (`overlap_score`) and the logged ROUGE-1 F × 10. Nothing when the run has no niah-official rows."""
    rows = results[results["task"] == NiahOfficialTask.name]
    if rows.empty:
        return []
    predictions = rows["prediction"].fillna("").astype(str)
    rows = rows.assign(overlap=predictions.map(overlap_score), rouge10=predictions.map(rouge_score_x10))
    lengths = sorted(int(v) for v in rows["target_length"].unique())
    depths = sorted(float(v) for v in rows["depth"].unique())

    def grid(group: pd.DataFrame) -> torch.Tensor:
        table = group.pivot_table(index="depth", columns="target_length", values="overlap", aggfunc="mean")
        return torch.tensor(table.reindex(index=depths, columns=lengths).to_numpy(dtype=float))

    full = rows[rows["method"] == "full"]
    compressed = rows[rows["method"] != "full"]
    groups = [(f"KV size {int(budget)}", f"B{int(budget)}", compressed[compressed["budget"] == budget])
              for budget in sorted(compressed["budget"].dropna().unique())]
    if compressed["budget"].isna().any():
        groups.append(("methods without a budget", "all", compressed[compressed["budget"].isna()]))
    lines = ["Their `run_needle_in_haystack.py` protocol (`niah-official`, docs/tasks.md): the Paul Graham essays, "
             "the San Francisco needle, their prompt, lengths × their ten depths, 30 new tokens ending at EOS or "
             "the newline token. Heatmaps in their layout; the score is their figures' (the share of the answer's "
             "distinct words in the response).\n"]
    for caption, label, group in groups:
        panels = {"full": grid(full)} if not full.empty else {}
        panels.update({str(method): grid(part) for method, part in group.groupby("method", sort=False)})
        path = root / NIAH_OFFICIAL_DIR / f"niah_official_{label}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        niah_panels(panels, path, lengths=lengths, depths=depths,
                    title=f"Pressure Testing {model}, {caption}\nFact Retrieval Across Context Lengths "
                          "(\"Needle In A HayStack\")")
        lines.append(f"![niah-official {caption}]({NIAH_OFFICIAL_DIR}/{path.name})\n")
    means = rows.assign(budget=rows["budget"].astype("Int64")).groupby(["method", "budget"], dropna=False,
                                                                       sort=False)[["overlap", "rouge10"]].mean()
    lines.append(markdown_table(["method", "budget", "heatmap score (their figures)", "ROUGE-1 F × 10 (their logs)"],
                                [[f"`{method}`", "all" if pd.isna(budget) else int(budget), f"{values.overlap:.3f}",
                                  f"{values.rouge10:.3f}"] for (method, budget), values in means.iterrows()]))
    return lines


def babilong_section(results: pd.DataFrame) -> list[str]:
    """BABILong (`babilong:SOURCE`) as the authors' eval_babilong.py reports it: accuracy × 100 per length
    (the mean over the qa tasks of each task's accuracy there), their average, and the average per task."""
    rows = results[results["task"].astype(str).str.startswith("babilong:")]
    if rows.empty:
        return []
    rows = rows.assign(length=rows["sample"].astype(str).str.split("-").str[2],
                       budget=rows["budget"].astype("Int64"))
    lengths = sorted(rows["length"].unique(), key=lambda name: int(name[:-1]))
    tasks = sorted(rows["task"].unique(), key=lambda name: int(name.rsplit("qa", 1)[1]))
    table = []
    for (method, budget), group in rows.groupby(["method", "budget"], dropna=False, sort=False):
        cell = 100 * group.groupby(["task", "length"])["score"].mean()
        per_length = [cell.xs(length, level="length").mean() for length in lengths]
        per_task = [cell.xs(task, level="task").mean() for task in tasks]
        table.append([f"`{method}`", "all" if pd.isna(budget) else int(budget),
                      *[f"{v:.1f}" for v in per_length], f"{sum(per_length) / len(per_length):.1f}",
                      *[f"{v:.1f}" for v in per_task]])
    return ["Their `run_babilong.py` protocol (`babilong:SOURCE`, docs/tasks.md): BABILong qa1–qa5, their prompts "
            "in the chat template, 15 new tokens, their scorer; accuracy × 100 per length (mean over the tasks), "
            "the average over lengths, and each task's mean over lengths.\n\n",
            markdown_table(["method", "budget", *lengths, "average", *[t.split(":", 1)[1] for t in tasks]], table)]


SWEPT = " (β="  # evaluate's label of a method in a β sweep: `<method> (β=<beta>)`


def at_beta(results: pd.DataFrame, beta: float) -> pd.DataFrame:
    """The results of a β sweep at one β, each method under its own name (`headkv-r2 (β=1.01)` -> `headkv-r2`);
    the rows of other β dropped. Results without a sweep are returned as they are."""
    swept = results["method"].astype(str).str.contains(SWEPT, regex=False)
    if not swept.any():
        return results
    kept = results[~swept | results["beta"].sub(beta).abs().lt(1e-9)]
    return kept.assign(method=kept["method"].astype(str).str.split(SWEPT, regex=False).str[0])


def sweep_scores(results: pd.DataFrame) -> pd.DataFrame:
    """Per (method, budget, β) of a β sweep: the test score the authors would read, the mean over tasks of each
    task's mean score (LongBench/LooGLE: each dataset is a task, so their average over datasets / 100), over
    the LongBench/LooGLE tasks when the run has any, else over all its tasks."""
    swept = results[results["method"].astype(str).str.contains(SWEPT, regex=False)]
    sourced = swept["task"].astype(str).str.match(r"(longbench|loogle):")
    if sourced.any():
        swept = swept[sourced]
    swept = swept.assign(base=swept["method"].astype(str).str.split(SWEPT, regex=False).str[0])
    per_task = swept.groupby(["base", "budget", "beta", "task"], sort=False)["score"].mean()
    return per_task.groupby(level=[0, 1, 2], sort=False).mean().rename("score").reset_index()


def beta_sweep_section(results: pd.DataFrame, tune_folder: Path) -> list[str]:
    """Every β of the evaluate stage's sweep per method and budget, the β with the best test score (what the
    authors' sweep over test data picks) beside the β `tune` chose on its validation split."""
    scores = sweep_scores(results)
    if scores.empty:
        return ["`evaluate.betas` sweeps no β (one β per method).\n"]
    comparison = tune_folder / "comparison.csv"
    chosen: dict[tuple[str, int], float] = {}
    if comparison.is_file():
        chosen = {(str(r["method"]), int(r["budget"])): float(r["chosen_beta"])
                  for r in pd.read_csv(comparison).to_dict("records")}
    betas = sorted(scores["beta"].unique())
    rows = []
    for (method, budget), group in scores.groupby(["base", "budget"], sort=False):
        by_beta = dict(zip(group["beta"], group["score"], strict=True))
        best = max(by_beta, key=lambda b: (by_beta[b], -b))  # ties: the smaller β
        cells = [f"**{by_beta[b]:.4f}**" if b == best else f"{by_beta[b]:.4f}" if b in by_beta else "-"
                 for b in betas]
        tuned = chosen.get((str(method), int(budget)))
        rows.append([f"`{method}`", int(budget), *cells, f"{best:g}", "-" if tuned is None else f"{tuned:g}"])
    return ["Every β of `evaluate.betas` at every budget (the authors' `head_start_mistral.sh` sweep). Score: the "
            "mean over tasks of each task's mean (LongBench/LooGLE tasks only where the run has them: their average "
            "over datasets / 100). **Best on test**: the β the authors' sweep picks by looking at the test scores; "
            "**tune (validation)**: the β `headscore tune` chose on its validation split (`tune` section), where it "
            "tuned the same method and budget.\n\n",
            markdown_table(["method", "B", *[f"β={b:g}" for b in betas], "best on test (the authors')",
                            "tune (validation)"], rows)]


# the paper's Table 2 score sets: folder name -> (label, rule and needles)
SCORE_SET_LABELS = {"retrieval": ("Head-R", "retrieval rule, retrieval needles"),
                    "er": ("Head-ER", "r2 rule, retrieval needles"),
                    "r2": ("Head-R2", "r2 rule, retrieval-reasoning needles")}
SCORE_SET_METHODS = {"retrieval": "headkv-r", "er": "headkv-er", "r2": "headkv-r2"}
# the HeadKV authors' RazorAttention comparison (their ICLR 2025 rebuttal): Llama-3-8B-Instruct, average over six
# LongBench QA datasets; (budget, k, RazorAttention), HeadKV-R2 per budget, FullKV
THEIR_RAZOR = [(128, 5, 13.03), (128, 10, 12.87), (128, 20, 13.13), (1024, 100, 14.68), (1024, 500, 29.58)]
THEIR_HEADKV_R2 = {128: 32.00, 1024: 32.95}
THEIR_FULL = 32.90


def head_distribution(scores: HeadScores) -> dict[str, float]:
    """How concentrated a head-score set is: the share of heads with a zero mean score, the share of the total
    held by the top 10 % of heads, and the fewest heads holding half of it."""
    mean = scores.mean().flatten()
    total = float(mean.sum())
    ordered = mean.sort(descending=True).values
    top = max(1, math.ceil(0.1 * mean.numel()))
    half = int((ordered.cumsum(0) < 0.5 * total).sum()) + 1 if total > 0 else 0
    return {"zero_share": float((mean == 0).double().mean()),
            "top10_share": float(ordered[:top].sum()) / total if total > 0 else 0.0,
            "half_heads": half, "heads": mean.numel()}


def ablation_section(root: Path, geometry: Geometry, budget: int, beta: float, window: int,
                     results: pd.DataFrame) -> list[str]:
    """The paper's Table 2 on this model: the Head-R / Head-ER / Head-R2 head distributions, their rank
    agreement (`compare_scores`) and the score of each at every evaluated budget."""
    loaded = {name: read_head_scores(root / f"scores-{name}" / "head_scores.json") for name in SCORE_SET_LABELS}
    lines = ["Three head-score sets separate what the r2 score rule contributes from what the retrieval-reasoning "
             "needles contribute: " + "; ".join(f"**{label}**: {what}" for label, what in SCORE_SET_LABELS.values())
             + ".\n\n"]
    rows = []
    for name, scores in loaded.items():
        d = head_distribution(scores)
        rows.append([SCORE_SET_LABELS[name][0], scores.num_trials, f"{d['zero_share']:.1%}",
                     f"{d['top10_share']:.1%}", f"{d['half_heads']} of {d['heads']}"])
    lines.append(markdown_table(["score set", "trials", "heads with zero score", "score share of the top 10 % heads",
                                 "heads holding half the score"], rows))
    agreement = []
    for a, b in (("retrieval", "er"), ("er", "r2"), ("retrieval", "r2")):
        pair = f"{SCORE_SET_LABELS[a][0]} vs {SCORE_SET_LABELS[b][0]}"
        if any(float(loaded[x].mean().sum()) == 0 for x in (a, b)):
            agreement.append([pair, "-", "-", "-", "-"])  # a set without any score: nothing to rank
            continue
        top = min(20, geometry.layers * geometry.query_heads)
        c = compare_scores(loaded[a], loaded[b], geometry=geometry, budget=budget, beta=beta, window=window,
                           ks=(top,))
        agreement.append([pair, f"{c.spearman:.3f}", f"{c.kendall:.3f}", f"{c.overlap[top]:.2f} (top {top})",
                          f"{c.budget_l1:.3f}"])
    lines.append(f"\nRank agreement (`headscore compare`: importance per query head; budgets at B={budget}, "
                 f"β={beta:g}):\n\n")
    lines.append(markdown_table(["pair", "Spearman", "Kendall", "top-k overlap", "budget L1 share"], agreement))
    labels = {SCORE_SET_METHODS[name]: label for name, (label, _) in SCORE_SET_LABELS.items()}
    present = [m for m in labels if m in set(results["method"])]
    if present:
        chosen = results[results["method"].isin(present)]
        means = chosen.groupby(["budget", "method"])["score"].mean()
        table = [[int(budget), *[f"{means[(budget, m)]:.3f}" if (budget, m) in means.index else "-" for m in present]]
                 for budget in sorted(chosen["budget"].dropna().unique())]
        lines.append("\nMean score per KV size (evaluate: the same samples and budgets for each):\n\n")
        lines.append(markdown_table(["KV size", *[f"{labels[m]} (`{m}`)" for m in present]], table))
    else:
        lines.append("\n`evaluate.methods` runs none of headkv-r, headkv-er, headkv-r2.\n")
    return lines


def razor_base(method: Any) -> str:
    """A razor label without the compensation suffix (`razor (compensation)` -> `razor`)."""
    return str(method).removesuffix(COMPENSATED)


def razor_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The rows of razor-kN methods (k given directly, with or without the compensation token), with their k,
    in order of k."""
    fixed = results[results["method"].map(lambda m: RAZOR_K.fullmatch(razor_base(m)) is not None)]
    k = fixed["method"].map(razor_base).str.removeprefix("razor-k").astype(int)
    return fixed.assign(k=k).sort_values("k", kind="stable")


def razor_section(results: pd.DataFrame) -> list[str]:
    """RazorAttention at each budget's total KV beside HeadKV-R2 and full, razor-kN (k given, as the authors ran
    it) beside the authors' numbers at the same k, then all the HeadKV authors' numbers."""
    base = results["method"].map(razor_base)
    every = results[base.eq("razor") | base.map(lambda m: RAZOR_K.fullmatch(m) is not None)]
    flags = every["compensation"].fillna(False).astype(bool) if "compensation" in every else pd.Series(False)
    both = bool(every["method"].astype(str).str.endswith(COMPENSATED).any())
    lines = ["`razor`: the top-k heads by retrieval score keep their whole prompt, every other head StreamingLLM's "
             "4 sink tokens + the 8-token window; k per prompt from the HeadKV authors' equal-total-KV rule, "
             "k = round((B − 4 − 8) · L · H / prompt length) (halves up; L · H cache heads), so razor holds about "
             "the KV of budget B. `razor-kN`: k = N given, as the authors ran it; its KV does not depend on B, so "
             "it runs once per sample and is placed by the KV size it held (mean entries per cache head). "
             + ("Run both ways (`evaluate.razor_compensation: both`): the methods labelled `(compensation)` store "
                "RazorAttention's compensation token, one more entry per compressed head (the mean of its dropped "
                "keys and values); the others do not. " if both else
                "Compensation token **on** (`evaluate.razor_compensation`): one more entry per compressed head. "
                if bool(flags.any()) else "Compensation token off (`evaluate.razor_compensation`). ")
             + "The paper does not say whether the authors' runs had it; their rebuttal's remark that it made a "
               "run about three times slower at large k implies it was on.\n\n"]
    razor = results[base == "razor"]
    if razor.empty:
        lines.append("`evaluate.methods` does not run razor.\n")
    else:
        full = results.loc[results["method"] == "full", "score"]
        r2 = results[results["method"] == "headkv-r2"]
        rows = []
        for (budget, label), group in razor.groupby(["budget", "method"], sort=True):
            other = r2[r2["budget"] == budget]
            low, high = int(group["full_heads"].min()), int(group["full_heads"].max())
            rows.append([int(budget), f"`{label}`", f"{low}–{high}" if low != high else low,
                         f"{group['kv_ratio'].mean():.3f}",
                         f"{group['score'].mean():.3f}",
                         f"{other['kv_ratio'].mean():.3f}" if not other.empty else "-",
                         f"{other['score'].mean():.3f}" if not other.empty else "-",
                         f"{full.mean():.3f}" if not full.empty else "-"])
        lines.append(markdown_table(["KV size B", "method", "razor k", "razor KV ratio", "razor score",
                                     "headkv-r2 KV ratio", "headkv-r2 score", "full score"], rows))
    fixed = razor_rows(results)
    if not fixed.empty:
        theirs = {k: (budget, value) for budget, k, value in THEIR_RAZOR}
        rows = []
        for method, group in fixed.groupby("method", sort=False):
            k = int(group["k"].iloc[0])
            size = f"{group['kv_size'].mean():.1f}" if "kv_size" in group and group["kv_size"].notna().any() else "-"
            budget, value = theirs.get(k, ("-", None))
            rows.append([f"`{method}`", k, size, f"{group['kv_ratio'].mean():.3f}", f"{group['score'].mean():.3f}",
                         budget, "-" if value is None else f"{value:.2f}"])
        lines.append("\nRazorAttention at a given k (this run; the authors' score at the same k beside it, theirs "
                     "on Llama-3-8B-Instruct's 1,024 heads, six LongBench QA datasets, not this run's tasks):\n\n")
        lines.append(markdown_table(["method", "k", "KV size held (entries per head)", "KV ratio", "score",
                                     "their B", "RazorAttention at this k (theirs)"], rows))
    lines.append("\n**The HeadKV authors' numbers, not this run's** (their rebuttal: Llama-3-8B-Instruct, average "
                 "over six LongBench QA datasets; their rule gave k ≈ 14 at B = 128 for an 8,640-token average, "
                 "so they ran k = 5, 10, 20 at B = 128 and k = 100, 500 at B = 1024):\n\n")
    lines.append(markdown_table(
        ["KV size B", "k", "RazorAttention (theirs)", "HeadKV-R2 (theirs)", "FullKV (theirs)"],
        [[budget, k, f"{value:.2f}", f"{THEIR_HEADKV_R2[budget]:.2f}", f"{THEIR_FULL:.2f}"]
         for budget, k, value in THEIR_RAZOR]))
    lines.append("\nThey also found RazorAttention's compensation token (`--compensation` in compress, evaluate "
                 "and tune; `evaluate.razor_compensation` in a config: true, false or both) made a run about three "
                 "times slower at large k.\n")
    return lines


def task_mean(frame: pd.DataFrame, by: list[str], column: str = "score") -> pd.Series:
    """Mean of `column` per task, then over tasks (the leaderboard's average), for each group of `by`."""
    return frame.groupby([*by, "task"], dropna=False)[column].mean().groupby(level=by, dropna=False).mean()


def leaderboard_section(results: pd.DataFrame, folder: Path) -> list[str]:
    """Rows run at compression ratios (`evaluate.ratios`): the leaderboard's figure (score against the ratio
    asked, one line per method, full as a line), the figure no leaderboard shows (score against the KV bytes
    actually held), a table, and `leaderboard.csv` / `predictions.jsonl` per (task, method, ratio)."""
    if "ratio" not in results or not results["ratio"].notna().any():
        return []
    rated = results[results["ratio"].notna()]
    full = results[results["method"] == "full"]
    per_task = rated.groupby(["task", "method", "ratio"], sort=False).agg(
        score=("score", "mean"), kv_bytes=("kv_bytes", "mean"), ratio_achieved=("ratio_achieved", "mean"),
        samples=("sample", "nunique")).reset_index()
    atomic_write_text(folder / "leaderboard.csv", per_task.to_csv(index=False))
    columns = [c for c in ("task", "sample", "method", "ratio", "ratio_achieved", "kv_bytes", "question",
                           "prediction", "answers", "score") if c in rated]
    atomic_write_text(folder / "predictions.jsonl", rated[columns].to_json(orient="records", lines=True,
                                                                           force_ascii=False))
    scores, held = task_mean(rated, ["method", "ratio"]), task_mean(rated, ["method", "ratio"], "kv_bytes")
    ratios = sorted(rated["ratio"].unique())
    methods = list(dict.fromkeys(rated["method"]))
    by_ratio = {m: ([float(r) for r in ratios], [float(scores[(m, r)]) for r in ratios], None) for m in methods}
    by_bytes = {m: ([float(held[(m, r)]) for r in ratios], [float(scores[(m, r)]) for r in ratios], None)
                for m in methods}
    lines = []
    if len(full):
        full_score, full_bytes = float(task_mean(full, ["method"])["full"]), float(full["kv_bytes"].mean())
        by_ratio["full"] = ([float(r) for r in ratios], [full_score] * len(ratios), None)
        by_bytes["full"] = ([full_bytes], [full_score], None)
        lines.append(f"Full cache: {full_score:.3f} (mean KV bytes {full_bytes:,.0f}).")
    line_plot(by_ratio, folder / "score_vs_ratio.png", title="score vs compression ratio (question after)",
              xlabel="compression ratio asked (fraction of the prompt's entries removed)", ylabel="mean score",
              xscale="linear")
    line_plot(by_bytes, folder / "score_vs_bytes.png", title="score vs KV bytes held",
              xlabel="KV bytes held (mean per sample)", ylabel="mean score", xscale="log")
    table = [[m, *[f"{scores[(m, r)]:.3f}" for r in ratios]] for m in methods]
    asked = rated["question"].iloc[0] if "question" in rated else "in-prompt"
    return [f"Mean over tasks of each task's mean score (the leaderboard's average), question {asked}; "
            f"{rated['sample'].nunique()} samples. " + " ".join(lines) + "\n\n",
            markdown_table(["method", *[f"ratio {r:g}" for r in ratios]], table),
            "\n![score vs compression ratio](evaluate/score_vs_ratio.png)\n",
            "\n![score vs KV bytes held](evaluate/score_vs_bytes.png)\n",
            "\nPer (task, method, ratio): `evaluate/leaderboard.csv`; every prediction: "
            "`evaluate/predictions.jsonl`.\n"]


def write_report(study: Any) -> Path:
    """Write `results/<config>/report.md` from the files the stages wrote (missing ones are named)."""

    root: Path = study.root
    config = study.config
    top = config.top
    need = {
        "estimate": [root / f"scores-{name}" / "metadata.json" for name in SCORE_SET_LABELS],
        "allocate": [root / "budgets"],
        "evaluate": [root / "evaluate" / "summary.md", root / "evaluate" / "results.csv"],
        "stability": [root / "stability" / "stability.json"],
        "tune": [root / "tune" / "comparison.csv", root / "tune" / "validation.csv", root / "tune" / "metadata.json"],
        "ablate": [root / "ablate" / "ablation.csv"],
        "latency": [root / "latency" / "latency.csv"],
    }
    for stage, paths in need.items():
        study.require(f"report (needs {stage})", *paths)
    stages = read_json(root / "stages.json") if (root / "stages.json").is_file() else {}
    meta_r2 = read_json(root / "scores-r2" / "metadata.json")
    meta_ret = read_json(root / "scores-retrieval" / "metadata.json")
    meta_er = read_json(root / "scores-er" / "metadata.json")
    out: list[str] = [f"# headscore study: {config.name}\n"]
    if top.get("note"):
        out.append(str(top["note"]).strip() + "\n")

    # ---- setup
    machine = hardware()
    out.append("## Setup\n")
    versions = meta_r2.get("versions", {})
    geometry = meta_r2["geometry"]
    out.append(markdown_table(["item", "value"], [
        ["model", f"`{top['model']}`: {geometry['layers']} layers × {geometry['query_heads']} query heads, "
                  f"{geometry['kv_heads']} KV heads, head_dim {geometry['head_dim']}"],
        ["device / dtype", f"{top['device']} / {meta_r2.get('dtype', '?')}"],
        ["hardware", f"{machine['processor']}, {machine['cpu_count']} CPUs ({machine['torch_threads']} torch "
                     f"threads){', ' + machine['cuda'] if machine['cuda'] else ''}; {machine['platform']}"],
        ["versions", ", ".join(f"{k} {v}" for k, v in versions.items())],
        ["seed", top["seed"]],
        ["config", f"`{config.path}`"],
    ]))
    timing_rows = [[stage, f"{entry.get('seconds_total', entry.get('seconds', 0)):.1f}"]
                   for stage, entry in stages.items() if stage != "report"]
    out.append("Wall time of each stage (seconds, summed over resumed runs):\n\n")
    out.append(markdown_table(["stage", "seconds"], timing_rows))
    out.append(f"Total: {sum(float(r[1]) for r in timing_rows):.0f} s.\n")

    # ---- head scores
    out.append("## Head scores\n")
    for name, meta, folder in (("retrieval-reasoning (r2)", meta_r2, "scores-r2"),
                               ("retrieval", meta_ret, "scores-retrieval"),
                               ("Head-ER: the r2 rule on the retrieval needles", meta_er, "scores-er")):
        out.append(f"### {name}\n")
        out.append(f"Mode **{meta['mode']}**: {meta['mode_note']}. Trials counted: {meta['trials_counted']} of "
                   f"{meta['trials_run']} run.\n")
        if meta["mode"] == "teacher-forced":
            out.append("This model does not answer the needle question reliably, so its scores come from "
                       "teacher-forced mode: the gold answer is appended and the queries that predict each "
                       "answer token are scored (no success filter).\n")
        if (root / folder / "heatmap.png").is_file():
            out.append(f"![{name} head scores]({folder}/heatmap.png)\n")
        if meta["trials_counted"]:
            rows = [[layer, head, f"{share:.4f}"] for layer, head, share in
                    top_heads(root / folder / "head_scores.json")]
            out.append(markdown_table(["layer", "head", "share of total score"], rows))
    if meta_r2["trials_counted"] and meta_ret["trials_counted"]:
        r2 = {(layer, head) for layer, head, _ in top_heads(root / "scores-r2" / "head_scores.json", 20)}
        ret = {(layer, head) for layer, head, _ in top_heads(root / "scores-retrieval" / "head_scores.json", 20)}
        out.append(f"Top-20 overlap between retrieval and retrieval-reasoning heads: {len(r2 & ret)} of 20.\n")

    # ---- stability
    out.append("## Head-score stability: how many trials?\n")
    out.extend(stability_section(root / "stability"))

    # ---- budgets
    out.append("## Budgets\n")
    budget_files = sorted((root / "budgets").glob("*.json"))
    rows = []
    for path in budget_files:
        data = read_json(path)
        matrix = [v for row in data["matrix"] for v in row]
        rows.append([data["budget"], f"{data['beta']:g}", data["granularity"], data["total_entries"],
                     min(matrix), sorted(matrix)[len(matrix) // 2], max(matrix)])
    out.append("HeadKV budgets (prompt entries per head, window excluded) from the r2 scores. A larger β gives a "
               "smaller shared pool, so budgets flatten towards uniform.\n\n")
    out.append(markdown_table(["B", "β", "granularity", "total entries", "min", "median", "max"], rows))
    for path in budget_files:
        figure = path.with_suffix(".png")
        if figure.is_file():
            out.append(f"![{path.stem}](budgets/{figure.name})\n")

    # ---- evaluation
    out.append("## Accuracy vs KV size\n")
    summary = (root / "evaluate" / "summary.md").read_text(encoding="utf-8")
    out.append(summary.split("\n", 2)[2] if summary.startswith("# ") else summary)
    if (root / "evaluate" / "score_vs_kv.png").is_file():
        out.append("\n![score vs KV size](evaluate/score_vs_kv.png)\n")
    longbench = root / "evaluate" / "longbench.md"
    if longbench.is_file():
        out.append("\n### LongBench / LooGLE (the authors' protocol: each dataset × 100; average over all, "
                   "qa_average and loogle_average as the paper's main table)\n")
        text = longbench.read_text(encoding="utf-8")
        out.append(text[text.index("|"):])
    results = pd.read_csv(root / "evaluate" / "results.csv")
    budgets = sorted(int(b) for b in results["budget"].dropna().unique())
    if (results["task"] == "niah").any():
        out.append("\n### NIAH heatmaps (length × depth)\n")
        labels = [str(budgets[0])] if budgets else []
        shown = [("full", "full")] + [(m, label) for m in results["method"].unique() if m != "full"
                                      for label in [*labels, "all"]]  # "all": razor-kN, which takes no budget
        for method, label in shown:
            figure = root / "evaluate" / f"niah_{method}_{label}.png"
            if figure.is_file():
                out.append(f"![NIAH {method} {label}](evaluate/{figure.name})\n")
        out.append(f"All NIAH heatmaps (every method and budget) are in `evaluate/`; budgets shown: the smallest "
                   f"({budgets[0] if budgets else '-'}).\n")
    leaderboard = leaderboard_section(results, root / "evaluate")
    if leaderboard:
        out.append("\n### The leaderboard's view: score against compression ratio, and against the bytes held\n")
        out.extend(leaderboard)
    official = niah_official_section(results, root, str(top["model"]))
    if official:
        out.append("\n### Needle in a haystack as the authors ran it (the paper's Fig. 5 / Fig. 8)\n")
        out.extend(official)
    babilong = babilong_section(results)
    if babilong:
        out.append("\n### Reasoning in a haystack (BABILong) as the authors ran it\n")
        out.extend(babilong)

    # ---- the paper's ablation and RazorAttention
    evaluate_settings = config.section("evaluate")
    main = at_beta(results, float(evaluate_settings["beta"]))  # a β sweep: the sections below read evaluate.beta
    out.append("## Head-R, Head-ER, Head-R2 (the paper's Table 2)\n")
    out.extend(ablation_section(root, load_geometry(top["model"]), int(config.section("allocate")["budgets"][0]),
                                float(evaluate_settings["beta"]), int(evaluate_settings["window"]), main))
    out.append("## RazorAttention at matched KV\n")
    out.extend(razor_section(main))

    # ---- tune
    out.append("## β chosen on a validation split\n")
    out.extend(tune_section(root / "tune"))
    if evaluate_settings.get("betas"):
        out.append("### β sweep on the evaluate tasks: the authors' pick on test data beside tune's\n")
        out.extend(beta_sweep_section(results, root / "tune"))

    # ---- ablation
    out.append("## Head ablation\n")
    ablation = pd.read_csv(root / "ablate" / "ablation.csv")
    if "seed" in ablation:
        ablation["seed"] = ablation["seed"].astype("Int64")
    if "accuracy" in ablation:
        ablation["accuracy"] = ablation["accuracy"].round(3)
    out.append("Zeroing the outputs of the k highest-scoring heads vs k random heads vs the k lowest; NIAH "
               "accuracy of each.\n\n")
    out.append(markdown_table(list(ablation.columns), ablation.astype(object).where(ablation.notna(), "")
                              .values.tolist()))
    out.append("![ablation](ablate/ablation.png)\n")

    # ---- latency
    out.append("## Latency and memory vs context length\n")
    latency = pd.read_csv(root / "latency" / "latency.csv")
    out.append(markdown_table(["context tokens", "method", "prefill s", "decode ms/token", "KV MiB", "KV ratio"],
                              [[r.context_tokens, r.method, f"{r.prefill_seconds:.2f}",
                                f"{1000 * r.decode_seconds_per_token:.1f}", f"{r.kv_bytes / 2**20:.2f}",
                                f"{r.kv_ratio:.4f}"] for r in latency.itertuples()]))
    out.append("![latency](latency/latency.png)\n\n![KV bytes](latency/kv_bytes.png)\n")

    text = "\n".join(out)
    missing = [link for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text) if not (root / link).is_file()]
    if missing:
        raise HeadscoreError(f"report: figure missing: {missing[0]}")
    path = root / "report.md"
    atomic_write_text(path, text)
    return path
