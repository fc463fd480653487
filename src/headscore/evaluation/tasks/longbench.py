"""`longbench:SOURCE` and `loogle:SOURCE`: LongBench and LooGLE as HeadKV's authors ran them.

The profile (`longbench_profile.json`, with its sources) holds, per dataset, LongBench's prompt template,
the maximum new tokens, the metric and whether the first-line post-processing applies: the 16 English
LongBench datasets (their `_e` LongBench-E variants use the same entries) and LooGLE's four long-dependency
QA tasks. A prompt is built as KVCache-Factory's `run_longbench.py` builds it:

1. `template.format(**record)`: the record's fields fill `{context}` and `{input}`;
2. `llama2` template only: `[INST] {prompt} [/INST]` (Llama-3 and Mistral get no chat template: `raw`);
3. middle truncation (`middle_truncate`) to `max_length` tokens of the whole prompt;
4. `chat` template only (an explicit choice, not the authors'): the truncated prompt as one user turn.

Generation (`Sample.stop == "eos"`): greedy, up to the dataset's maximum new tokens, ending only at the
tokenizer's EOS token, which cannot be the first new token (`min_length = context + 1` in the authors' call).

SOURCE for `longbench:` is a JSONL file (LongBench's `data.zip` layout: `<dataset>.jsonl`) or a Hugging Face
dataset `NAME[:CONFIG[:SPLIT]]` (split `test`). The dataset is the record's `dataset` field, else the
`dataset` setting, else the file stem / config name. `loogle:` reads LooGLE's long-dependency QA: a JSONL
file in LooGLE's GitHub layout (one document per line, `input` and `qa_pairs` with `Q`, `A`, `type`) or
flattened per question (`context`, `question`, `answer`, `type`), or the hub dataset (default
`bigai-nlco/LooGLE`, config `longdep_qa`); questions of other types are skipped.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from headscore.core.errors import HeadscoreError
from headscore.core.files import read_jsonl
from headscore.core.metrics import METRICS as ANSWER_METRICS
from headscore.core.prompts import apply_template, encode_prompt
from headscore.evaluation.tasks.base import Sample, Task, register_shorthand, register_task
from headscore.evaluation.tasks.longbench_metrics import (
    BUCKETS,
    PREFIX,
    corpus_score,
    length_bucket,
)

PROFILE_FILE = Path(__file__).with_name("longbench_profile.json")
HUB_LONGBENCH = "THUDM/LongBench"
HUB_LOOGLE = "bigai-nlco/LooGLE"
LOOGLE_CONFIG = "longdep_qa"
MAIN_TABLE_QA = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique")
MAIN_TABLE_LOOGLE = ("comprehension_and_reasoning", "multiple_information_retrieval", "timeline_reorder",
                     "computation")
# the paper's main table: two averages, each over its datasets' scores (HeadKV's performance_table.png)
PAPER_AVERAGES = {"qa_average": MAIN_TABLE_QA, "loogle_average": MAIN_TABLE_LOOGLE}
LONGBENCH_TEMPLATES = ("raw", "llama2", "chat")


@cache
def profile() -> dict[str, Any]:
    """The profile file: `longbench` / `loogle` sections (`provenance`, `datasets`) and `model_max_length`."""
    return json.loads(PROFILE_FILE.read_text(encoding="utf-8"))


def longbench_datasets() -> list[str]:
    """The 16 English LongBench datasets, in LongBench's order."""
    return list(profile()["longbench"]["datasets"])


def longbench_e_datasets() -> list[str]:
    """The 13 LongBench-E datasets (`<name>_e`; narrativeqa, musique and qmsum have none)."""
    return [f"{d}_e" for d in longbench_datasets() if d not in ("narrativeqa", "musique", "qmsum")]


def loogle_tasks() -> list[str]:
    """LooGLE's four long-dependency QA types that HeadKV reports."""
    return list(profile()["loogle"]["datasets"])


def base_dataset(name: str) -> str:
    """`hotpotqa_e` (LongBench-E) -> `hotpotqa`."""
    return name[:-2] if name.endswith("_e") else name


def dataset_entry(dataset: str) -> dict[str, Any]:
    """The profile entry (`prompt`, `max_new_tokens`, `metric`, `first_line`) of a LongBench dataset, its `_e`
    variant, or a LooGLE task."""
    entries = {**profile()["longbench"]["datasets"], **profile()["loogle"]["datasets"]}
    entry = entries.get(base_dataset(dataset))
    if entry is None:
        raise HeadscoreError(f"unknown LongBench dataset '{dataset}': the profile has {', '.join(entries)} "
                             "(and the _e variants); name it with the record's 'dataset' field, the file name "
                             "or the dataset setting")
    return entry


