"""`longbench:SOURCE`: LongBench-format data (`context`, `input`, `answers`, optional `_id`, `dataset`).

SOURCE is a JSONL file, or a Hugging Face dataset `NAME[:CONFIG[:SPLIT]]` (split `test` by default) loaded
through `datasets`. The metric follows LongBench: QA F1 for the QA datasets, ROUGE-L for the summarization
ones, picked from each record's dataset name (`dataset` field, else the `dataset` setting, else the file
stem / config name) unless `metric` overrides it. Contexts longer than `max_length` tokens are cut in the
middle: the first and last `max_length / 2` tokens are kept, as LongBench does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headscore.core.errors import HeadscoreError
from headscore.core.files import read_jsonl
from headscore.core.metrics import METRICS
from headscore.core.prompts import apply_template, encode_prompt
from headscore.evaluation.tasks.base import Sample, Task

QA_DATASETS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa")
SUMMARY_DATASETS = ("gov_report", "qmsum", "multi_news", "samsum")
# LongBench's generation lengths per dataset (tokens)
MAX_NEW_TOKENS = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                  "musique": 32, "triviaqa": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512,
                  "samsum": 128}
QA_INSTRUCTION = ("Answer the question using the text above. Give only the answer, in as few words as "
                  "possible.\n\nQuestion: {input}\nAnswer:")
SUMMARY_INSTRUCTION = "Write a one-page summary of the text above.{focus}\nSummary:"


def base_dataset(name: str) -> str:
    """`hotpotqa_e` (LongBench-E) -> `hotpotqa`."""
    return name[:-2] if name.endswith("_e") else name


def dataset_metric(dataset: str) -> str:
    name = base_dataset(dataset)
    if name in QA_DATASETS:
        return "qa_f1"
    if name in SUMMARY_DATASETS:
        return "rouge_l"
    raise HeadscoreError(f"no metric known for LongBench dataset '{dataset}' (QA F1: "
                         f"{', '.join(QA_DATASETS)}; ROUGE-L: {', '.join(SUMMARY_DATASETS)}); "
                         "pass a metric explicitly")


def middle_truncate(tokenizer: Any, text: str, max_length: int | None) -> str:
    """`text` cut to its first and last `max_length / 2` tokens when it has more than `max_length` tokens."""
    if max_length is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return text
    half = max_length // 2
    head, tail = ids[:half], ids[len(ids) - (max_length - half):]
    return tokenizer.decode(head, skip_special_tokens=True) + tokenizer.decode(tail, skip_special_tokens=True)


def render_instruction(tokenizer: Any, context: str, instruction: str, template: str) -> str:
    """Context then instruction (raw), or both as one user turn of the chat template (chat)."""
    return apply_template(tokenizer, f"{context}\n\n{instruction}", template)


def read_records(source: str) -> tuple[list[dict[str, Any]], str]:
    """Records and a default dataset name from a JSONL file or a Hugging Face dataset spec."""
    path = Path(source).expanduser()
    if path.is_file():
        return [record for _, record in read_jsonl(path, "LongBench file")], path.stem
    if source.endswith(".jsonl") or source.startswith((".", "/", "~")):
        raise HeadscoreError(f"LongBench file not found: {source}")
    name, config, split = (source.split(":") + [None, "test"][len(source.split(":")) - 1:])[:3]
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # datasets raises many types; all mean the same to the user
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HeadscoreError(f"cannot load LongBench dataset '{source}': {first}") from error
    return [dict(record) for record in dataset], config or name.rsplit("/", 1)[-1]


@dataclass
class LongBenchTask(Task):
    """LongBench-format samples from `source`; `limit` keeps the first records; `max_length` in tokens."""

    name = "longbench"
    source: str = ""
    metric: str | None = None
    dataset: str | None = None
    max_length: int | None = None
    limit: int | None = None
    template: str = "raw"
    max_new_tokens: int | None = None

    def samples(self, tokenizer: Any) -> list[Sample]:
        if self.metric is not None and self.metric not in METRICS:
            raise HeadscoreError(f"unknown metric '{self.metric}' (known: {', '.join(sorted(METRICS))})")
        if self.max_length is not None and self.max_length < 2:
            raise HeadscoreError("max_length must be at least 2 tokens")
        records, default_name = read_records(self.source)
        samples = []
        for number, record in enumerate(records[: self.limit]):
            where = f"LongBench source {self.source} record {number}"
            if not isinstance(record, dict):
                raise HeadscoreError(f"{where} is not a JSON object")
            answers = record.get("answers")
            answers = [answers] if isinstance(answers, str) else answers
            if not isinstance(record.get("context"), str) or not isinstance(record.get("input", ""), str):
                raise HeadscoreError(f"{where} needs string fields 'context' and 'input'")
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise HeadscoreError(f"{where} needs 'answers': a non-empty list of strings")
            dataset = str(record.get("dataset") or self.dataset or default_name)
            metric = self.metric or dataset_metric(dataset)
            question = record.get("input") or ""
            if metric == "rouge_l":
                focus = f" Focus on this request: {question}" if question else ""
                instruction = SUMMARY_INSTRUCTION.format(focus=focus)
            else:
                instruction = QA_INSTRUCTION.format(input=question)
            context = middle_truncate(tokenizer, record["context"], self.max_length)
            prompt = render_instruction(tokenizer, context, instruction, self.template)
            max_new = self.max_new_tokens or MAX_NEW_TOKENS.get(base_dataset(dataset),
                                                                512 if metric == "rouge_l" else 64)
            tokens = len(encode_prompt(tokenizer, prompt, self.template)["input_ids"])
            samples.append(Sample(id=str(record.get("_id") or f"{dataset}-{number}"),
                                  task=f"longbench:{dataset}", context=context, question=question,
                                  answers=list(answers), metric=metric, prompt=prompt, length=tokens,
                                  template=self.template, max_new_tokens=max_new,
                                  meta={"dataset": dataset, "context_chars": len(record["context"])}))
        if not samples:
            raise HeadscoreError(f"LongBench source {self.source} holds no records")
        return samples
