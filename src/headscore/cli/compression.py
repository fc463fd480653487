"""Commands that allocate budgets and compress one prompt: allocate, compress."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from headscore.cli.app import Alias, command, number_list, one_number, progress_bar, stdout
from headscore.cli.options import (
    MODEL_HELP,
    AnswerPrefix,
    BetasOption,
    BudgetsOption,
    Compensation,
    Device,
    DType,
    Granularity,
    Model,
    PyramidBeta,
    Temp,
    Template,
    Window,
    fidelity_options,
    methods_help,
    option_values,
    press_parameters,
    uses,
)
from headscore.core.assets import DEFAULT_MODEL
from headscore.core.defaults import BETA, BUDGET, PYRAMID_BETA, TEMP, TEMPLATE, WINDOW


@command("allocate", aliases={"--method": Alias("--allocation"), "--budget": Alias("--budgets"),
                              "--beta": Alias("--betas")})
def allocate_command(
    scores: Annotated[Path | None, typer.Option("--scores", "-s", help="Head-score file (HeadKV format), needed "
                                                "by --allocation headkv.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Budgets file (written atomically). A sweep writes one "
                                      "file holding every combination (see --split).")] = Path("budgets.json"),
    allocation: Annotated[str, typer.Option("--allocation", help="Budget rule: headkv (shared pool by head "
                                            "score), uniform (SnapKV: every head B - w) or pyramid (PyramidKV: "
                                            "per-layer budgets falling linearly).")] = "headkv",
    budgets: BudgetsOption = option_values(BUDGET),
    betas: BetasOption = option_values(BETA),
    temp: Temp = TEMP,
    window: Window = WINDOW,
    pyramid_beta: PyramidBeta = PYRAMID_BETA,
    granularity: Granularity = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP + " Only its config is read "
                                              "(geometry). Default: the geometry in the metadata.json beside "
                                              "--scores, else the score file's layer-head keys (add --kv-heads "
                                              f"for --granularity kv), else {DEFAULT_MODEL}.")] = None,
    layers: Annotated[int | None, typer.Option("--layers", help="Stated geometry: number of layers (with "
                                               "--heads).")] = None,
    heads: Annotated[int | None, typer.Option("--heads", help="Stated geometry: query heads per layer.")] = None,
    kv_heads: Annotated[int | None, typer.Option("--kv-heads", help="Stated geometry: KV heads per layer "
                                                 "[default: --heads]; alone, with the layers × heads of "
                                                 "--scores.")] = None,
    split: Annotated[bool, typer.Option("--split", help="For a sweep, write one file per combination "
                                        "(OUT_B128_beta1.01.json) instead of one file holding them all.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a heatmap of the budgets (.png, .svg or .pdf; "
                                              "one per combination in a sweep, named like --split).")] = None,
    top: Annotated[int, typer.Option("--top", help="Heads listed in the summary.")] = 10,
    memory: Annotated[str | None, typer.Option("--memory", help="A memory target instead of --budgets (2GiB, "
                                               "512MiB, 1.5GB, bytes): the largest KV size whose cache fits it, "
                                               "window and generated tokens included (needs --context and the "
                                               "model's head dimension: --model).")] = None,
    context: Annotated[int | None, typer.Option("--context", help="--memory: prompt tokens per sequence.")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="--memory: sequences held at once.")] = 1,
    cache_dtype: Annotated[str, typer.Option("--dtype", help="--memory: the cache's dtype (float32, bfloat16, "
                                             "float16).")] = "bfloat16",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=0, help="--memory: generated tokens per "
                                                "sequence, held by every KV head.")] = 0,
) -> None:
    """Turn head scores into a KV budget for every head (HeadKV), or build the uniform / pyramid baselines; with
    --memory, the largest budgets whose cache fits a memory target."""
    from headscore.cli.geometry import resolve_geometry
    from headscore.compression.allocation import allocate_sweep
    from headscore.compression.budget_summary import summarize
    from headscore.compression.budgets_file import write_allocations
    from headscore.compression.memory import MemoryTarget, memory_budgets, parse_bytes
    from headscore.core.errors import HeadscoreError
    from headscore.core.plots import figure_format
    from headscore.scoring.head_scores import read_head_scores

    budgets_list = number_list(budgets, int, "--budgets")
    beta_list = number_list(betas, float, "--betas")
    if plot is not None:
        figure_format(plot)
    geometry, origin = resolve_geometry(model=model, layers=layers, heads=heads, kv_heads=kv_heads,
                                        scores_path=scores, default_model=DEFAULT_MODEL, granularity=granularity)
    head_scores = None
    if scores is not None:
        head_scores = read_head_scores(scores, geometry.layers, geometry.query_heads)
    if memory is not None:
        if context is None:
            raise HeadscoreError("allocate --memory needs --context (prompt tokens per sequence)")
        target = MemoryTarget(parse_bytes(memory), context, batch, cache_dtype, max_new_tokens)
        results, held = [], []
        for beta in dict.fromkeys(beta_list if allocation == "headkv" else beta_list[:1]):
            fitted, size = memory_budgets(allocation, geometry, target, window=window, granularity=granularity,
                                          beta=beta, temp=temp, scores=head_scores, pyramid_beta=pyramid_beta)
            fitted.memory = {**target.to_dict(), "bytes_held": size}
            results.append(fitted)
            held.append(size)
        for fitted, size in zip(results, held, strict=True):
            stdout.print(f"memory {target.memory:,} B: KV size {fitted.budget} per head, {size:,} B held "
                         f"({size / target.memory:.1%} of the target)")
    else:
        results = allocate_sweep(allocation, geometry, budgets_list, beta_list, window=window, temp=temp,
                                 granularity=granularity, scores=head_scores, pyramid_beta=pyramid_beta)
    # --split splits a sweep; a single combination keeps the --out name
    written = write_allocations(results, out, split=split and len(results) > 1, plot=plot)

    first = results[0]
    unit = "KV head" if first.granularity == "kv" else "query head"
    table = Table(title=f"{allocation} budgets per {unit}: {geometry.layers} layers × {first.heads} heads "
                  f"(geometry from {origin}) -> {', '.join(map(str, written))}")
    for column in ("B", "beta", "total entries", "vs uniform", "vs per-query-head", "min", "median", "max",
                   "pool", f"top-{top} pool share"):
        table.add_column(column, justify="right")
    for result in results:
        summary = summarize(result, top)
        total = summary["total_entries"]
        shown_beta = (f"{result.beta:g}" if result.beta is not None
                      else f"p={result.pyramid_beta:g}" if result.pyramid_beta is not None else "-")
        table.add_row(str(result.budget), shown_beta, f"{total:,}",
                      f"{total / summary['uniform_entries']:.4f}",
                      f"{total / summary['query_head_entries']:.4f}",
                      str(summary["min"]), str(summary["median"]), str(summary["max"]),
                      "-" if summary["pool_entries"] is None else f"{summary['pool_entries']:,}",
                      "-" if summary["top_pool_share"] is None else f"{summary['top_pool_share']:.1%}")
    stdout.print(table)
    if len(results) == 1 and first.pool_entries is not None:  # HeadKV's shared pool
        heads_table = Table(title=f"top {top} of {first.layers * first.heads} heads "
                            "(budgets exclude the window)")
        for column in ("layer", unit, "budget", "share of pool"):
            heads_table.add_column(column, justify="right")
        for row in summarize(first, top)["top"]:
            heads_table.add_row(str(row["layer"]), str(row["head"]), str(row["budget"]),
                                f"{row['pool_share']:.2%}")
        stdout.print(heads_table)
    stdout.print(f"window={window} temp={'-' if first.temp is None else first.temp} "
                 f"granularity={first.granularity} scores={first.source_scores or '-'}")


@command("compress", aliases={"--budget": Alias("--budgets"), "--beta": Alias("--betas")}, epilog=methods_help)
@uses(press_parameters, fidelity_options)
def compress_command(
    context_file: Annotated[Path, typer.Option("--context-file", "-c", help="Text file holding the context.")],
    question: Annotated[str, typer.Option("--question", "-q", help="The question asked about the context.")],
    model: Model = DEFAULT_MODEL,
    method: Annotated[str, typer.Option("--method", help="Method: SCORER[+MODIFIER][@ALLOCATION] (listed below; "
                                        "@headkv takes --scores FILE or --budget-file), full, snapkv, streaming, "
                                        "pyramidkv, ada-snapkv, headkv, razor.")] = "headkv",
    scores: Annotated[Path | None, typer.Option("--scores", "-s", help="headkv: head-score file (HeadKV "
                                                "format); budgets are allocated on the fly with --budgets / "
                                                "--betas. razor: the scores ranking its full-cache heads (retrieval "
                                                "scores).")] = None,
    budget_file: Annotated[Path | None, typer.Option("--budget-file", help="headkv: a budgets file from "
                                                     "`headscore allocate` (instead of --scores; its window wins "
                                                     "over --window).")] = None,
    budgets: BudgetsOption = option_values(BUDGET),
    ratio: Annotated[float | None, typer.Option("--ratio", help="Compression ratio instead of --budgets: the "
                                                "fraction of the prompt's KV entries removed, per layer.")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="A memory target instead of --budgets (2GiB, "
                                               "512MiB, bytes): the largest KV size whose cache of this prompt "
                                               "and --max-new-tokens fits it.")] = None,
    betas: BetasOption = option_values(BETA),
    press_parameters: Any = None,
    fidelity_options: Any = None,
    full_heads: Annotated[int | None, typer.Option("--full-heads", help="razor: k, the heads keeping their full "
                                                   "cache [default: from --budgets: round((B - sinks - window) x "
                                                   "L x H / prompt length)].")] = None,
    compensation: Compensation = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Greedy tokens generated at most.")] = 64,
    template: Template = TEMPLATE,
    device: Device = "auto",
    dtype: DType = None,
    answer_prefix: AnswerPrefix = "",
    report: Annotated[Path | None, typer.Option("--report", help="Also write the KV report and the run's "
                                                "metadata as JSON to this file (atomically).")] = None,
) -> None:
    """Answer a question about a context on a head-level compressed KV cache; print the answer and a KV
    report."""
    from headscore.compression.generation import compress_files
    from headscore.core.files import write_json

    budgets, budget_file = _budgets_or_file(budgets, budget_file)
    budget, beta = one_number(budgets, int, "--budgets"), one_number(betas, float, "--betas")
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"{method}", total=None)
        result, metadata = compress_files(
            model, context_file, question, method=method, max_new_tokens=max_new_tokens, template=template,
            answer_prefix=answer_prefix, device=device, dtype=dtype,
            progress=lambda stage: bar.update(task, description=stage), memory=memory,
            settings={"budget": budget, "ratio": ratio, "beta": beta, **press_parameters, **fidelity_options.params(),
                      "full_heads": full_heads, "compensation": compensation,
                      "scores": str(scores) if scores else None, "budgets": str(budget_file) if budget_file else None})
    stdout.print(result.answer, markup=False, highlight=False)
    kv = result.report
    table = Table(title=f"KV report: {kv.method}, {kv.context_tokens} context tokens, "
                  f"{kv.generated_tokens} generated")
    table.add_column("layer", justify="right")
    table.add_column("entries kept (Σ heads)", justify="right")
    table.add_column("per head", justify="left")
    for layer, row in enumerate(kv.kept):
        table.add_row(str(layer), str(sum(row)), " ".join(str(v) for v in row))
    stdout.print(table)
    summary = Table(show_header=False)
    summary.add_row("KV bytes (compressed)", f"{kv.kv_bytes:,}")
    summary.add_row("KV bytes (full cache)", f"{kv.full_kv_bytes:,}")
    summary.add_row("ratio", f"{kv.ratio:.4f}")
    if "memory_target" in metadata:
        target = metadata["memory_target"]
        summary.add_row("memory target", f"{target['memory']:,} ({target['dtype']}; KV size {target['budget']}, "
                        f"{target['bytes_held']:,} bytes planned)")
    if "full_heads_rule" in kv.press:  # razor: k and where it came from
        summary.add_row("full-cache heads (k)", f"{kv.press['full_heads']} ({kv.press['full_heads_rule']})")
    summary.add_row("index bytes", f"{kv.index_bytes:,}")
    summary.add_row("prefill", f"{kv.prefill_seconds:.3f} s")
    per_token = kv.decode_per_token
    summary.add_row("decode per token", "-" if per_token is None else f"{per_token * 1000:.1f} ms")
    stdout.print(summary)
    if report:
        write_json(report, {"answer": result.answer, "tokens": result.tokens, "report": kv.to_dict(),
                            "metadata": metadata})
        stdout.print(f"report -> {report}")


def _budgets_or_file(budgets: list[str], budget_file: Path | None) -> tuple[list[str], Path | None]:
    """`compress --budgets FILE` (the old spelling of --budget-file) still works for one release."""
    if len(budgets) == 1 and Path(budgets[0]).is_file() and not budgets[0].strip().isdigit():
        typer.echo("headscore: warning: compress --budgets FILE is deprecated and goes in the next release; use "
                   "--budget-file FILE (--budgets is the KV size)", err=True)
        return [str(BUDGET)], budget_file or Path(budgets[0])
    return budgets, budget_file
