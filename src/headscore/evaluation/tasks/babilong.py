"""`babilong:SOURCE`: BABILong reasoning-in-a-haystack (qa1–qa5) as HeadKV's authors ran it (`run_babilong.py`,
`eval_babilong.py`, FYYFU/HeadKV @ 0862a09; the profile `babilong_profile.json` holds the prompts and labels).

- data: RMT-team/babilong (config = length `0k`, `1k`, ... `32k`; split = `qaN`; fields input, question,
  target), 100 records per task and length; `SOURCE` is the hub id (`RMT-team/babilong@REVISION` pins a
  revision; the authors' copy is revision ee0d588) or a folder of `<length>/` subfolders, each either what
  `datasets.save_to_disk` wrote (the authors' `reason_needle/babilong-100examples/`) or `<qaN>.jsonl` files;
- lengths: `0k`–`8k` when the truncation length is below 10000 tokens (Llama-3: 7950), else `0k`–`32k`
  (Mistral: 31500);
- prompt: the task's instruction, examples and post-prompt, then `<context>\\n{input}\\n</context>` and the
  question (the input stripped, the whole stripped), as one user turn of the tokenizer's chat template, tokenized
  without added special tokens; longer than `max_length` tokens: the text of the first and last
  `int(max_length / 2)` tokens, special tokens kept, joined and tokenized again;
- generation: greedy, at most 15 new tokens, EOS (the tokenizer's) not first, ending at it; the prediction
  decoded without special tokens, not stripped;
- score (`compare_answers`): the prediction lowercased and cut at the first `.`, `<context>` or `<example>`;
  correct when the task's labels it mentions, less those the question mentions, are exactly the target's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from headscore.core.errors import HeadscoreError
from headscore.core.files import read_jsonl
from headscore.core.prompts import apply_template, encode_prompt
from headscore.evaluation.tasks.base import Sample, Task, register_shorthand, register_task

PROFILE_FILE = Path(__file__).with_name("babilong_profile.json")
HUB_BABILONG = "RMT-team/babilong@ee0d588794c7ac098062ee0d247c733d62e94fe2"  # the authors' copy's revision
SHORT = ("0k", "1k", "2k", "4k", "8k")
LONG = (*SHORT, "16k", "32k")
MAX_NEW_TOKENS = 15


@cache
def profile() -> dict[str, Any]:
    """The profile: `template`, and per task its `instruction`, `examples`, `post_prompt`, `labels`."""
    return json.loads(PROFILE_FILE.read_text(encoding="utf-8"))


def render_babilong_prompt(tokenizer: Any, task: str, context: str, question: str, max_length: int | None) -> str:
    """The model input of one record: the formatted prompt in the chat template, middle-truncated as theirs."""
    entry = profile()["tasks"][task]
    text = profile()["template"].format(instruction=entry["instruction"], examples=entry["examples"],
                                        post_prompt=entry["post_prompt"], context=context.strip(),
                                        question=question).strip()
    prompt = apply_template(tokenizer, text, "chat")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if max_length is not None and len(ids) > max_length:
        half = int(max_length / 2)
        prompt = tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:])
    return prompt


def compare_answers(target: str, output: str, question: str, labels: Sequence[str]) -> bool:
    """BABILong's scorer (`reason_needle/metrics.py`): see the module docstring."""
    output = output.lower().split(".")[0].split("<context>")[0].split("<example>")[0].split("Question")[0]
    target = target.lower()
    known = {label.lower() for label in labels}
    mentioned = {label for label in known if label in output} - {label for label in known if label in
                                                                  question.lower()}
    if "," in target and len(target) > 3:
        parts = target.split(",")
        return all(part in mentioned for part in parts) and len(mentioned) == len(parts)
    return target in mentioned and len(mentioned) == 1


