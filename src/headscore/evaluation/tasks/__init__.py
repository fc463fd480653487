"""Evaluation tasks: `get_task(spec, **settings).samples(tokenizer)` -> Samples; `score(sample, prediction)`.

Specs: `niah`, `niah-official`, `multikey`, `multivalue`, `vartrack`, `twohop`, `longbench:SOURCE`, `loogle:SOURCE`,
`babilong:SOURCE`. Shorthands
(see `expand_specs`): `synthetic` names the four synthetic tasks; `longbench:DIR` / `longbench-e:DIR` the 16
English LongBench datasets / the 13 LongBench-E ones from a folder of `<dataset>.jsonl` files (LongBench's
data.zip); `loogle` LooGLE's long-dependency QA from the hub; `babilong` BABILong from the hub, at the authors'
revision.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from headscore.core.errors import HeadscoreError
from headscore.evaluation.tasks.babilong import HUB_BABILONG, BabilongTask
from headscore.evaluation.tasks.base import (
    Placement,
    Sample,
    Task,
    newline_token,
    place_in_haystack,
    score,
    task_samples,
)
from headscore.evaluation.tasks.longbench import (
    HUB_LONGBENCH,
    HUB_LOOGLE,
    LongBenchTask,
    LoogleTask,
    longbench_datasets,
    longbench_e_datasets,
)
from headscore.evaluation.tasks.niah import NiahTask
from headscore.evaluation.tasks.niah_official import NiahOfficialTask
from headscore.evaluation.tasks.synthetic import MultiKeyTask, MultiValueTask, TwoHopTask, VariableTrackingTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (NiahTask, MultiKeyTask, MultiValueTask,
                                                          VariableTrackingTask, TwoHopTask, NiahOfficialTask)}
SYNTHETIC = ("multikey", "multivalue", "vartrack", "twohop")
SOURCED: dict[str, Any] = {"longbench": LongBenchTask, "loogle": LoogleTask, "babilong": BabilongTask}

__all__ = ["SYNTHETIC", "TASKS", "LongBenchTask", "LoogleTask", "Placement", "Sample", "Task", "expand_specs",
           "get_task", "newline_token", "place_in_haystack", "score", "task_samples", "task_settings"]


def _sourced(spec: str) -> tuple[Any, str] | None:
    """`(task class, source)` for `longbench:SOURCE` / `loogle:SOURCE`, else None."""
    kind, colon, source = spec.partition(":")
    return (SOURCED[kind], source) if colon and kind in SOURCED else None


def task_settings(spec: str) -> list[str]:
    """The setting names the task named by `spec` accepts."""
    sourced = _sourced(spec)
    cls = sourced[0] if sourced else TASKS.get(spec)
    if cls is None:
        raise HeadscoreError(unknown(spec))
    return [f.name for f in dataclasses.fields(cls) if f.name != "source"]  # type: ignore[arg-type]  # dataclasses


def unknown(spec: str) -> str:
    return (f"unknown task '{spec}': use one of {', '.join(TASKS)}, synthetic, loogle, babilong, longbench:DIR, "
            "longbench-e:DIR, longbench:PATH_OR_HF_ID, loogle:PATH_OR_HF_ID or babilong:DIR_OR_HF_ID")


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
    sourced = _sourced(spec)
    if sourced:
        cls, source = sourced
        if not source:
            raise HeadscoreError(f"{cls.name} needs a source: {cls.name}:PATH_OR_HF_ID")
        return cls(source=source, **settings)
    return TASKS[spec](**settings)


def _expand_one(spec: str) -> list[str]:
    """One spec, shorthands expanded (see the module docstring)."""
    kind, colon, folder = spec.partition(":")
    names = {"longbench": longbench_datasets, "longbench-e": longbench_e_datasets}.get(kind)
    if spec == "synthetic":
        return list(SYNTHETIC)
    if spec == "loogle":
        return [f"loogle:{HUB_LOOGLE}"]
    if spec == "babilong":
        return [f"babilong:{HUB_BABILONG}"]
    if names and not colon:
        raise HeadscoreError(f"{kind} needs the folder of LongBench's <dataset>.jsonl files ({HUB_LONGBENCH}'s "
                             f"data.zip): {kind}:DIR (or longbench:FILE, longbench:HF_ID:CONFIG)")
    if names and Path(folder).expanduser().is_dir():
        files = [Path(folder) / f"{name}.jsonl" for name in names()]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HeadscoreError(f"LongBench folder {folder} lacks {', '.join(missing)}")
        return [f"longbench:{f}" for f in files]
    if kind == "longbench-e":
        raise HeadscoreError(f"longbench-e takes a folder of <dataset>_e.jsonl files, not '{folder}'")
    return [spec]


def expand_specs(specs: str) -> list[str]:
    """Comma-separated task specs, with the shorthands expanded (`synthetic`, `loogle`, `longbench:DIR`,
    `longbench-e:DIR`)."""
    out: list[str] = []
    for spec in (s.strip() for s in specs.split(",")):
        if spec:
            out.extend(_expand_one(spec))
    if not out:
        raise HeadscoreError("no task given")
    return out
