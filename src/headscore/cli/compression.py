"""Commands that allocate budgets and compress one prompt: allocate, compress."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from headscore.cli.app import (
    MODEL_HELP,
    _number_list,
    app,
    progress_bar,
    stdout,
)
from headscore.core.assets import DEFAULT_MODEL


@app.command("allocate")
def allocate_command(
    scores: Path | None = typer.Option(None, "--scores", "-s", help="Head-score file (HeadKV format), "
                                       "needed by --method headkv."),
    out: Path = typer.Option(Path("budgets.json"), "--out", "-o", help="Budgets file (written atomically). "
                             "A sweep writes one file holding every combination (see --split)."),
    method: str = typer.Option("headkv", help="headkv (shared pool by head score), uniform (SnapKV: every "
                               "head B - w) or pyramid (PyramidKV: per-layer budgets falling linearly)."),
    budget: list[str] = typer.Option(["128"], help="B, the average KV entries per head including the window "
                                     "(the paper's KV size). Repeat or comma-separate for a sweep."),
    beta: list[str] = typer.Option(["1.01"], help="HeadKV pool control, > 1: pool = floor((B-w)/beta) per "
                                   "head, so a LARGER beta gives a SMALLER shared pool. Repeat or "
                                   "comma-separate for a sweep."),
    temp: float = typer.Option(1.0, help="Head importance is raised to this power and renormalized."),
    window: int = typer.Option(8, help="Observation window w: its entries are kept by every head on top of "
                               "its budget."),
    pyramid_beta: float = typer.Option(20.0, help="PyramidKV: the last layer keeps "
                                       "floor((B-w)/pyramid_beta)."),
    granularity: str | None = typer.Option(None, help="kv: one budget per KV head (query-head scores "
                                           "summed over each group) [default under GQA]; query: one per "
                                           "query head (the official code's behaviour)."),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Only its config is read "
                                     "(geometry). Default: the geometry in the metadata.json beside "
                                     f"--scores, else the score file's layer-head keys (add --kv-heads for "
                                     f"--granularity kv), else {DEFAULT_MODEL}."),
    layers: int | None = typer.Option(None, help="Stated geometry: number of layers (with --heads)."),
    heads: int | None = typer.Option(None, help="Stated geometry: query heads per layer."),
    kv_heads: int | None = typer.Option(None, help="Stated geometry: KV heads per layer [default: --heads]; "
                                        "alone, with the layers × heads of --scores."),
    split: bool = typer.Option(False, "--split", help="For a sweep, write one file per combination "
                               "(OUT_B128_beta1.01.json) instead of one file holding them all."),
    plot: Path | None = typer.Option(None, help="Write a heatmap of the budgets (.png, .svg or .pdf; one "
                                     "per combination in a sweep, named like --split)."),
    top: int = typer.Option(10, help="Heads listed in the summary."),
) -> None:
    """Turn head scores into a KV budget for every head (HeadKV), or build the uniform / pyramid baselines."""
    from headscore.cli.geometry import resolve_geometry
    from headscore.compression.allocation import allocate_sweep
    from headscore.compression.budget_summary import summarize
    from headscore.compression.budgets_file import write_allocations
    from headscore.core.plots import figure_format
    from headscore.scoring.head_scores import read_head_scores

    budgets_list = _number_list(budget, int, "--budget")
    betas = _number_list(beta, float, "--beta")
    if plot is not None:
        figure_format(plot)
    geometry, origin = resolve_geometry(model=model, layers=layers, heads=heads, kv_heads=kv_heads,
                                                   scores_path=scores, default_model=DEFAULT_MODEL,
                                                   granularity=granularity)
    head_scores = None
    if scores is not None:
        head_scores = read_head_scores(scores, geometry.layers, geometry.query_heads)
    results = allocate_sweep(method, geometry, budgets_list, betas, window=window, temp=temp,
                                        granularity=granularity, scores=head_scores,
                                        pyramid_beta=pyramid_beta)
    # --split splits a sweep; a single combination keeps the --out name
    written = write_allocations(results, out, split=split and len(results) > 1, plot=plot)

    first = results[0]
    unit = "KV head" if first.granularity == "kv" else "query head"
    table = Table(title=f"{method} budgets per {unit}: {geometry.layers} layers × {first.heads} heads "
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


@app.command("compress")
def compress_command(
    context_file: Path = typer.Option(..., "--context-file", "-c", help="Text file holding the context."),
    question: str = typer.Option(..., "--question", "-q", help="The question asked about the context."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    method: str = typer.Option("headkv", help="full, streaming, snapkv, pyramidkv, ada-snapkv or headkv."),
    scores: Path | None = typer.Option(None, "--scores", "-s", help="headkv: head-score file (HeadKV "
                                          "format); budgets are allocated on the fly with --budget/--beta."),
    budgets: Path | None = typer.Option(None, help="headkv: a budgets file from `headscore allocate` "
                                           "(instead of --scores; its window wins over --window)."),
    budget: int = typer.Option(128, help="Average KV entries per head, observation window included."),
    beta: float = typer.Option(1.01, help="headkv: β of the shared pool (larger β = smaller pool)."),
    temp: float = typer.Option(1.0, help="headkv: temperature on the importance before allocation."),
    granularity: str | None = typer.Option(None, help="headkv with --scores: kv (one budget per KV head) "
                                              "or query (one selection per query head) [default: kv under "
                                              "GQA]."),
    window: int = typer.Option(8, help="Observation window: the last W prompt tokens, kept by every head."),
    kernel: int = typer.Option(7, help="Max-pool width smoothing the window scores."),
    alpha: float = typer.Option(0.2, help="ada-snapkv: per-head floor as a fraction of the budget."),
    sinks: int = typer.Option(4, help="streaming: attention-sink tokens kept at the start."),
    pyramid_beta: float = typer.Option(20.0, help="pyramidkv: how far the last layer's budget falls."),
    max_new_tokens: int = typer.Option(64, help="Greedy tokens generated at most."),
    template: str = typer.Option("chat", help="Prompt template: chat (default; the tokenizer's chat template, "
                                 "instruct models answer) or raw (as in build-needles)."),
    device: str = typer.Option("auto", help="Device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16 [default: float32 on CPU, "
                                        "bfloat16 on CUDA]."),
    answer_prefix: str = typer.Option("", help="Text that opens the answer (kvpress/RULER convention), placed "
                                      "after the generation prompt: it lies in the observation window and "
                                      "the model continues it. The printed answer excludes it."),
    report: Path | None = typer.Option(None, help="Also write the KV report and the run's metadata as "
                                          "JSON to this file (atomically)."),
) -> None:
    """Answer a question about a context on a head-level compressed KV cache; print the answer and a KV
    report."""
    from headscore.compression.generation import compress_files
    from headscore.core.files import write_json

    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"{method}", total=None)
        result, metadata = compress_files(
            model, context_file, question, method=method, max_new_tokens=max_new_tokens, template=template,
            answer_prefix=answer_prefix, device=device, dtype=dtype,
            progress=lambda stage: bar.update(task, description=stage),
            budget=budget, window=window, kernel=kernel, alpha=alpha, sinks=sinks,
            pyramid_beta=pyramid_beta, beta=beta, temp=temp, granularity=granularity,
            scores=str(scores) if scores else None, budgets=str(budgets) if budgets else None)
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
    summary.add_row("index bytes", f"{kv.index_bytes:,}")
    summary.add_row("prefill", f"{kv.prefill_seconds:.3f} s")
    per_token = kv.decode_per_token
    summary.add_row("decode per token", "-" if per_token is None else f"{per_token * 1000:.1f} ms")
    stdout.print(summary)
    if report:
        write_json(report, {"answer": result.answer, "tokens": result.tokens, "report": kv.to_dict(),
                            "metadata": metadata})
        stdout.print(f"report -> {report}")
