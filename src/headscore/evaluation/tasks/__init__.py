"""Evaluation tasks: `get_task(spec, **settings).samples(tokenizer)` -> Samples; `score(sample, prediction)`.

Every task registers itself (`@register_task("name")` in `base`), and so does every shorthand beside its tasks
(`synthetic`: the task group of the four synthetic tasks; `longbench:DIR` / `longbench-e:DIR`: the 16 English
LongBench datasets / the 13 LongBench-E ones from a folder of `<dataset>.jsonl` files, LongBench's data.zip;
`loogle`: LooGLE's long-dependency QA from the hub; `ruler`: RULER's 13 tasks `ruler:NAME`, `ruler-synthetic` the
11 without downloaded data, and a bare RULER name after a `ruler:` spec continues it: `ruler:vt,cwe`). Specs: a
task name, or `NAME:SOURCE` for a sourced task (`longbench:FILE_OR_HF_ID`, `loogle:FILE_OR_HF_ID`);
`tasks_help()` lists them all. The authors' own tests: `niah-official` (their needle-in-a-haystack) and
`babilong[:SOURCE]` (BABILong at their revision).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from headscore.core.errors import HeadscoreError
from headscore.evaluation.tasks import (  # noqa: F401  (the modules register their tasks)
    babilong,
    longbench,
    niah,
    niah_official,
    ruler,
    synthetic,
)
from headscore.evaluation.tasks.base import (
    SHORTHANDS,
    TASKS,
    Placement,
    Sample,
    Task,
    TaskEntry,
    newline_token,
    place_in_haystack,
    register_shorthand,
    register_task,
    score,
    task_forms,
    task_group,
    task_samples,
    tasks_help,
)
from headscore.evaluation.tasks.longbench import LongBenchTask, LoogleTask
from headscore.evaluation.tasks.ruler import RULER_TASKS

SYNTHETIC = tuple(task_group("synthetic"))
SOURCED: dict[str, type[Task]] = {name: entry.cls for name, entry in TASKS.items() if entry.sourced}

__all__ = ["SHORTHANDS", "SOURCED", "SYNTHETIC", "TASKS", "LongBenchTask", "LoogleTask", "Placement", "Sample",
           "Task", "expand_specs", "get_task", "newline_token", "place_in_haystack", "register_shorthand",
           "register_task", "score", "task_forms", "task_samples", "task_settings", "tasks_help"]


def _entry(spec: str) -> tuple[TaskEntry, str | None]:
    """The registry entry of `spec` and its source (`NAME:SOURCE` of a sourced task; None otherwise). A name may
    hold a colon itself (a family registered as `FAMILY:MEMBER`)."""
    if spec in TASKS and not TASKS[spec].sourced:
        return TASKS[spec], None
    name, colon, source = spec.partition(":")
    entry = TASKS.get(name)
    if entry is None or (colon and not entry.sourced):
        raise HeadscoreError(unknown(spec))
    if entry.sourced and not source:
        raise HeadscoreError(f"{name} needs a source: {name}:PATH_OR_HF_ID")
    return entry, source or None


def task_settings(spec: str) -> list[str]:
    """The setting names the task named by `spec` accepts (those its name fixes and `source` excluded)."""
    entry, _ = _entry(spec)
    return [f.name for f in dataclasses.fields(entry.cls)  # type: ignore[arg-type]  # task classes are dataclasses
            if f.name != "source" and f.name not in entry.preset]


def unknown(spec: str) -> str:
    return f"unknown task '{spec}': use one of {', '.join(task_forms())}"


def get_task(spec: str, **settings: Any) -> Task:
    """The task named by `spec`, with `settings` (None values are dropped, so callers can pass unset options).

    A setting the task does not define is an error.
    """
    settings = {k: v for k, v in settings.items() if v is not None}
    allowed = set(task_settings(spec))
    extra = sorted(set(settings) - allowed)
    if extra:
        raise HeadscoreError(f"task '{spec}' has no setting {', '.join(extra)} (it takes: "
                             f"{', '.join(sorted(allowed))})")
    entry, source = _entry(spec)
    if source is not None:
        settings["source"] = source
    return entry.cls(**entry.preset, **settings)


def _expand_one(spec: str) -> list[str]:
    """One spec, shorthands expanded (see the module docstring)."""
    name, colon, argument = spec.partition(":")
    shorthand = SHORTHANDS.get(name)
    found = shorthand.expand(argument if colon else None) if shorthand else None
    return [spec] if found is None else found


def expand_specs(specs: str) -> list[str]:
    """Comma-separated task specs, with the shorthands expanded (`synthetic`, `loogle`, `longbench:DIR`,
    `longbench-e:DIR`, `ruler`, `ruler-synthetic`, `ruler:A,B`, and any registered later)."""
    out: list[str] = []
    for spec in (s.strip() for s in specs.split(",")):
        if spec in RULER_TASKS and out and out[-1].startswith("ruler:"):
            spec = f"ruler:{spec}"  # `ruler:vt,cwe`: the list goes on
        if spec:
            out.extend(_expand_one(spec))
    if not out:
        raise HeadscoreError("no task given")
    return out
