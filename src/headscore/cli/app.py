"""The command-line app, its consoles, the progress bar and the option helpers every command group shares."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperCommand

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


@dataclass(frozen=True)
class Alias:
    """An old spelling of an option, accepted for one release: rewritten to `new` (and its value by `value`,
    e.g. `--scores-r F` -> `--scores r=F`) with one deprecation line on stderr."""

    new: str
    value: Callable[[str], str] | None = None
    hint: str | None = None  # how the deprecation line spells the new form (default: `new`)


# help texts built from the library's registries, which import torch: an option's help is a key of this table
# (`library_help`) and its text is built only when a command's help is shown, so `headscore --help` stays fast
LIBRARY_HELP: dict[str, Callable[[], str]] = {}


def library_help(name: str, build: Callable[[], str]) -> str:
    """An option help text that `build()` writes when the help is shown (see `LIBRARY_HELP`)."""
    key = f"@{name}@"
    LIBRARY_HELP[key] = build
    return key


class HeadscoreCommand(TyperCommand):
    """Every headscore command: help texts are shown as written (rich markup escaped: `[/INST]`, `[min, max]`),
    built from the library's registries where they list them (`library_help`), and the deprecated spellings in
    `aliases` are rewritten before parsing."""

    aliases: ClassVar[dict[str, Alias]] = {}
    epilog_from: ClassVar[Any] = None  # () -> str: help text built when --help is shown (a registry's listing)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = escape(self.help) if self.help else self.help
        for param in self.params:
            if getattr(param, "help", None):
                param.help = escape(param.help)  # type: ignore[attr-defined]

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.params:
            build = LIBRARY_HELP.get(getattr(param, "help", None) or "")
            if build is not None:
                param.help = escape(build())  # type: ignore[attr-defined]
        if self.epilog_from is not None and not self.epilog:
            self.epilog = escape(self.epilog_from())
        super().format_help(ctx, formatter)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, rewrite_aliases(self.name or "", args, self.aliases))


def rewrite_aliases(command: str, args: Sequence[str], aliases: dict[str, Alias]) -> list[str]:
    """`args` with every deprecated spelling replaced by its new one; one stderr line per old spelling used."""
    out: list[str] = []
    warned: set[str] = set()
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            out += [arg, *rest]
            break
        old, _, inline = arg.partition("=")
        alias = aliases.get(old)
        if alias is None:
            out.append(arg)
            continue
        if old not in warned:
            warned.add(old)
            typer.echo(f"headscore: warning: {command} {old} is deprecated and goes in the next release; use "
                       f"{alias.hint or alias.new}", err=True)
        if alias.value is None:
            out.append(alias.new + (f"={inline}" if "=" in arg else ""))
            continue
        value = inline if "=" in arg else (rest.pop(0) if rest else "")
        out += [alias.new, alias.value(value)]
    return out


def command(name: str, aliases: dict[str, Alias] | None = None,
            epilog: Callable[[], str] | None = None) -> Callable[[Callable[..., Any]], Any]:
    """`@app.command(name)` with `HeadscoreCommand`, these deprecated `aliases` (old spelling -> `Alias`) and an
    `epilog` built when the help is shown (so listing a registry costs nothing elsewhere)."""
    cls = type(f"{name.title().replace('-', '')}Command", (HeadscoreCommand,),
               {"aliases": dict(aliases or {}), "epilog_from": staticmethod(epilog) if epilog else None})
    return app.command(name, cls=cls)


def number_list(values: Sequence[str], convert: Callable[[str], Any], option: str) -> list:
    """`--budgets 128,256 --budgets 512` -> [128, 256, 512]; a bad entry is one clear error line."""
    parsed = []
    for value in values:
        for part in (p for p in value.split(",") if p.strip()):
            try:
                parsed.append(convert(part.strip()))
            except ValueError:
                raise HeadscoreError(f"{option}: '{part.strip()}' is not a valid number") from None
    return parsed


def one_number(values: Sequence[str], convert: Callable[[str], Any], option: str) -> Any:
    """The single value of a list option in a command that takes one (`compress --budgets 128`)."""
    parsed = number_list(values, convert, option)
    if len(parsed) != 1:
        raise HeadscoreError(f"{option} takes one value here, got {len(parsed)}")
    return parsed[0]


def names(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [part.strip() for part in text.split(",") if part.strip()]
