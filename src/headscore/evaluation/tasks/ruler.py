"""RULER's 13 tasks (NVIDIA/RULER `scripts/synthetic.yaml`), generated here for the evaluated model's tokenizer.

`ruler:NAME` specs: the eight needle tasks (`niah_*`), variable tracking (`vt`), common and frequent words
extraction (`cwe`, `fwe`) and QA on SQuAD (`qa_1`) and HotpotQA (`qa_2`). Each sample's user message is RULER's
task template (preamble, context, query), wrapped by the prompt template (`raw`: RULER's `base`; `chat`: the
tokenizer's chat template), followed by RULER's answer prefix, which therefore opens the assistant's turn.
`Sample.question` is the query sentence: the question part of the prompt starts at `prompt.rfind(question)`.
Lengths count the whole prompt plus the task's generated tokens, as RULER's `max_seq_length` does; each
sample's haystack is the largest that fits (searched per sample). Metrics: `string_match_all` (the share of gold
answers found in the prediction, case-insensitive) and `string_match_part` (QA: any gold answer found).
Differences from RULER's scripts are listed in docs/ruler.md.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from headscore.core.errors import HeadscoreError
from headscore.core.prompts import TEMPLATES, apply_template, encode_prompt
from headscore.evaluation.tasks import ruler_haystacks as hay
from headscore.evaluation.tasks.base import Sample, Task, register_shorthand, register_task

RULER_COMMIT = "c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a"  # the NVIDIA/RULER commit these definitions follow
VT_ICL_TOKENS = 500  # RULER's in-context vt example fills at most this many tokens


@dataclass(frozen=True)
class RulerSpec:
    """One task of RULER's `synthetic.yaml`: its generator (`kind`) and arguments, and its tokens to generate."""

    kind: str
    tokens: int
    haystack: str = "essay"
    key: str = "words"
    value: str = "numbers"
    keys: int = 1
    values: int = 1
    queries: int = 1
    chains: int = 1
    hops: int = 4
    freq_common: int = 30
    freq_uncommon: int = 3
    common: int = 10
    alpha: float = 2.0
    dataset: str = ""

    @property
    def metric(self) -> str:
        return "string_match_part" if self.kind == "qa" else "string_match_all"


RULER_TASKS: dict[str, RulerSpec] = {
    "niah_single_1": RulerSpec("niah", 128, haystack="noise"),
    "niah_single_2": RulerSpec("niah", 128),
    "niah_single_3": RulerSpec("niah", 128, value="uuids"),
    "niah_multikey_1": RulerSpec("niah", 128, keys=4),
    "niah_multikey_2": RulerSpec("niah", 128, haystack="needle"),
    "niah_multikey_3": RulerSpec("niah", 128, haystack="needle", key="uuids", value="uuids"),
    "niah_multivalue": RulerSpec("niah", 128, values=4),
    "niah_multiquery": RulerSpec("niah", 128, queries=4),
    "vt": RulerSpec("vt", 30, haystack="noise"),
    "cwe": RulerSpec("cwe", 120),
    "fwe": RulerSpec("fwe", 50),
    "qa_1": RulerSpec("qa", 32, dataset="squad"),
    "qa_2": RulerSpec("qa", 32, dataset="hotpotqa"),
}
RULER_SYNTHETIC = tuple(name for name, spec in RULER_TASKS.items() if spec.kind != "qa")

VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            "ones that appear most often.\n")
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. ")
FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_INSTRUCTION = ("Answer the question based on the given documents. Only give me the answer and do not output any "
                  "other words.")
QA_HEAD = f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n"


@dataclass(frozen=True)
class Parts:
    """A sample's user message `head + context + middle + question`, its answer prefix and gold answers;
    `queries`: (question, answer prefix, answers) of each single question a multi-query sample holds."""

    head: str
    context: str
    middle: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    queries: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


Builder = Callable[[int], Parts]  # haystack size (words, lines, documents) -> the sample's parts


def niah_wording(kind: str, query: str, single: bool) -> tuple[str, str, str]:
    """(preamble, question, answer prefix) of RULER's niah template; `single` (one query, one value): RULER's
    singular rewrite (A ... is, What is, kind without its plural s)."""
    some, are, what, kind = ("A", "is", "What is", kind[:-1]) if single else ("Some", "are", "What are all", kind)
    return (f"{some} special magic {kind} {are} hidden within the following text. Make sure to memorize it. I "
            f"will quiz you about the {kind} afterwards.\n",
            f"{what} the special magic {kind} for {query} mentioned in the provided text?",
            f" The special magic {kind} for {query} mentioned in the provided text {are}")


