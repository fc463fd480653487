"""Evaluation tasks: `get_task(spec, **settings).samples(tokenizer)` -> Samples; `score(sample, prediction)`.

Specs: `niah`, `multikey`, `multivalue`, `vartrack`, `twohop`, `longbench:SOURCE`; `synthetic` names the four
synthetic tasks (see `expand_specs`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from headscore.core.errors import HeadscoreError
from headscore.evaluation.tasks.base import Placement, Sample, Task, place_in_haystack, score
from headscore.evaluation.tasks.longbench import LongBenchTask
from headscore.evaluation.tasks.niah import NiahTask
from headscore.evaluation.tasks.synthetic import MultiKeyTask, MultiValueTask, TwoHopTask, VariableTrackingTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (NiahTask, MultiKeyTask, MultiValueTask,
                                                          VariableTrackingTask, TwoHopTask)}
SYNTHETIC = ("multikey", "multivalue", "vartrack", "twohop")

__all__ = ["SYNTHETIC", "TASKS", "LongBenchTask", "Placement", "Sample", "Task", "expand_specs", "get_task",
           "place_in_haystack", "score", "task_settings"]


def task_settings(spec: str) -> list[str]:
    """The setting names the task named by `spec` accepts."""
    cls = LongBenchTask if spec.startswith("longbench:") else TASKS.get(spec)
    if cls is None:
        raise HeadscoreError(unknown(spec))
    return [f.name for f in dataclasses.fields(cls) if f.name != "source"]


def unknown(spec: str) -> str:
    return f"unknown task '{spec}': use one of {', '.join(TASKS)}, synthetic, or longbench:PATH_OR_HF_ID"


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
    if spec.startswith("longbench:"):
        source = spec[len("longbench:"):]
        if not source:
            raise HeadscoreError("longbench needs a source: longbench:PATH_OR_HF_ID")
        return LongBenchTask(source=source, **settings)
    return TASKS[spec](**settings)


def expand_specs(specs: str) -> list[str]:
    """Comma-separated task specs, with `synthetic` expanded to the four synthetic tasks."""
    out: list[str] = []
    for spec in (s.strip() for s in specs.split(",")):
        if spec:
            out.extend(SYNTHETIC if spec == "synthetic" else [spec])
    if not out:
        raise HeadscoreError("no task given")
    return out
