"""RULER's raw material: random words and needle values, the three NIAH haystacks (essays, noise, repeated
needles), variable chains, the word lists of cwe / fwe, and the SQuAD / HotpotQA documents of the QA tasks.

Every function takes its `random.Random` explicitly, so a sample is a function of its seed string; `ruler.py`
turns these pieces into prompts and fits them to a length. Word lists come from the `wonderwords` package
(the lists RULER reads); the essays are `core.haystack`'s default Paul Graham essays.
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from headscore.core.errors import HeadscoreError
from headscore.core.files import read_jsonl
from headscore.core.haystack import load_haystack
from headscore.evaluation.tasks.longbench import load_hub

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # RULER's 40 evenly spaced needle depths (%)
NEEDLE_KINDS = ("numbers", "words", "uuids")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]* (?=[\"'(\[]?[A-Z0-9])")


@functools.cache
def wonderwords_list(name: str) -> tuple[str, ...]:
    """One of wonderwords' bundled lists (`nounlist`, `adjectivelist`, `verblist`), one word a line."""
    try:
        text = resources.files("wonderwords.assets").joinpath(f"{name}.txt").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise HeadscoreError("RULER's random words come from the wonderwords package: pip install "
                             "'wonderwords>=3'") from error
    return tuple(line.rstrip() for line in text.splitlines())


@functools.cache
def key_word_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns), sorted and distinct: NIAH's word keys are `adjective-noun`."""
    return tuple(sorted(set(wonderwords_list("adjectivelist")))), tuple(sorted(set(wonderwords_list("nounlist"))))


@functools.cache
def cwe_words() -> tuple[str, ...]:
    """cwe's vocabulary: nouns, adjectives and verbs, sorted and distinct."""
    return tuple(sorted(set(wonderwords_list("nounlist") + wonderwords_list("adjectivelist")
                            + wonderwords_list("verblist"))))


def compound_word(index: int) -> str:
    """The `index`-th `adjective-noun` pair (0 ≤ index < adjectives × nouns)."""
    adjectives, nouns = key_word_parts()
    return f"{adjectives[index // len(nouns)]}-{nouns[index % len(nouns)]}"


def random_value(rng: random.Random, kind: str) -> str:
    """A NIAH key or value: a 7-digit number, an adjective-noun word or a version-4 UUID."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        adjectives, nouns = key_word_parts()
        return compound_word(rng.randrange(len(adjectives) * len(nouns)))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise HeadscoreError(f"unknown needle kind '{kind}': use one of {', '.join(NEEDLE_KINDS)}")


def distinct_values(rng: random.Random, kind: str, count: int, exclude: Sequence[str] = ()) -> list[str]:
    """`count` values of `kind`, distinct from each other and from `exclude`."""
    out: list[str] = []
    taken = set(exclude)
    while len(out) < count:
        value = random_value(rng, kind)
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


@functools.cache
def essay_words(source: str | None) -> tuple[str, ...]:
    """The essays as RULER reads them: every run of whitespace one space, split into words."""
    return tuple(re.sub(r"\s+", " ", load_haystack(source).text).strip().split(" "))


def essay_text(words: Sequence[str], count: int) -> str:
    """The first `count` words (the essays repeated as often as needed), space-joined."""
    repeats = -(-count // len(words))
    return " ".join((list(words) * repeats)[:count] if repeats > 1 else words[:count])


def split_sentences(text: str) -> list[str]:
    """Sentences of single-spaced text: a break after . ! or ? (closing quotes kept) and a space, before a
    capital, a digit or an opening quote. Joining them with spaces gives the text back."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        sentences.append(text[start:match.end() - 1])
        start = match.end()
    tail = text[start:]
    return [*sentences, tail] if tail else sentences


def insert_between_sentences(sentences: Sequence[str], texts: Sequence[str], rng: random.Random) -> str:
    """`texts` (in order) between sentences at distinct depths drawn from `DEPTHS`, everything space-joined
    (a depth-0 text therefore opens with a space, as RULER's)."""
    cuts = [0, *sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(texts))),
            len(sentences)]
    pieces = []
    for i in range(1, len(cuts)):
        pieces.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(texts):
            pieces.append(texts[i - 1])
    return " ".join(pieces)


def insert_between_lines(lines: Sequence[str], texts: Sequence[str], rng: random.Random) -> str:
    """`texts` inserted at distinct random line positions (the first text at the largest), newline-joined."""
    out = list(lines)
    for index, text in zip(sorted(rng.sample(range(len(out)), len(texts)), reverse=True), texts, strict=True):
        out.insert(index, text)
    return "\n".join(out)