def niah_builder(spec: RulerSpec, key: str, words: Sequence[str]) -> tuple[int, Builder]:
    rng = random.Random(key)
    keys = hay.distinct_values(rng, spec.key, max(spec.keys, spec.queries))
    values = [hay.distinct_values(rng, spec.value, spec.values) for _ in keys]
    needles = [hay.NEEDLE.format(kind=spec.value, key=k, value=v) for k, vs in zip(keys, values, strict=True)
               for v in vs]
    rng.shuffle(needles)
    asked = rng.sample(range(len(keys)), spec.queries)
    queried = [keys[i] for i in asked]
    query = ", ".join(queried[:-1]) + ", and " + queried[-1] if len(queried) > 1 else queried[0]
    head, question, prefix = niah_wording(spec.value, query, spec.queries * spec.values == 1)
    queries = tuple((*niah_wording(spec.value, keys[i], spec.values == 1)[1:], tuple(values[i])) for i in asked)

    def build(size: int) -> Parts:
        place = random.Random(f"{key}/place")
        if spec.haystack == "essay":
            context = hay.insert_between_sentences(hay.split_sentences(hay.essay_text(words, size)), needles, place)
        else:
            lines = [hay.NOISE] * size
            if spec.haystack == "needle":
                draws = random.Random(f"{key}/haystack")
                lines = [hay.NEEDLE.format(kind=spec.value, key=hay.distinct_values(draws, spec.key, 1, keys)[0],
                                           value=hay.random_value(draws, spec.value)) for _ in range(size)]
            context = hay.insert_between_lines(lines, needles, place)
        return Parts(head, context, "\n", question, prefix, tuple(v for i in asked for v in values[i]),
                     {"keys": keys, "needles": needles}, queries if spec.queries > 1 else ())

    return (len(needles) if spec.haystack != "essay" else 1), build


def vt_text(noise: int, chains: Sequence[Sequence[str]], values: Sequence[str], hops: int,
            rng: random.Random) -> tuple[str, str, str]:
    """(context, question, answer prefix) of a vt task with `noise` noise lines; `values[i]` starts chain i."""
    lines = [hay.chain_lines(names, value) for names, value in zip(chains, values, strict=True)]
    return (hay.chains_in_noise(noise, lines, rng),
            f"Question: Find all variables that are assigned the value {values[0]} in the text above.",
            f" Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
            f"are assigned the value {values[0]}, they are: ")


@dataclass(frozen=True)
class VtExample:
    """RULER's in-context vt example: `noise` lines (fitted once to `VT_ICL_TOKENS` with value 12345), its
    placement seed; every sample renders it with fresh 3-letter names and a fresh value."""

    noise: int
    seed: str
    chains: int
    hops: int

    def text(self, rng: random.Random) -> str:
        names = hay.variable_names(rng, self.chains * (self.hops + 1), 3)
        return self.render([names[i * (self.hops + 1):(i + 1) * (self.hops + 1)] for i in range(self.chains)],
                           [str(rng.randrange(10000, 99999)) for _ in range(self.chains)])

    def render(self, chains: Sequence[Sequence[str]], values: Sequence[str]) -> str:
        context, question, prefix = vt_text(self.noise, chains, values, self.hops, random.Random(self.seed))
        return f"{VT_HEAD}{context}\n{question}{prefix} {' '.join(chains[0])}\n"


def vt_example(spec: RulerSpec, seed: str, tokenizer: Any) -> VtExample:
    """The in-context example, fitted like RULER's: at most `VT_ICL_TOKENS` tokens, value 12345."""
    hops = min(10, spec.hops)
    names = hay.variable_names(random.Random(seed), spec.chains * (hops + 1), 3)
    chains = [names[i * (hops + 1):(i + 1) * (hops + 1)] for i in range(spec.chains)]

    def fits(noise: int) -> bool:
        example = VtExample(noise, f"{seed}/place", spec.chains, hops)
        text = example.render(chains, ["12345"] * spec.chains)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= VT_ICL_TOKENS

    return VtExample(largest_fitting(fits, hops + 1, hops + 1, "vt's in-context example"), f"{seed}/place",
                     spec.chains, hops)


def vt_builder(spec: RulerSpec, key: str, example: VtExample) -> tuple[int, Builder]:
    rng = random.Random(key)
    names = hay.variable_names(rng, spec.chains * (spec.hops + 1), 5)
    chains = [names[i * (spec.hops + 1):(i + 1) * (spec.hops + 1)] for i in range(spec.chains)]
    values = [str(rng.randrange(10000, 99999)) for _ in chains]
    head = f"{example.text(rng)}\n{VT_HEAD}"

    def build(size: int) -> Parts:
        context, question, prefix = vt_text(size, chains, values, spec.hops, random.Random(f"{key}/place"))
        return Parts(head, context, "\n", question, prefix, tuple(chains[0]), {"value": values[0]})

    return spec.hops + 1, build