def read_split(source: str, length: str, task: str) -> list[dict[str, Any]]:
    """The records of one task at one length from `source` (see the module docstring)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        jsonl = folder / length / f"{task}.jsonl"
        if jsonl.is_file():
            return [record for _, record in read_jsonl(jsonl, "BABILong file")]
        if (folder / length / "dataset_dict.json").is_file():
            import datasets  # lazy: slow to import, needed only for saved datasets and the hub

            saved = datasets.load_from_disk(str(folder / length))
            if task in saved:
                return [dict(row) for row in saved[task]]
        raise HeadscoreError(f"babilong: {folder} has no {length}/{task}.jsonl nor a saved dataset "
                             f"{length}/ holding {task} (the authors' reason_needle/babilong-100examples layout)")
    if source.startswith((".", "/", "~")) or source.endswith(".jsonl"):
        raise HeadscoreError(f"babilong: folder not found: {source}")
    name, at, revision = source.partition("@")
    try:
        import datasets

        rows = datasets.load_dataset(name, length, split=task, revision=revision if at else None)
    except Exception as error:  # datasets raises many types; all mean the same to the user
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HeadscoreError(f"cannot load BABILong '{source}' (config {length}, split {task}): {first}; a "
                             "folder of <length>/<qaN>.jsonl files works too (see docs/tasks.md)") from error
    return [dict(row) for row in rows]


@register_task("babilong", sourced=True)
@dataclass
class BabilongTask(Task):
    """BABILong records from `source`, one sample per (task, length, record) in that nesting order.

    `tasks`: some of qa1–qa5; `splits`: the length configs (default: by `max_length`, as theirs);
    `max_length`: the prompt's token limit (middle truncation; their 7950 for Llama-3, 31500 for Mistral; None:
    none, and the lengths up to 8k); `limit`: the first records of each task and length only.
    """

    source: str = ""
    tasks: Sequence[str] = ("qa1", "qa2", "qa3", "qa4", "qa5")
    splits: Sequence[str] | None = None
    max_length: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        unknown = [task for task in self.tasks if task not in profile()["tasks"]]
        if unknown:
            raise HeadscoreError(f"babilong: unknown task '{unknown[0]}': use some of "
                                 f"{', '.join(profile()['tasks'])} (the ones the authors ran)")

    def samples(self, tokenizer: Any) -> list[Sample]:
        lengths = list(self.splits or (LONG if self.max_length is not None and self.max_length >= 10000
                                       else SHORT))
        samples = []
        for task in self.tasks:
            for length in lengths:
                for number, record in enumerate(read_split(self.source, length, task)[: self.limit]):
                    missing = [key for key in ("input", "question", "target") if not isinstance(record.get(key), str)]
                    if missing:
                        raise HeadscoreError(f"babilong {length}/{task} record {number} has no string field "
                                             f"'{missing[0]}'")
                    prompt = render_babilong_prompt(tokenizer, task, record["input"], record["question"],
                                                    self.max_length)
                    samples.append(Sample(
                        id=f"babilong-{task}-{length}-{number}", task=f"{self.name}:{task}", context=record["input"],
                        question=record["question"], answers=[record["target"]], metric=f"{self.name}:{task}",
                        prompt=prompt, length=len(encode_prompt(tokenizer, prompt, "chat")["input_ids"]),
                        template="chat", max_new_tokens=MAX_NEW_TOKENS, stop="eos", min_new_tokens=1,
                        target_length=int(length[:-1]) * 1000, meta={"split": length, "qa": task}))
        return samples

    def score(self, sample: Sample, prediction: str) -> float:
        task = sample.meta["qa"]
        return float(compare_answers(sample.answers[0], prediction, sample.question,
                                     profile()["tasks"][task]["labels"]))


@register_shorthand("babilong", f"= babilong:{HUB_BABILONG}, BABILong at the HeadKV authors' revision")
def expand_babilong(source: str | None) -> list[str] | None:
    return [f"babilong:{HUB_BABILONG}"] if source is None else None