def variable_names(rng: random.Random, count: int, letters: int) -> list[str]:
    """`count` distinct names of `letters` capital letters (never `VAR`, the statements' own word)."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names and name != "VAR":
            names.append(name)
    return names


def chain_lines(names: Sequence[str], value: str) -> list[str]:
    """One variable chain: `VAR A = value`, then `VAR B = VAR A ` (RULER's trailing space) and so on."""
    return [f"VAR {names[0]} = {value}", *(f"VAR {b} = VAR {a} " for a, b in zip(names[:-1], names[1:], strict=True))]


def chains_in_noise(noise_lines: int, chains: Sequence[Sequence[str]], rng: random.Random) -> str:
    """Noise sentences, one a line, with each chain's statements at sorted random lines (in chain order)."""
    lines = [NOISE] * noise_lines
    for chain in chains:
        for offset, (position, line) in enumerate(zip(sorted(rng.sample(range(len(lines)), len(chain))), chain,
                                                      strict=True)):
            lines.insert(position + offset, line)
    return "\n".join(lines)


def numbered_word_list(rng: random.Random, count: int, common_repeats: int, uncommon_repeats: int,
                       common: int) -> tuple[str, list[str]]:
    """cwe's list: `count` distinct words, the first `common` repeated `common_repeats` times and the others
    `uncommon_repeats` times, shuffled and numbered `1. w 2. w ...`. Returns (list text, the common words)."""
    pool = cwe_words()
    if count <= len(pool):
        words = rng.sample(pool, count)
    else:  # more words than the lists hold: distinct adjective-noun pairs
        adjectives, nouns = key_word_parts()
        words = [compound_word(i) for i in rng.sample(range(len(adjectives) * len(nouns)), count)]
    listing = words[:common] * common_repeats + words[common:] * uncommon_repeats
    rng.shuffle(listing)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(listing)), words[:common]


def coded_vocabulary(rng: random.Random, size: int, letters: int = 6) -> list[str]:
    """fwe's vocabulary: `size` distinct random lowercase words in random order, the first replaced by `...`
    (the most frequent word is noise)."""
    seen: set[str] = set()
    while len(seen) < size:
        seen.add("".join(rng.choices(string.ascii_lowercase, k=letters)))
    vocabulary = sorted(seen)
    rng.shuffle(vocabulary)
    vocabulary[0] = "..."
    return vocabulary


def zeta_counts(total: int, ranks: int, alpha: float) -> list[int]:
    """How often each rank 1..`ranks` occurs among `total` words of a zeta (Zipf) law: int(total·k^-α / ζ(α))."""
    from scipy.special import zeta

    norm = float(zeta(alpha))
    return [int(total * k ** -alpha / norm) for k in range(1, ranks + 1)]


def coded_text(vocabulary: Sequence[str], total: int, alpha: float, rng: random.Random) -> str:
    """fwe's text: each vocabulary word repeated by its zeta count, shuffled, space-joined."""
    words = [w for w, n in zip(vocabulary, zeta_counts(total, len(vocabulary), alpha), strict=True) for _ in range(n)]
    rng.shuffle(words)
    return " ".join(words)


# ------------------------------------------------------------------------------------------------ QA data

QA_SOURCES: dict[str, dict[str, Any]] = {
    "squad": {"what": "SQuAD v2 dev", "hub": ("rajpurkar/squad_v2", None, "validation"),
              "url": "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json",
              "files": ("squad.json", "dev-v2.0.json", "squad.jsonl")},
    "hotpotqa": {"what": "HotpotQA dev (distractor)", "hub": ("hotpotqa/hotpot_qa", "distractor", "validation"),
                 "url": "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json",
                 "files": ("hotpotqa.json", "hotpot_dev_distractor_v1.json", "hotpotqa.jsonl")},
}


@dataclass(frozen=True)
class QaQuestion:
    """A question, its gold answers, its own documents and (SQuAD) the other paragraphs of its article."""

    query: str
    answers: tuple[str, ...]
    docs: tuple[int, ...]
    more: tuple[int, ...] = ()


@dataclass(frozen=True)
class QaData:
    """RULER's view of a QA set: every distinct document (sorted) and the answerable questions in file order."""

    docs: tuple[str, ...]
    questions: tuple[QaQuestion, ...]


