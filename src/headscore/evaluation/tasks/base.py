"""The Sample every task yields, the Task interface, scoring, and needle placement in haystack filler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, TypeVar

from headscore.core.errors import HeadscoreError
from headscore.core.metrics import score_answers
from headscore.core.prompts import HaystackTokens, encode_prompt, place_texts, render_prompt
from headscore.evaluation.tasks.longbench_metrics import PREFIX as LONGBENCH_PREFIX
from headscore.evaluation.tasks.longbench_metrics import score_record

MIN_FILLER = 16  # fewest haystack tokens a generated prompt may hold

# decoding stop rules: the model's and the tokenizer's EOS ids, or a line break once the answer has begun
# ("line": short answers); only the tokenizer's EOS id (or the token limit), no post-processing of the text
# ("eos": LongBench/LooGLE as the authors generate, the prediction kept unstripped); the tokenizer's EOS id or its
# newline token from the first new token on ("newline-token": the authors' needle-in-a-haystack generation)
STOP_RULES = ("line", "eos", "newline-token")


def newline_token(tokenizer: Any) -> int:
    """The authors' newline stop id: `tokenizer.encode("\\n", add_special_tokens=False)[-1]`."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    if not ids:
        raise HeadscoreError("the tokenizer encodes a newline to no token; the newline-token stop rule needs one")
    return int(ids[-1])


@dataclass
class Sample:
    """One evaluation example.

    `prompt` is the full model input text for `template` (tokenize it with `prompts.encode_prompt`);
    `length` is its token count. `answers` are the gold answers scored by the metric called `metric` (see
    `metrics.score_answers`; `longbench:<name>` metrics are LongBench's, see `longbench_metrics`).
    `stop` is the decoding stop rule (`STOP_RULES`); the first `min_new_tokens` new tokens cannot be EOS.
    `target_length` / `depth` are set by generated tasks; `meta` holds the rest. `task_scorer`: the `Task` that
    built it (set by `task_samples`), whose `Task.score` scores its predictions.
    """

    id: str
    task: str
    context: str
    question: str
    answers: list[str]
    metric: str
    prompt: str
    length: int
    template: str = "raw"
    max_new_tokens: int = 32
    stop: str = "line"
    min_new_tokens: int = 0
    target_length: int | None = None
    depth: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    task_scorer: Task | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        fields_ = asdict(replace(self, task_scorer=None))
        del fields_["task_scorer"]
        return fields_


def metric_score(sample: Sample, prediction: str) -> float:
    """The sample's metric applied to a prediction: a float in [0, 1].

    LongBench metrics (`longbench:<name>`) score as LongBench's scorer does: the sample's `first_line`
    post-processing and `all_classes` (in `meta`), then the best over the answers.
    """
    if sample.metric.startswith(LONGBENCH_PREFIX):
        return score_record(sample.metric, prediction, sample.answers, all_classes=sample.meta.get("all_classes"),
                            first_line_only=bool(sample.meta.get("first_line")))
    return score_answers(sample.metric, prediction, sample.answers)


def score(sample: Sample, prediction: str) -> float:
    """A prediction's score in [0, 1]: the `Task.score` of the task that built the sample (its metric, unless the
    task overrides `score`); a sample built without `task_samples`, its metric."""
    scorer = sample.task_scorer
    return scorer.score(sample, prediction) if scorer is not None else metric_score(sample, prediction)


