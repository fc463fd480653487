"""Commands that evaluate compression and check head scores: evaluate, tune, ablate, compare."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from headscore.cli.app import (
    MODEL_HELP,
    PREFIX_HELP,
    PREFIX_MAX_HELP,
    _number_list,
    app,
    progress_bar,
    stdout,
)
from headscore.core.assets import DEFAULT_MODEL
from headscore.core.errors import HeadscoreError


@app.command("evaluate")
def evaluate_command(
    out: Path = typer.Option(Path("evaluation"), "--out", "-o", help="Output folder: results.csv, summary.md, "
                             "metadata.json, NIAH heatmaps, score_vs_kv.png; journal.jsonl makes reruns resume."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    tasks: str = typer.Option("niah,synthetic", help="Comma-separated tasks: niah, synthetic (= multikey, "
                              "multivalue, vartrack, twohop) or any of those; longbench:DIR (the 16 English "
                              "LongBench datasets, DIR/<dataset>.jsonl from LongBench's data.zip), "
                              "longbench-e:DIR, longbench:FILE_OR_HF_ID, loogle[:FILE_OR_HF_ID] (see "
                              "docs/longbench.md)."),
    methods: str = typer.Option("full,snapkv,pyramidkv,ada-snapkv,headkv-r,headkv-r2",
                                help="Comma-separated: full, streaming, snapkv, pyramidkv, ada-snapkv, headkv-r "
                                "(needs --scores-r), headkv-r2 (needs --scores-r2)."),
    budgets: str = typer.Option("32,64,128,256", help="KV sizes (average entries per head, window included), "
                                "comma-separated; full runs once."),
    scores_r: Path | None = typer.Option(None, "--scores-r", help="Retrieval head scores (estimate --method "
                                         "retrieval) for headkv-r."),
    scores_r2: Path | None = typer.Option(None, "--scores-r2", help="Retrieval-reasoning head scores (estimate "
                                          "--method r2) for headkv-r2."),
    beta: str = typer.Option("1.01", help="HeadKV pool control (> 1; larger = smaller shared pool); "
                             "comma-separate several for a β sweep."),
    temp: float = typer.Option(1.0, help="HeadKV importance temperature."),
    window: int = typer.Option(8, help="Observation window of SnapKV selection."),
    kernel: int = typer.Option(7, help="Max-pool kernel of SnapKV selection."),
    alpha: float = typer.Option(0.2, help="Ada-SnapKV floor: every head keeps at least alpha × budget."),
    pyramid_beta: float = typer.Option(20.0, help="PyramidKV: the last layer keeps (B - w) / pyramid_beta."),
    granularity: str | None = typer.Option(None, help="HeadKV budgets per kv head [default under GQA] or query "
                                           "head."),
    lengths: str | None = typer.Option(None, help="Prompt lengths (tokens) of niah and synthetic tasks, "
                                       "comma-separated [default: 1000,2000,4000]."),
    depths: str | None = typer.Option(None, help="Needle depths (%) of niah, comma-separated "
                                      "[default: 0,25,50,75,100]."),
    samples_per_length: int | None = typer.Option(None, help="Synthetic samples per length [default: 4]."),
    num_needles: int | None = typer.Option(None, help="niah: use only the first N evaluation needles "
                                           "[default: all 3]."),
    template: str | None = typer.Option(None, help="Prompt template: chat (the tokenizer's chat template), "
                                        "raw (no template) or llama2 ([INST] ... [/INST]) [default: chat for "
                                        "niah and synthetic; raw for LongBench and LooGLE, as the authors ran "
                                        "Llama-3 and Mistral]."),
    max_length: int | None = typer.Option(None, help="LongBench/LooGLE: middle-truncate the whole prompt to "
                                          "this many tokens (the authors: 7500 for Llama-3-8B-Instruct, 31500 "
                                          "for Mistral-7B-Instruct-v0.2)."),
    dump_prompts: Path | None = typer.Option(None, "--dump-prompts", help="Write the rendered prompts (after "
                                             "truncation) and generation settings as JSONL to this file, "
                                             "loading only the tokenizer, and exit."),
    limit: int | None = typer.Option(None, help="Evaluate only the first N samples."),
    answer_prefix: str = typer.Option("", help="Text that opens every answer (kvpress/RULER convention), "
                                      "placed after the generation prompt, inside the observation window; "
                                      "predictions exclude it."),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache", help=PREFIX_HELP),
    prefix_max_tokens: int | None = typer.Option(None, help=PREFIX_MAX_HELP),
    device: str = typer.Option("auto", help="Device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."),
    dtype: str | None = typer.Option(None, help="float32, bfloat16, float16 [default: float32 on CPU, bfloat16 "
                                     "on CUDA]."),
) -> None:
    """Compare KV compression methods × budgets on long-context tasks (each sample prefilled once)."""
    from headscore.core.prefix_cache import PrefixOptions
    from headscore.evaluation.evaluate import EvaluateOptions, evaluate, prepare_evaluate, summary_table
    from headscore.evaluation.evaluate import dump_prompts as write_prompts

    scores = {key: str(path) for key, path in (("retrieval", scores_r), ("r2", scores_r2)) if path is not None}
    options = EvaluateOptions(methods=[m.strip() for m in methods.split(",") if m.strip()],
                              budgets=_number_list([budgets], int, "--budgets"), scores=scores, window=window,
                              kernel=kernel, alpha=alpha, betas=_number_list([beta], float, "--beta"),
                              temp=temp, granularity=granularity, pyramid_beta=pyramid_beta,
                              answer_prefix=answer_prefix)
    task_options = {"lengths": _number_list([lengths], int, "--lengths") if lengths else None,
                    "depths": _number_list([depths], float, "--depths") if depths else None,
                    "samples_per_length": samples_per_length, "max_length": max_length, "template": template,
                    "num_needles": num_needles}
    prefix = PrefixOptions(enabled=prefix_cache, max_tokens=prefix_max_tokens)
    if dump_prompts is not None:
        count = write_prompts(model, tasks, dump_prompts, task_options=task_options, limit=limit,
                              answer_prefix=answer_prefix)
        stdout.print(f"{count} prompts -> {dump_prompts}")
        return
    setup = prepare_evaluate(model, tasks, options=options, task_options=task_options, device=device, dtype=dtype,
                             limit=limit)
    with progress_bar() as bar:
        task = bar.add_task("evaluating samples", total=None)
        result = evaluate(setup.model, setup.tokenizer, setup.samples, out, options=options, model_name=model,
                          task_settings=setup.task_settings, prefix=prefix,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    if result is None:  # a rank other than 0 under torchrun
        return
    table = Table(title=f"{result.samples} samples -> {out}")
    header, rows = summary_table(result.summary)
    for column in header:
        table.add_column(column, justify="right")
    for cells in rows:
        table.add_row(*cells)
    stdout.print(table)
    stdout.print(f"figures: {', '.join(p.name for p in result.figures)}")


@app.command("tune")
def tune_command(
    out: Path = typer.Option(Path("tune"), "--out", "-o", help="Output folder: tuned_budgets.json (+ one "
                             "tuned_budgets_<method>_B<budget>.json per budget), validation.csv, "
                             "validation_vs_beta.png, comparison.csv, tune.md, metadata.json; validation/ and "
                             "test/ hold the evaluate runs (their journals make reruns resume)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    tasks: str = typer.Option("niah,synthetic", help="Comma-separated tasks, as in evaluate."),
    scores_r: Path | None = typer.Option(None, "--scores-r", help="Retrieval head scores: tunes headkv-r."),
    scores_r2: Path | None = typer.Option(None, "--scores-r2", help="Retrieval-reasoning head scores: tunes "
                                          "headkv-r2."),
    budgets: str = typer.Option("64,128", help="KV sizes (average entries per head, window included); β is "
                                "chosen for each."),
    betas: str = typer.Option(",".join(f"{b:g}" for b in (1.005, 1.01, 1.1, 1.2, 1.5, 2.0)),
                              help="β grid evaluated on the validation split (each > 1; larger = smaller "
                              "shared pool)."),
    default_beta: float = typer.Option(1.01, help="The β the tuned one is compared with on the test split."),
    baselines: str = typer.Option("snapkv,ada-snapkv", help="Methods also run on the test split "
                                  "(comma-separated; empty for none)."),
    val_fraction: float = typer.Option(0.5, help="Share of each task's samples used for validation."),
    seed: int = typer.Option(0, help="Seed of the validation/test split."),
    temp: float = typer.Option(1.0, help="HeadKV importance temperature."),
    window: int = typer.Option(8, help="Observation window of SnapKV selection."),
    kernel: int = typer.Option(7, help="Max-pool kernel of SnapKV selection."),
    alpha: float = typer.Option(0.2, help="Ada-SnapKV floor: every head keeps at least alpha × budget."),
    granularity: str | None = typer.Option(None, help="HeadKV budgets per kv head [default under GQA] or query "
                                           "head."),
    lengths: str | None = typer.Option(None, help="Prompt lengths (tokens) of niah and synthetic tasks, "
                                       "comma-separated [default: 1000,2000,4000]."),
    depths: str | None = typer.Option(None, help="Needle depths (%) of niah, comma-separated "
                                      "[default: 0,25,50,75,100]."),
    samples_per_length: int | None = typer.Option(None, help="Synthetic samples per length [default: 4]."),
    num_needles: int | None = typer.Option(None, help="niah: use only the first N evaluation needles."),
    template: str = typer.Option("chat", help="Prompt template of every task: chat or raw."),
    max_length: int | None = typer.Option(None, help="LongBench: middle-truncate contexts to this many "
                                          "tokens."),
    limit: int | None = typer.Option(None, help="Use only the first N samples (before the split)."),
    device: str = typer.Option("auto", help="Device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."),
    dtype: str | None = typer.Option(None, help="float32, bfloat16, float16 [default: float32 on CPU, bfloat16 "
                                     "on CUDA]."),
) -> None:
    """Choose HeadKV's β per budget on a validation split, then compare it with the default β and the
    baselines on the held-out test split."""
    from headscore.evaluation.tune import TuneOptions, run_tune

    scores = {key: str(path) for key, path in (("retrieval", scores_r), ("r2", scores_r2)) if path is not None}
    methods = [m for m, key in (("headkv-r", "retrieval"), ("headkv-r2", "r2")) if key in scores]
    options = TuneOptions(methods=methods, budgets=_number_list([budgets], int, "--budgets"), scores=scores,
                          betas=_number_list([betas], float, "--betas"), default_beta=default_beta,
                          baselines=[b.strip() for b in baselines.split(",") if b.strip()],
                          val_fraction=val_fraction, seed=seed, window=window, kernel=kernel, alpha=alpha,
                          temp=temp, granularity=granularity)
    task_options = {"lengths": _number_list([lengths], int, "--lengths") if lengths else None,
                    "depths": _number_list([depths], float, "--depths") if depths else None,
                    "samples_per_length": samples_per_length, "max_length": max_length, "template": template,
                    "num_needles": num_needles}
    if not methods:
        raise HeadscoreError("tune: give --scores-r2 and/or --scores-r (the head scores whose β is tuned)")
    with progress_bar() as bar:
        task = bar.add_task("validation samples", total=None)

        def advance(phase: str, done: int, total: int) -> None:
            bar.update(task, description=f"{phase} samples", completed=done, total=total)

        result = run_tune(model, tasks, out, options=options, task_options=task_options, device=device,
                          dtype=dtype, limit=limit, progress=advance)
    if result is None:  # a rank other than 0 under a launcher: rank 0 reports
        return
    table = Table(title=f"validation score vs β ({result.val_samples} validation samples)")
    for column in ("method", "budget", *[f"β={b:g}" for b in options.betas]):
        table.add_column(column, justify="right")
    for method in options.methods:
        for budget in options.budgets:
            rows = [r for r in result.validation if r["method"] == method and r["budget"] == budget]
            table.add_row(method, str(budget), *[f"[bold]{r['score']:.3f}[/]" if r["chosen"] else f"{r['score']:.3f}"
                                                 for r in rows])
    stdout.print(table)
    test = Table(title=f"held-out test split ({result.test_samples} samples)")
    for column in ("method", "budget", "chosen β", "tuned", f"β={options.default_beta:g}", "gain",
                   *options.baselines):
        test.add_column(column, justify="right")
    for row in result.comparison:
        test.add_row(row["method"], str(row["budget"]), f"{row['chosen_beta']:g}", f"{row['test_tuned']:.3f}",
                     f"{row['test_default']:.3f}", f"{row['test_gain']:+.3f}",
                     *[f"{row[f'test[{b}]']:.3f}" for b in options.baselines])
    stdout.print(test)
    stdout.print(f"files: {', '.join(str(p) for p in result.files)}")


@app.command("ablate")
def ablate_command(
    scores: Path = typer.Option(..., "--scores", "-s", help="Head-score file (HeadKV format) for --model."),
    out: Path = typer.Option(Path("ablation"), "--out", "-o", help="Output folder: ablation.csv, "
                             "ablation.png, predictions.jsonl, metadata.json (each written atomically)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    ks: str = typer.Option("4,16,64", help="Numbers of heads to remove, comma-separated."),
    seeds: str = typer.Option("0,1,2", help="Seeds of the random-heads condition, comma-separated "
                              "(one run per seed and k)."),
    conditions: str = typer.Option("top,random,lowest", help="Which heads to remove: top (highest "
                                   "importance), random, lowest; comma-separated."),
    lengths: str = typer.Option("1000,2000", help="NIAH prompt lengths in tokens, comma-separated."),
    depths: str = typer.Option("0,50,100", help="NIAH needle depths in %, comma-separated."),
    needles: Path | None = typer.Option(None, help="Needle JSONL file [default: needles/eval.jsonl, "
                                        "3 needles kept apart from the scoring needles]."),
    num_needles: int | None = typer.Option(None, help="Use only the first N needles."),
    haystack: str | None = typer.Option(None, help="Haystack (as in build-needles) [default: paul-graham]."),
    template: str = typer.Option("chat", help="Prompt template: chat (default; instruct models answer "
                                 "nothing to raw prompts) or raw (as in build-needles)."),
    max_new_tokens: int = typer.Option(32, help="Greedy tokens generated per answer."),
    device: str = typer.Option("auto", help="Device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16 [default: float32 on CPU, "
                                     "bfloat16 on CUDA]."),
) -> None:
    """Check the head scores: NIAH accuracy with the top-k, k random or the k lowest-scoring heads removed."""
    from headscore.evaluation import ablate

    ks_list = _number_list([ks], int, "--ks")
    seed_list = _number_list([seeds], int, "--seeds")
    length_list = _number_list([lengths], int, "--lengths")
    depth_list = _number_list([depths], float, "--depths")
    condition_list = [c.strip() for c in conditions.split(",") if c.strip()]
    setup = ablate.prepare(model, scores, ks=ks_list, seeds=seed_list, conditions=condition_list,
                           lengths=length_list, depths=depth_list, needles=str(needles) if needles else None,
                           num_needles=num_needles, haystack=haystack, template=template,
                           max_new_tokens=max_new_tokens, device=device, dtype=dtype)
    with progress_bar() as bar:
        task = bar.add_task(f"ablating ({len(setup.plan)} conditions × {len(setup.samples)} samples)",
                            total=setup.total)
        rows, paths = ablate.execute(setup, out, progress=lambda: bar.advance(task))
    table = Table(title=f"NIAH accuracy with heads removed ({len(setup.samples)} samples) -> {out}")
    for column in ("condition", "k", "seed", "accuracy", "n"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["condition"], str(row["k"]), "-" if row["seed"] is None else str(row["seed"]),
                      f"{row['accuracy']:.3f}", str(row["n"]))
    stdout.print(table)
    stdout.print("accuracy = mean ROUGE-1 recall of the needle's fact; " + ", ".join(str(p) for p in
                                                                                      paths.values()))


@app.command("compare")
def compare_command(
    a: Path = typer.Argument(..., help="Head-score file A (HeadKV format)."),
    b: Path | None = typer.Argument(None, help="Head-score file B, of A's layers × heads (not with "
                                    "--bootstrap)."),
    budget: int = typer.Option(128, help="KV size at which the budget matrices are compared."),
    beta: float = typer.Option(1.01, help="HeadKV β of the compared budget matrices."),
    window: int = typer.Option(8, help="Observation window (excluded from the budget matrices)."),
    kv_heads: int | None = typer.Option(None, "--kv-heads", help="KV heads per layer: budgets per KV head "
                                        "(GQA) [default: one per query head]."),
    model: str | None = typer.Option(None, "--model", "-m", help="Read the KV heads from this model's config "
                                     "(its layers × heads must match the files)."),
    bootstrap: bool = typer.Option(False, "--bootstrap", help="Stability of A alone: resample its trials at "
                                   "n = 5, 10, 20, 50, ... up to all."),
    draws: int = typer.Option(200, help="Bootstrap draws per n."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    k: int = typer.Option(20, help="Bootstrap: top-k heads whose overlap is measured."),
    overlap: float = typer.Option(0.9, help="Stability criterion: top-k overlap at least this ..."),
    share: float = typer.Option(0.95, help="... in at least this share of the draws."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for machines) instead of tables."),
    plot: Path | None = typer.Option(None, help="Figure (.png/.svg/.pdf): the importance scatter, or with "
                                     "--bootstrap the stability vs trials."),
) -> None:
    """Agreement of two head-score files (rank correlation, top-k overlap, budget distance), or with
    --bootstrap how many trials a stable head ranking needs."""
    import json

    from headscore.evaluation.compare import run_bootstrap, run_compare

    if bootstrap:
        if b is not None:
            raise HeadscoreError("compare --bootstrap takes one head-score file")
        stability = run_bootstrap(a, budget=budget, beta=beta, window=window, kv_heads=kv_heads, model=model,
                                  draws=draws, seed=seed, k=k, overlap=overlap, share=share, plot=plot)
        if as_json:
            stdout.print_json(json.dumps(stability.to_dict()))
            return
        table = Table(title=f"{a}: {stability.trials} trials, {draws} draws per n (seed {seed}), "
                      f"budgets B={budget} β={beta:g} per {stability.granularity} head")
        for column in ("trials n", f"top-{k} overlap mean", "5th pct", f"share ≥ {overlap:g}",
                       "budget L1 mean", "95th pct"):
            table.add_column(column, justify="right")
        for row in stability.rows:
            table.add_row(str(row["trials"]), f"{row['overlap_mean']:.3f}", f"{row['overlap_p05']:.3f}",
                          f"{row['share_stable']:.1%}", f"{row['l1_mean']:.3f}", f"{row['l1_p95']:.3f}")
        stdout.print(table)
        stdout.print(f"stable (top-{k} overlap ≥ {overlap:g} in ≥ {share:.0%} of draws) at "
                     + (f"{stability.stable_at} trials" if stability.stable_at else
                        f"no n up to {stability.trials} trials"))
        return
    if b is None:
        raise HeadscoreError("compare needs two head-score files (or one with --bootstrap)")
    comparison = run_compare(a, b, budget=budget, beta=beta, window=window, kv_heads=kv_heads, model=model,
                             plot=plot)
    if as_json:
        stdout.print_json(json.dumps(comparison.to_dict()))
        return
    table = Table(title=f"A={a} ({comparison.trials_a} trials) vs B={b} ({comparison.trials_b} trials): "
                  f"{comparison.layers} layers × {comparison.query_heads} heads")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("Spearman ρ (importance)", f"{comparison.spearman:.3f}")
    table.add_row("Kendall τ-b (importance)", f"{comparison.kendall:.3f}")
    for size, value in comparison.overlap.items():
        table.add_row(f"top-{size} overlap", f"{value:.2f}")
    table.add_row(f"budget L1 / total (B={budget}, β={beta:g}, per {comparison.granularity} head)",
                  f"{comparison.budget_l1:.3f}")
    stdout.print(table)
    if plot is not None:
        stdout.print(f"figure -> {plot}")