def _squad(rows: Sequence[dict[str, Any]]) -> QaData:
    """SQuAD rows `{title, context, question, answers: {text: [...]}}`; unanswerable ones (no answer) dropped."""
    articles: dict[str, list[str]] = {}
    for row in rows:
        paragraphs = articles.setdefault(row["title"], [])
        if row["context"] not in paragraphs:
            paragraphs.append(row["context"])
    docs = tuple(sorted({c for paragraphs in articles.values() for c in paragraphs}))
    number = {doc: i for i, doc in enumerate(docs)}
    questions = []
    for row in rows:
        answers = row["answers"]["text"] if isinstance(row["answers"], dict) else row["answers"]
        if not answers:
            continue
        own = number[row["context"]]
        questions.append(QaQuestion(row["question"], tuple(answers), (own,),
                                    tuple(number[c] for c in articles[row["title"]] if number[c] != own)))
    return QaData(docs, tuple(questions))


def _squad_original(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The official SQuAD JSON (`data` → articles → paragraphs → qas) as hub-style rows."""
    return [{"title": article["title"], "context": paragraph["context"], "question": qa["question"],
             "answers": [] if qa.get("is_impossible") else [a["text"] for a in qa["answers"]]}
            for article in data["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]


def _hotpot(rows: Sequence[dict[str, Any]]) -> QaData:
    """HotpotQA rows `{question, answer, context}`; a document is `title\\n` + its sentences concatenated."""

    def documents(context: Any) -> list[str]:
        pairs = zip(context["title"], context["sentences"], strict=True) if isinstance(context, dict) else context
        return [f"{title}\n{''.join(sentences)}" for title, sentences in pairs]

    per_row = [documents(row["context"]) for row in rows]
    docs = tuple(sorted({d for ds in per_row for d in ds}))
    number = {doc: i for i, doc in enumerate(docs)}
    return QaData(docs, tuple(QaQuestion(row["question"], (row["answer"],), tuple(number[d] for d in ds))
                              for row, ds in zip(rows, per_row, strict=True)))


def _fetch(dataset: str) -> str:
    source = QA_SOURCES[dataset]
    return (f"download {source['url']} as {source['files'][0]} into a folder and pass --qa-data FOLDER (setting "
            "qa_data)")


def _missing(dataset: str, why: str) -> HeadscoreError:
    return HeadscoreError(f"RULER's {'qa_1' if dataset == 'squad' else 'qa_2'} needs {QA_SOURCES[dataset]['what']}: "
                          f"{why}; {_fetch(dataset)}")


@functools.cache
def load_qa(dataset: str, source: str | None) -> QaData:
    """`dataset` (squad, hotpotqa) from `source`: a folder holding one of `QA_SOURCES[dataset]['files']`
    (the official JSON, or JSONL of hub rows), such a file, or None for the Hugging Face hub."""
    parse = _squad if dataset == "squad" else _hotpot
    if source is None:
        name, config, split = QA_SOURCES[dataset]["hub"]
        what = f"RULER's {'qa_1' if dataset == 'squad' else 'qa_2'} data, {QA_SOURCES[dataset]['what']},"
        return parse(load_hub(name, config, split, what, _fetch(dataset)))
    path = Path(source).expanduser()
    if path.is_dir():
        found = [path / name for name in QA_SOURCES[dataset]["files"] if (path / name).is_file()]
        if not found:
            raise _missing(dataset, f"{path} holds none of {', '.join(QA_SOURCES[dataset]['files'])}")
        path = found[0]
    elif not path.is_file():
        raise _missing(dataset, f"{source} is neither a folder nor a file")
    try:
        if path.suffix == ".jsonl":
            return parse([record for _, record in read_jsonl(path, dataset)])
        data = json.loads(path.read_text(encoding="utf-8"))
        return parse(_squad_original(data) if dataset == "squad" and isinstance(data, dict) else data)
    except (KeyError, TypeError, ValueError) as error:
        raise HeadscoreError(f"{path} is not {QA_SOURCES[dataset]['what']} in the official JSON or hub-row "
                             f"JSONL layout ({type(error).__name__}: {error})") from error


class QaDocuments:
    """A question's documents for any count, as RULER picks them: its own first, then (SQuAD) the rest of its
    article, then other documents at random; all documents repeated when more are asked than exist. The random
    orders are drawn once, so a larger count extends a smaller one."""

    def __init__(self, data: QaData, question: QaQuestion, rng: random.Random):
        self.data, self.question = data, question
        self.more = rng.sample(question.more, len(question.more))
        own = set(question.docs) | set(question.more)
        self.others = [i for i in range(len(data.docs)) if i not in own]
        rng.shuffle(self.others)

    def pick(self, count: int) -> list[int]:
        own, more = list(self.question.docs), self.more
        if count >= len(self.data.docs):
            return (list(range(len(self.data.docs))) * -(-count // len(self.data.docs)))[:count]
        if count - len(own) > len(more):
            return own + more + self.others[:count - len(own) - len(more)]
        return own + more[:count - len(own)]