def cwe_builder(spec: RulerSpec, key: str, length: int) -> tuple[int, Builder]:
    short = length < 4096  # RULER's switch: below 4096 tokens, lower frequencies and a smaller example
    rng = random.Random(key)
    shot, shot_common = hay.numbered_word_list(rng, 20 if short else 40, 3 if short else 10, 1 if short else 3,
                                               spec.common)
    answer = " ".join(f"{i + 1}. {word}" for i, word in enumerate(shot_common))
    head = f"{CWE_HEAD}{shot}\n{CWE_QUESTION}{CWE_PREFIX} {answer}\n{CWE_HEAD}"
    repeats = (6, 1) if short else (spec.freq_common, spec.freq_uncommon)

    def build(size: int) -> Parts:
        context, common = hay.numbered_word_list(random.Random(f"{key}/list"), size, *repeats, spec.common)
        return Parts(head, context, "\n", CWE_QUESTION, CWE_PREFIX, tuple(common),
                     {"repeats": list(repeats)})

    return spec.common, build


def fwe_builder(spec: RulerSpec, key: str, length: int, generate: int) -> tuple[int, Builder]:
    size = (length - generate) // 50  # RULER's vocabulary size
    if size < 4:
        raise HeadscoreError(f"ruler:fwe needs a length of at least {200 + generate + 50} tokens, got {length}")
    vocabulary = hay.coded_vocabulary(random.Random(key), size)

    def build(words: int) -> Parts:
        context = hay.coded_text(vocabulary, words, spec.alpha, random.Random(f"{key}/text"))
        return Parts(FWE_HEAD, context, "\n", FWE_QUESTION, FWE_PREFIX, tuple(vocabulary[1:4]),
                     {"vocabulary": size})

    return 10, build


def qa_builder(spec: RulerSpec, key: str, data: hay.QaData, index: int) -> tuple[int, Builder]:
    if index >= len(data.questions):
        raise HeadscoreError(f"ruler qa ({spec.dataset}) has {len(data.questions)} answerable questions, fewer "
                             f"than the {index + 1} samples asked")
    question = data.questions[index]
    documents = hay.QaDocuments(data, question, random.Random(key))

    def build(count: int) -> Parts:
        picked = documents.pick(count)
        random.Random(f"{key}/order").shuffle(picked)
        context = "\n\n".join(f"Document {i + 1}:\n{data.docs[d]}" for i, d in enumerate(picked))
        return Parts(QA_HEAD, context, "\n\n", f"{QA_INSTRUCTION}\n\nQuestion: {question.query}", " Answer:",
                     question.answers, {"question_index": index})

    return len(question.docs), build


