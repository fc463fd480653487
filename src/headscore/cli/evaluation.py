"""Commands that evaluate compression and check head scores: evaluate, tune, ablate, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from headscore.cli.app import Alias, command, names, number_list, one_number, progress_bar, stdout
from headscore.cli.options import (
    AnswerPrefix,
    BatchSize,
    BetasOption,
    BudgetsOption,
    Compensation,
    DecodeBatch,
    Device,
    DType,
    Model,
    RatiosOption,
    Template,
    Window,
    fidelity_options,
    methods_help,
    option_values,
    prefix_options,
    press_parameters,
    run_setup,
    score_alias,
    task_options,
    uses,
)
from headscore.core.assets import DEFAULT_MODEL
from headscore.core.defaults import (
    BETA,
    BETA_GRID,
    BUDGET,
    EVALUATE_BUDGETS,
    EVALUATE_METHODS,
    TEMPLATE,
    TUNE_BASELINES,
    TUNE_BUDGETS,
    WINDOW,
)
from headscore.core.errors import HeadscoreError

TASK_TEMPLATE_HELP = ("Prompt template: chat (the tokenizer's chat template), raw (no template) or llama2 ([INST] "
                      "... [/INST]) [default: chat for niah and synthetic; raw for LongBench and LooGLE, as the "
                      "authors ran Llama-3 and Mistral].")
SCORE_ALIASES = {f"--scores-{name}": Alias("--scores", score_alias(name), f"--scores {name}=FILE")
                 for name in ("r", "r2")}  # the old --scores-r / --scores-r2


@command("evaluate", aliases={**SCORE_ALIASES, "--beta": Alias("--betas")}, epilog=methods_help)
@uses(run_setup, press_parameters, fidelity_options, task_options, prefix_options)
def evaluate_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: results.csv, summary.md, metadata.json, "
                                      "NIAH heatmaps, score_vs_kv.png; journal.jsonl makes reruns resume.")]
    = Path("evaluation"),
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods, SCORER[+MODIFIER][@ALLOCATION] "
                                         "(listed below), the aliases snapkv, streaming, pyramidkv, ada-snapkv, "
                                         "headkv-NAME (HeadKV on --scores NAME=FILE), full, razor (k per prompt at "
                                         "each budget's KV) and razor-kN (k = N full-cache heads, run once), both "
                                         "on --scores r=FILE.")] = ",".join(EVALUATE_METHODS),
    budgets: BudgetsOption = option_values(*EVALUATE_BUDGETS),
    ratios: RatiosOption = None,
    betas: BetasOption = option_values(BETA),
    run_setup: Any = None,
    press_parameters: Any = None,
    fidelity_options: Any = None,
    task_options: Any = None,
    template: Annotated[str | None, typer.Option("--template", help=TASK_TEMPLATE_HELP)] = None,
    dump_prompts: Annotated[Path | None, typer.Option("--dump-prompts", help="Write the rendered prompts (after "
                                                      "truncation) and generation settings as JSONL to this file, "
                                                      "loading only the tokenizer, and exit.")] = None,
    answer_prefix: AnswerPrefix = "",
    question: Annotated[str, typer.Option("--question", help="in-prompt: the whole prompt is prefilled and "
                                          "compressed (the paper's protocol); after: only the context before the "
                                          "question is, then the question and answer prefix are prefilled on the "
                                          "compressed cache (query-agnostic compression: RULER's leaderboard, one "
                                          "compressed document for many questions).")] = "in-prompt",
    prefix_options: Any = None,
    decode_batch: DecodeBatch = None,
    compensation: Compensation = False,
    batch_size: BatchSize = 1,
) -> None:
    """Compare KV compression methods × budgets on long-context tasks (each sample prefilled once); several
    --budgets and --betas make a sweep (full runs once)."""
    from headscore.evaluation.evaluate import EvaluateOptions, evaluate, prepare_evaluate, summary_table
    from headscore.evaluation.evaluate import dump_prompts as write_prompts

    run = run_setup
    ratio_list = number_list(ratios, float, "--ratios") if ratios else []
    options = EvaluateOptions(methods=names(methods),
                              budgets=[] if ratio_list and budgets == option_values(*EVALUATE_BUDGETS)
                              else number_list(budgets, int, "--budgets"), ratios=ratio_list,
                              scores=run.scores, betas=number_list(betas, float, "--betas"),
                              answer_prefix=answer_prefix, question=question,
                              params={**press_parameters, **fidelity_options.params(), "compensation": compensation})
    tasks = {**task_options, "template": template}
    if dump_prompts is not None:
        count = write_prompts(run.model, run.tasks, dump_prompts, task_options=tasks, limit=run.limit,
                              answer_prefix=answer_prefix)
        stdout.print(f"{count} prompts -> {dump_prompts}")
        return
    setup = prepare_evaluate(run.model, run.tasks, options=options, task_options=tasks, device=run.device,
                             dtype=run.dtype, limit=run.limit)
    with progress_bar() as bar:
        task = bar.add_task("evaluating samples", total=None)
        result = evaluate(setup.model, setup.tokenizer, setup.samples, out, options=options, model_name=run.model,
                          task_settings=setup.task_settings, prefix=prefix_options, decode_batch=decode_batch,
                          batch_size=batch_size,
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


@command("tune", aliases=SCORE_ALIASES, epilog=methods_help)
@uses(run_setup, press_parameters, fidelity_options, task_options)
def tune_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: tuned_budgets.json (+ one "
                                      "tuned_budgets_<method>_B<budget>.json per budget), validation.csv, "
                                      "validation_vs_beta.png, comparison.csv, tune.md, metadata.json; "
                                      "validation/ and test/ hold the evaluate runs (their journals make reruns "
                                      "resume).")] = Path("tune"),
    budgets: BudgetsOption = option_values(*TUNE_BUDGETS),
    betas: Annotated[list[str], typer.Option("--betas", help="The β grid evaluated on the validation split (each "
                                             "> 1; larger = smaller shared pool); repeat or comma-separate.")]
    = option_values(*BETA_GRID),
    default_beta: Annotated[float, typer.Option("--default-beta", help="The β the tuned one is compared with on "
                                                "the test split.")] = BETA,
    baselines: Annotated[str, typer.Option("--baselines", help="Methods also run on the test split "
                                           "(comma-separated; empty for none; razor and razor-kN need --scores "
                                           "r=FILE).")] = ",".join(TUNE_BASELINES),
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of each task's samples used for "
                                                "validation.")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the validation/test split.")] = 0,
    methods: Annotated[str | None, typer.Option("--methods", help="The methods whose β is tuned: headkv-NAME or "
                                                "SCORER@headkv-NAME, comma-separated [default: headkv-NAME for "
                                                "each --scores NAME=FILE].")] = None,
    run_setup: Any = None,
    press_parameters: Any = None,
    fidelity_options: Any = None,
    task_options: Any = None,
    template: Template = TEMPLATE,
    decode_batch: DecodeBatch = None,
    compensation: Compensation = False,
    batch_size: BatchSize = 1,
) -> None:
    """Choose HeadKV's β per budget on a validation split, then compare it with the default β and the
    baselines on the held-out test split: one headkv-NAME method per --scores NAME=FILE."""
    from headscore.evaluation.tune import TuneOptions, run_tune

    run = run_setup
    if not run.scores:
        raise HeadscoreError("tune: give --scores NAME=FILE (e.g. --scores r2=FILE; the head scores whose β is "
                             "tuned)")
    options = TuneOptions(methods=names(methods) if methods else [f"headkv-{name}" for name in run.scores],
                          budgets=number_list(budgets, int, "--budgets"), scores=run.scores,
                          betas=number_list(betas, float, "--betas"), default_beta=default_beta,
                          baselines=names(baselines), val_fraction=val_fraction, seed=seed,
                          params={**press_parameters, **fidelity_options.params(), "compensation": compensation})
    with progress_bar() as bar:
        task = bar.add_task("validation samples", total=None)

        def advance(phase: str, done: int, total: int) -> None:
            bar.update(task, description=f"{phase} samples", completed=done, total=total)

        result = run_tune(run.model, run.tasks, out, options=options,
                          task_options={**task_options, "template": template}, device=run.device,
                          dtype=run.dtype, limit=run.limit, progress=advance, decode_batch=decode_batch,
                          batch_size=batch_size)
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


@command("ablate")
def ablate_command(
    scores: Path = typer.Option(..., "--scores", "-s", help="Head-score file (HeadKV format) for --model."),
    out: Path = typer.Option(Path("ablation"), "--out", "-o", help="Output folder: ablation.csv, "
                             "ablation.png, predictions.jsonl, metadata.json (each written atomically)."),
    model: Model = DEFAULT_MODEL,
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
    template: Template = TEMPLATE,
    decode_batch: DecodeBatch = None,
    max_new_tokens: int = typer.Option(32, help="Greedy tokens generated per answer."),
    device: Device = "auto",
    dtype: DType = None,
) -> None:
    """Check the head scores: NIAH accuracy with the top-k, k random or the k lowest-scoring heads removed."""
    from headscore.evaluation import ablate

    ks_list = number_list([ks], int, "--ks")
    seed_list = number_list([seeds], int, "--seeds")
    length_list = number_list([lengths], int, "--lengths")
    depth_list = number_list([depths], float, "--depths")
    condition_list = names(conditions)
    setup = ablate.prepare(model, scores, ks=ks_list, seeds=seed_list, conditions=condition_list,
                           lengths=length_list, depths=depth_list, needles=str(needles) if needles else None,
                           num_needles=num_needles, haystack=haystack, template=template,
                           max_new_tokens=max_new_tokens, device=device, dtype=dtype)
    with progress_bar() as bar:
        task = bar.add_task(f"ablating ({len(setup.plan)} conditions × {len(setup.samples)} samples)",
                            total=setup.total)
        rows, paths = ablate.execute(setup, out, progress=lambda: bar.advance(task), decode_batch=decode_batch)
    table = Table(title=f"NIAH accuracy with heads removed ({len(setup.samples)} samples) -> {out}")
    for column in ("condition", "k", "seed", "accuracy", "n"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["condition"], str(row["k"]), "-" if row["seed"] is None else str(row["seed"]),
                      f"{row['accuracy']:.3f}", str(row["n"]))
    stdout.print(table)
    stdout.print("accuracy = mean ROUGE-1 recall of the needle's fact; " + ", ".join(str(p) for p in
                                                                                      paths.values()))


@command("compare", aliases={"--budget": Alias("--budgets"), "--beta": Alias("--betas")})
def compare_command(
    a: Path = typer.Argument(..., help="Head-score file A (HeadKV format)."),
    b: Path | None = typer.Argument(None, help="Head-score file B, of A's layers × heads (not with "
                                    "--bootstrap)."),
    budgets: Annotated[list[str], typer.Option("--budgets", help="KV size B at which the budget matrices are "
                                               "compared (one value).")] = option_values(BUDGET),
    betas: Annotated[list[str], typer.Option("--betas", help="HeadKV β of the compared budget matrices (one "
                                             "value).")] = option_values(BETA),
    window: Window = WINDOW,
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

    budget, beta = one_number(budgets, int, "--budgets"), one_number(betas, float, "--betas")

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