def middle_truncate(tokenizer: Any, prompt: str, max_length: int | None) -> str:
    """The authors' truncation: `prompt` tokenized with the tokenizer's special tokens; if that is longer than
    `max_length`, the text of its first and last `int(max_length / 2)` tokens, each decoded without special
    tokens, joined. The result is tokenized again later, so its length can differ by a few tokens."""
    if max_length is None:
        return prompt
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) <= max_length:
        return prompt
    half = int(max_length / 2)
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True))


def render_longbench_prompt(tokenizer: Any, prompt_template: str, record: dict[str, Any], template: str = "raw",
                            max_length: int | None = None) -> str:
    """The model input for one record: format, `[INST]` wrap (llama2), truncate, chat template (chat)."""
    if template not in LONGBENCH_TEMPLATES:
        raise HeadscoreError(f"unknown template '{template}' for LongBench: use one of "
                             f"{', '.join(LONGBENCH_TEMPLATES)}")
    try:
        prompt = prompt_template.format(**record)
    except KeyError as error:
        raise HeadscoreError(f"the prompt template needs the field {error.args[0]!r}") from None
    if template == "llama2":
        prompt = apply_template(tokenizer, prompt, "llama2")
    prompt = middle_truncate(tokenizer, prompt, max_length)
    return apply_template(tokenizer, prompt, "chat") if template == "chat" else prompt


def load_hub(name: str, config: str | None, split: str, what: str,
             instead: str = "a local JSONL file works too (see docs/longbench.md)") -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset through `datasets`, each as a dict; the error ends with `instead`."""
    try:
        import datasets  # lazy: `datasets` is slow to import and only hub sources need it

        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # datasets raises many types; all mean the same to the user
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HeadscoreError(f"cannot load {what} '{name}' (config {config}, split {split}): {first}; "
                             f"{instead}") from error
    return [dict(row) for row in rows]


def read_records(source: str, what: str, default_config: str | None = None) -> tuple[list[Any], str]:
    """Records and a default dataset name from a JSONL file or a hub spec `NAME[:CONFIG[:SPLIT]]`."""
    path = Path(source).expanduser()
    if path.is_file():
        return [record for _, record in read_jsonl(path, f"{what} file")], path.stem
    if source.endswith(".jsonl") or source.startswith((".", "/", "~")) or path.is_dir():
        raise HeadscoreError(f"{what} file not found: {source}")
    parts = source.split(":")
    if len(parts) > 3 or not parts[0]:
        raise HeadscoreError(f"bad {what} source '{source}': use a JSONL file or NAME[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else default_config
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    return load_hub(name, config, split, what), config or name.rsplit("/", 1)[-1]


def answers_of(value: Any, where: str) -> list[str]:
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise HeadscoreError(f"{where} needs 'answers': a non-empty list of strings")
    return list(answers)


@register_task("longbench", sourced=True)
@dataclass
class LongBenchTask(Task):
    """LongBench records from `source`, built with the profile. `limit` keeps the first records; `max_length`
    is the whole prompt's token limit (middle truncation); `metric` / `max_new_tokens` override the
    profile's (`metric` then names a `core.metrics` metric)."""

    source: str = ""
    dataset: str | None = None
    metric: str | None = None
    max_length: int | None = None
    limit: int | None = None
    template: str = "raw"
    max_new_tokens: int | None = None

    def check(self) -> None:
        if self.metric is not None and self.metric not in ANSWER_METRICS:
            raise HeadscoreError(f"unknown metric '{self.metric}' (known: {', '.join(sorted(ANSWER_METRICS))})")
        if self.max_length is not None and self.max_length < 2:
            raise HeadscoreError("max_length must be at least 2 tokens")
        if self.template not in LONGBENCH_TEMPLATES:
            raise HeadscoreError(f"unknown template '{self.template}' for LongBench: use one of "
                                 f"{', '.join(LONGBENCH_TEMPLATES)}")

    def sample(self, tokenizer: Any, record: dict[str, Any], dataset: str, number: int, where: str,
               task: str) -> Sample:
        """One record as a Sample (the record needs `context`, `input` and `answers`)."""
        entry = dataset_entry(dataset)
        if not isinstance(record.get("context"), str) or not isinstance(record.get("input"), str):
            raise HeadscoreError(f"{where} needs string fields 'context' and 'input'")
        answers = answers_of(record.get("answers"), where)
        prompt = render_longbench_prompt(tokenizer, entry["prompt"], record, self.template, self.max_length)
        tokens = len(encode_prompt(tokenizer, prompt, self.template)["input_ids"])
        all_classes = record.get("all_classes")
        if entry["metric"] == "classification" and not all_classes and self.metric is None:
            raise HeadscoreError(f"{where} needs 'all_classes' (the {dataset} metric scores against them)")
        length = record.get("length")
        return Sample(
            id=str(record.get("_id") or f"{dataset}-{number}"), task=f"{task}:{dataset}",
            context=record["context"], question=record["input"], answers=answers,
            metric=self.metric or PREFIX + entry["metric"], prompt=prompt, length=tokens, template=self.template,
            max_new_tokens=self.max_new_tokens or entry["max_new_tokens"], stop="eos", min_new_tokens=1,
            meta={"dataset": dataset, "record_length": length if isinstance(length, int) else None,
                  "all_classes": list(all_classes) if all_classes else None, "first_line": entry["first_line"]})

    def samples(self, tokenizer: Any) -> list[Sample]:
        self.check()
        records, default_name = read_records(self.source, "LongBench")
        samples = []
        for number, record in enumerate(records[: self.limit]):
            where = f"LongBench source {self.source} record {number}"
            if not isinstance(record, dict):
                raise HeadscoreError(f"{where} is not a JSON object")
            dataset = str(record.get("dataset") or self.dataset or default_name)
            samples.append(self.sample(tokenizer, record, dataset, number, where, "longbench"))
        if not samples:
            raise HeadscoreError(f"LongBench source {self.source} holds no records")
        return samples