class Task:
    """A task: `samples(tokenizer)` builds its samples, `score(sample, prediction)` scores an answer."""

    name: ClassVar[str] = ""

    def samples(self, tokenizer: Any) -> list[Sample]:
        raise NotImplementedError

    def score(self, sample: Sample, prediction: str) -> float:
        """The score of `prediction` for one of this task's samples, in [0, 1] (default: the sample's metric)."""
        return metric_score(sample, prediction)

    def settings(self) -> dict[str, Any]:
        """The task's parameters (for metadata files)."""
        return {"task": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


@dataclass(frozen=True)
class Placement:
    """Texts to place in haystack filler so that the whole prompt is about `target_length` tokens.

    `texts[i]` goes at the sentence boundary at or before `depths[i]` % of the filler (texts sharing a
    boundary keep their order; `prompts.place_texts`).
    """

    target_length: int
    texts: tuple[str, ...]
    depths: tuple[float, ...]
    question: str


def place_in_haystack(tokenizer: Any, haystack_text: str, placements: Sequence[Placement],
                      template: str = "raw") -> list[tuple[str, str, int]]:
    """`(context, prompt, prompt_tokens)` for each placement; the haystack is tokenized once for all."""
    fillers = []
    for p in placements:
        overhead = len(encode_prompt(tokenizer, render_prompt(tokenizer, "", p.question, template),
                                     template)["input_ids"])
        inserted = sum(len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in p.texts)
        filler = p.target_length - overhead - inserted
        if filler < MIN_FILLER:
            raise HeadscoreError(f"length {p.target_length} is too short for the task's needles and question "
                                 f"(needs at least {p.target_length - filler + MIN_FILLER} tokens)")
        fillers.append(filler)
    hay = HaystackTokens(tokenizer, haystack_text, max(fillers, default=1))
    results = []
    for p, filler in zip(placements, fillers, strict=True):
        context, _ = place_texts(hay, filler, p.texts, p.depths, pad_start=True)
        prompt = render_prompt(tokenizer, context, p.question, template)
        results.append((context, prompt, len(encode_prompt(tokenizer, prompt, template)["input_ids"])))
    return results


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskEntry:
    """A registered task name: its class, the settings the name fixes (`preset`), whether its spec is
    `NAME:SOURCE` (`sourced`), and the group shorthand it belongs to (`group`, e.g. `synthetic`)."""

    cls: type[Task]
    preset: dict[str, Any] = field(default_factory=dict)
    sourced: bool = False
    group: str | None = None


@dataclass(frozen=True)
class Shorthand:
    """A spec that names other specs (`longbench:DIR`: one spec per dataset file). `expand(argument)` gets the
    text after `NAME:` (None without a colon) and returns the specs, or None when the spec is not a shorthand
    after all (it is then read as a task). `form` is how it is written (`longbench:DIR`) and `help` what it
    names, for `--tasks`' help; a task group's `help` is "" (its members are listed)."""

    expand: Callable[[str | None], list[str] | None]
    form: str
    help: str = ""


TASKS: dict[str, TaskEntry] = {}  # name -> entry, in registration order (filled by `register_task`)
SHORTHANDS: dict[str, Shorthand] = {}  # name -> shorthand (filled by `register_shorthand` and task groups)
T = TypeVar("T", bound=type[Task])
Expand = Callable[[str | None], list[str] | None]


def register_task(name: str, *, sourced: bool = False, group: str | None = None,
                  **preset: Any) -> Callable[[T], T]:
    """Class decorator: register a task class under `name` (`--tasks NAME`; `NAME:SOURCE` when `sourced`, the
    source going to the class's `source` setting). `preset`: settings the name fixes, so one class can register
    a family of names (stack the decorator, or call `register_task(name, **preset)(cls)` in a loop); `group`:
    the name joins the shorthand `group` (`synthetic` names every synthetic task). The class's `name` is the
    first name it is registered under."""

    def add(cls: T) -> T:
        if name in TASKS or name in SHORTHANDS:
            raise HeadscoreError(f"task name '{name}' is registered twice")
        if "name" not in vars(cls):
            cls.name = name
        TASKS[name] = TaskEntry(cls, dict(preset), sourced, group)
        if group is not None and group not in SHORTHANDS:
            SHORTHANDS[group] = Shorthand(lambda argument: None if argument is not None else task_group(group), group)
        return cls

    return add


def register_shorthand(form: str, help: str) -> Callable[[Expand], Expand]:
    """Function decorator: `expand(argument)` expands the specs `NAME` / `NAME:ARGUMENT` (see `Shorthand`);
    `form` is how the shorthand is written (`NAME` or `NAME:ARGUMENT`), `help` what it names."""
    name = form.partition(":")[0]

    def add(expand: Expand) -> Expand:
        if name in SHORTHANDS:
            raise HeadscoreError(f"task shorthand '{name}' is registered twice")
        SHORTHANDS[name] = Shorthand(expand, form, help)
        return expand

    return add


def task_group(group: str) -> list[str]:
    """The task names registered in `group`, in registration order."""
    return [name for name, entry in TASKS.items() if entry.group == group]


def task_forms() -> list[str]:
    """How every task and shorthand is written: plain tasks, task groups, other shorthands, sourced tasks."""
    plain = [name for name, entry in TASKS.items() if not entry.sourced]
    shorthands = sorted(SHORTHANDS.values(), key=lambda item: bool(item.help))  # task groups first
    sourced = [f"{name}:FILE_OR_HF_ID" for name, entry in TASKS.items() if entry.sourced]
    return [*plain, *(item.form for item in shorthands), *sourced]


def tasks_help() -> str:
    """`--tasks`' help, from the registries: every plain task, each shorthand, the sourced forms."""
    plain = [name for name, entry in TASKS.items() if not entry.sourced]
    shorthands = sorted(SHORTHANDS.items(), key=lambda item: bool(item[1].help))  # task groups first
    described = [f"{item.form} ({item.help or '= ' + ', '.join(task_group(name))})" for name, item in shorthands]
    sourced = [f"{name}:FILE_OR_HF_ID" for name, entry in TASKS.items() if entry.sourced]
    return (f"Comma-separated tasks: {', '.join(plain)}; {'; '.join(described)}; {', '.join(sourced)} "
            "(see docs/tasks.md).")


def task_samples(task: Task, tokenizer: Any) -> list[Sample]:
    """`task.samples(tokenizer)`, each sample carrying `task` as its scorer (`score` then calls `task.score`)."""
    samples = task.samples(tokenizer)
    for sample in samples:
        sample.task_scorer = task
    return samples