def largest_fitting(fits: Callable[[int], bool], low: int, hint: int, what: str) -> int:
    """The largest size ≥ `low` that `fits` (assumed to grow monotonically into not fitting): galloping up or
    down from `hint` with doubling steps, then bisection."""
    if not fits(low):
        raise HeadscoreError(f"{what}: the length is too short even for the smallest haystack")
    hint = max(hint, low)
    step = max(1, hint // 16)
    if fits(hint):
        good = hint
        while fits(good + step):
            good, step = good + step, step * 2
            if good > 1 << 32:
                raise HeadscoreError(f"{what}: the haystack grows without reaching the length")
        bad = good + step
    else:
        bad = hint
        while not fits(max(low, bad - step)):
            bad, step = max(low, bad - step), step * 2
        good = max(low, bad - step)
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


@dataclass
class RulerTask(Task):
    """`samples_per_length` samples of RULER's task `task` at each target length (tokens, the generated ones
    included). `haystack`: the essays' source (`core.haystack`); `qa_data`: where SQuAD / HotpotQA are (a folder
    or file, None: the hub); `max_new_tokens`: RULER's tokens to generate unless given."""

    name: ClassVar[str] = "ruler"
    task: str = "niah_single_1"
    lengths: Sequence[int] = (4096,)
    samples_per_length: int = 4
    seed: int = 42
    haystack: str | None = None
    qa_data: str | None = None
    template: str = "raw"
    max_new_tokens: int | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "task": f"ruler:{self.task}"}

    def samples(self, tokenizer: Any) -> list[Sample]:
        spec = RULER_TASKS.get(self.task)
        if spec is None:
            raise HeadscoreError(f"unknown RULER task '{self.task}': use one of {', '.join(RULER_TASKS)}")
        if self.template not in TEMPLATES:
            raise HeadscoreError(f"unknown template '{self.template}': use one of {', '.join(TEMPLATES)}")
        if self.samples_per_length < 1:
            raise HeadscoreError("ruler: samples_per_length must be at least 1")
        generate = self.max_new_tokens or spec.tokens
        words = hay.essay_words(self.haystack) if spec.kind == "niah" and spec.haystack == "essay" else ()
        data = hay.load_qa(spec.dataset, self.qa_data) if spec.kind == "qa" else None
        example = vt_example(spec, f"{self.seed}-{self.task}-example", tokenizer) if spec.kind == "vt" else None
        out: list[Sample] = []
        for length in self.lengths:
            first: int | None = None  # the first sample's size: where the others' searches start
            for index in range(self.samples_per_length):
                key = f"{self.seed}-{self.task}-{length}-{index}"
                if spec.kind == "niah":
                    low, build = niah_builder(spec, key, words)
                elif spec.kind == "vt":
                    low, build = vt_builder(spec, key, example)  # type: ignore[arg-type]  # set for vt
                elif spec.kind == "cwe":
                    low, build = cwe_builder(spec, key, length)
                elif spec.kind == "fwe":
                    low, build = fwe_builder(spec, key, length, generate)
                else:
                    low, build = qa_builder(spec, key, data, index)  # type: ignore[arg-type]  # set for qa
                size, parts, prompt, tokens = self.fit(tokenizer, build, low, max(low, first or low),
                                                       length - generate, f"ruler:{self.task} at length {length}")
                first = first or size
                out.append(self.sample(tokenizer, parts, prompt, tokens, length, index, size, generate, spec))
        return out

    def fit(self, tokenizer: Any, build: Builder, low: int, start: int, budget: int, what: str
            ) -> tuple[int, Parts, str, int]:
        """(size, parts, prompt, prompt tokens) of the largest haystack whose prompt holds at most `budget`
        tokens (searched from `start`)."""
        built: dict[int, tuple[Parts, str, int]] = {}

        def fits(size: int) -> bool:
            if size not in built:
                parts = build(size)
                prompt = self.render(tokenizer, parts)
                built[size] = (parts, prompt, len(encode_prompt(tokenizer, prompt, self.template)["input_ids"]))
            return built[size][2] <= budget

        if not fits(low):
            raise HeadscoreError(f"{what} is too short: the smallest haystack already makes a prompt of "
                                 f"{built[low][2]} tokens, over the {budget} left beside the generated tokens")
        size = largest_fitting(fits, low, start, what)
        return (size, *built[size])

    def render(self, tokenizer: Any, parts: Parts) -> str:
        """The prompt: the user message in the template, then the answer prefix."""
        text = parts.head + parts.context + parts.middle + parts.question
        return apply_template(tokenizer, text, self.template) + parts.answer_prefix

    def sample(self, tokenizer: Any, parts: Parts, prompt: str, tokens: int, length: int, index: int, size: int,
               generate: int, spec: RulerSpec) -> Sample:
        split = prompt.rfind(parts.question)
        if split < 0:
            raise HeadscoreError(f"the '{self.template}' template changed RULER's question text: use raw or chat")
        queries = []
        for question, prefix, answers in parts.queries:
            single = self.render(tokenizer, replace(parts, question=question, answer_prefix=prefix))
            at = single.rfind(question)
            if single[:at] != prompt[:split]:
                raise HeadscoreError(f"the '{self.template}' template renders the context differently for "
                                     "another question")
            queries.append({"question": question, "answer_prefix": prefix, "answers": list(answers),
                            "suffix": single[at:]})
        meta = {"ruler_task": self.task, "answer_prefix": parts.answer_prefix, "haystack_size": size,
                **parts.meta, **({"queries": queries} if queries else {})}
        return Sample(id=f"ruler:{self.task}-L{length}-S{index}", task=f"ruler:{self.task}", context=parts.context,
                      question=parts.question, answers=list(parts.answers), metric=spec.metric, prompt=prompt,
                      length=tokens, template=self.template, max_new_tokens=generate, stop="eos",
                      target_length=length, meta=meta)


for _name in RULER_TASKS:  # one class, a family of names: ruler:NAME fixes the task
    register_task(f"ruler:{_name}", group="ruler", task=_name)(RulerTask)


@register_shorthand("ruler-synthetic", "RULER's 11 tasks that need no downloaded data")
def ruler_synthetic(argument: str | None) -> list[str] | None:
    """`ruler-synthetic` → the 11 `ruler:NAME` specs without downloaded data."""
    return None if argument is not None else [f"ruler:{name}" for name in RULER_SYNTHETIC]