def loogle_questions(records: Sequence[Any], source: str) -> list[dict[str, Any]]:
    """Flatten LooGLE records into `{context, input, answers, type, _id, length}` per question.

    GitHub layout: `{input: doc, qa_pairs: [{Q, A, type, S}, ...] or that list as a Python literal}`;
    flattened (hub) layout: `{context, question, answer, type}` per row.
    """
    out = []
    for number, record in enumerate(records):
        where = f"LooGLE source {source} record {number}"
        if not isinstance(record, dict):
            raise HeadscoreError(f"{where} is not a JSON object")
        if "qa_pairs" in record:
            pairs = record["qa_pairs"]
            if isinstance(pairs, str):
                try:
                    pairs = ast.literal_eval(pairs)  # LooGLE stores the list as a Python literal string
                except (ValueError, SyntaxError) as error:
                    raise HeadscoreError(f"{where}: 'qa_pairs' is not a list literal ({error})") from None
            doc = record.get("input")
            if not isinstance(doc, str) or not isinstance(pairs, list):
                raise HeadscoreError(f"{where} needs 'input' (the document) and 'qa_pairs' (a list)")
            questions = [(p.get("Q"), p.get("A"), p.get("type"), f"{record.get('doc_id', number)}-{i}")
                         for i, p in enumerate(pairs) if isinstance(p, dict)]
        else:
            doc = record.get("context")
            kind = record.get("type", record.get("task"))
            questions = [(record.get("question"), record.get("answer"), kind,
                          str(record.get("id") or f"{record.get('doc_id', 'doc')}-{number}"))]
        for question, answer, kind, ident in questions:
            if kind is None:
                raise HeadscoreError(f"{where} has no question type ('type'): the long-dependency tasks cannot "
                                     "be told apart")
            if not isinstance(doc, str) or not isinstance(question, str):
                raise HeadscoreError(f"{where} needs a document and a question (strings)")
            out.append({"context": doc, "input": question, "answers": answer, "type": kind, "_id": ident,
                        "length": len(doc.split())})
    return out


@register_task("loogle", sourced=True)
@dataclass
class LoogleTask(LongBenchTask):
    """LooGLE's long-dependency QA from `source` (file or hub spec), the four types HeadKV reports; `limit`
    keeps the first questions of those types."""


    def samples(self, tokenizer: Any) -> list[Sample]:
        self.check()
        records, _ = read_records(self.source or HUB_LOOGLE, "LooGLE", default_config=LOOGLE_CONFIG)
        wanted = set(loogle_tasks())
        questions = [q for q in loogle_questions(records, self.source) if q["type"] in wanted]
        samples = [self.sample(tokenizer, q, q["type"], number, f"LooGLE question {q['_id']}", "loogle")
                   for number, q in enumerate(questions[: self.limit])]
        if not samples:
            raise HeadscoreError(f"LooGLE source {self.source} holds no questions of the types "
                                 f"{', '.join(sorted(wanted))}")
        return samples


def paper_averages(scores: dict[str, float]) -> dict[str, float]:
    """The paper's main-table averages (`PAPER_AVERAGES`: the 6 LongBench QA datasets; LooGLE's 4 tasks),
    each the mean of its datasets' scores, 2 decimals, where every one of its datasets was run."""
    return {name: round(sum(scores[d] for d in datasets) / len(datasets), 2)
            for name, datasets in PAPER_AVERAGES.items() if all(d in scores for d in datasets)}


def longbench_table(samples: Sequence[Sample], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, budget): every LongBench/LooGLE dataset's score as LongBench reports it (mean × 100,
    2 decimals), their `average` (mean of the dataset scores, 2 decimals), the paper's averages where their
    datasets were run (`paper_averages`: `qa_average`, `loogle_average`), and LongBench-E's length buckets
    (`<dataset> 0-4k` ...) for the `_e` datasets. Rows of other tasks are ignored; [] if none remain."""
    kept = {(s.task, s.id): s for s in samples if s.metric.startswith(PREFIX)}
    table: dict[tuple[str, Any], dict[str, list[float]]] = {}
    for row in rows:
        sample = kept.get((row["task"], row["sample"]))
        if sample is None:
            continue
        columns = table.setdefault((row["method"], row["budget"]), {})
        dataset = sample.meta["dataset"]
        columns.setdefault(dataset, []).append(row["score"])
        if dataset.endswith("_e") and sample.meta.get("record_length") is not None:
            bucket = length_bucket(sample.meta["record_length"])
            columns.setdefault(f"{dataset} {bucket}", []).append(row["score"])
    out = []
    for (method, budget), columns in table.items():
        datasets = [c for c in columns if " " not in c]
        entry: dict[str, Any] = {"method": method, "budget": budget}
        entry.update({c: corpus_score(columns[c]) for c in datasets})
        entry["average"] = round(sum(entry[c] for c in datasets) / len(datasets), 2)
        entry.update(paper_averages(entry))
        for c in datasets:
            entry.update({f"{c} {b}": corpus_score(columns[f"{c} {b}"]) for b in BUCKETS
                          if f"{c} {b}" in columns})
        out.append(entry)
    return out


def longbench_markdown(table: Sequence[dict[str, Any]]) -> str:
    """The LongBench table as markdown: method, budget, the datasets, the averages (all datasets, then the
    paper's), then LongBench-E buckets."""
    columns = list(dict.fromkeys(k for entry in table for k in entry if k not in ("method", "budget")))
    averages = ["average", *[c for c in PAPER_AVERAGES if c in columns]]
    datasets = [c for c in columns if " " not in c and c not in averages]
    order = [*datasets, *averages, *[c for c in columns if " " in c]]
    lines = ["| method | budget | " + " | ".join(order) + " |", "|" + "---|" * (len(order) + 2)]
    for entry in table:
        budget = "all" if entry["budget"] is None else str(entry["budget"])
        cells = [f"{entry[c]:.2f}" if c in entry else "" for c in order]
        lines.append(f"| {entry['method']} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def dataset_files(kind: str, folder: str | None, names: list[str]) -> list[str] | None:
    """`longbench:DIR` / `longbench-e:DIR`: one `longbench:FILE` spec per dataset file of the folder; None when
    `folder` is not a folder (a file or hub spec: the task itself)."""
    if folder is None:
        raise HeadscoreError(f"{kind} needs the folder of LongBench's <dataset>.jsonl files ({HUB_LONGBENCH}'s "
                             f"data.zip): {kind}:DIR (or longbench:FILE, longbench:HF_ID:CONFIG)")
    if not Path(folder).expanduser().is_dir():
        return None
    files = [Path(folder) / f"{name}.jsonl" for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise HeadscoreError(f"LongBench folder {folder} lacks {', '.join(missing)}")
    return [f"longbench:{f}" for f in files]


@register_shorthand("longbench:DIR", "the 16 English LongBench datasets, DIR/<dataset>.jsonl from "
                                 "LongBench's data.zip")
def expand_longbench(folder: str | None) -> list[str] | None:
    return dataset_files("longbench", folder, longbench_datasets())


@register_shorthand("longbench-e:DIR", "the 13 LongBench-E datasets")
def expand_longbench_e(folder: str | None) -> list[str] | None:
    found = dataset_files("longbench-e", folder, longbench_e_datasets())
    if found is None:
        raise HeadscoreError(f"longbench-e takes a folder of <dataset>_e.jsonl files, not '{folder}'")
    return found


@register_shorthand("loogle", f"= loogle:{HUB_LOOGLE}, LooGLE's long-dependency QA")
def expand_loogle(source: str | None) -> list[str] | None:
    return [f"loogle:{HUB_LOOGLE}"] if source is None else None
