"""Needle definitions and needle-in-a-haystack trial construction with exact answer token spans.

A trial is a `Trial` record, one JSON object per line of the trials file (`write_trials` / `read_trials`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_write_text, fingerprint_bytes, read_jsonl
from headscore.core.haystack import Haystack, load_haystack, load_haystack_parts
from headscore.core.model import load_geometry, load_tokenizer
from headscore.core.prompts import (
    NEEDLE_TEMPLATES,
    SPAN_RULES,
    HaystackTokens,
    OfficialHaystack,
    answer_token_span,
    encode_prompt,
    evenly_spaced,
    official_answer_span,
    place_texts,
    render_prompt,
    tokenizer_fingerprint,
)

NEEDLE_FILES = {"reasoning": "reasoning.jsonl", "retrieval": "retrieval.jsonl"}
CONTEXT_BUFFER = 200  # tokens kept free below the model's context for the answer


@dataclass(frozen=True)
class Needle:
    """One needle: the inserted text, its question, and the answer the model should give.

    `answer` is the text scored against the response and located (case-insensitively) inside `needle`.
    """

    id: str
    needle: str
    question: str
    answer: str


@dataclass(frozen=True, kw_only=True)
class Trial:
    """One needle-in-a-haystack trial: the rendered `prompt`, the `answer` and its token span `[start, end)` in
    the tokenized prompt (`encode_prompt(tokenizer, prompt, template)`), plus how it was built.

    The fields are the keys of a trials-file line, in the order `build-needles` writes them. Only `id`,
    `prompt`, `answer`, `answer_span`, `template` and `tokenizer_fingerprint` are required (`TRIAL_FIELDS`);
    the others are None when a hand-made file leaves them out, and keys no field names are kept in `extra`.
    `Trial.from_dict(d).to_dict() == d` for every line, so rewriting a file keeps its bytes.
    """

    id: str
    kind: str | None = None
    needle_id: str | None = None
    target_length: int | None = None
    length: int | None = None  # prompt tokens
    depth: float | None = None  # needle depth, % of the context
    template: str
    question: str | None = None
    answer: str
    answer_span: tuple[int, int]
    answer_chars: tuple[int, int] | None = None  # the answer's characters in `prompt`
    tokenizer: str | None = None
    tokenizer_fingerprint: str
    haystack_fingerprint: str | None = None
    needles_fingerprint: str | None = None
    prompt: str
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Trial:
        """A trial from one trials-file line (the required keys must be there: `read_trials` checks)."""
        names = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {k: tuple(v) if k in ("answer_span", "answer_chars") and isinstance(v, list)
                                  else v for k, v in record.items() if k in names}
        return cls(**values, extra={k: v for k, v in record.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        """The trials-file line: every field that is set, in field order, then `extra`."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return {**out, **self.extra}


def needles_dir() -> Path:
    """`needles/` at the repository root (editable installs) or inside the installed package."""
    package = Path(__file__).resolve().parents[1]  # src/headscore (editable) or site-packages/headscore
    for candidate in (package / "needles", package.parents[1] / "needles"):
        if candidate.is_dir():
            return candidate
    raise HeadscoreError("needle definitions not found (expected a 'needles/' folder)")


def load_needles(kind_or_path: str) -> tuple[list[Needle], str]:
    """Needles of a kind (`reasoning`, `retrieval`) or from a JSONL file; returns (needles, fingerprint).

    Each line: {"id"?, "needle", "question", "answer" or "real_needle"}; the answer must occur in the needle.
    """
    path = needles_dir() / NEEDLE_FILES[kind_or_path] if kind_or_path in NEEDLE_FILES else Path(kind_or_path)
    if not path.is_file():
        raise HeadscoreError(f"needle file not found: {kind_or_path}")
    raw = path.read_text(encoding="utf-8")
    needles: list[Needle] = []
    for number, record in read_jsonl(path, "needle file"):
        where = f"needle file {path} line {number}"
        if not isinstance(record, dict):
            raise HeadscoreError(f"{where} is not a JSON object")
        given = record.get("answer", record.get("real_needle"))
        for field, value in (("needle", record.get("needle")), ("question", record.get("question")),
                             ("answer", given)):
            if not isinstance(value, str) or not value.strip():
                raise HeadscoreError(f"{where} has no non-empty string field '{field}'")
        answer = str(given)
        if answer.lower() not in record["needle"].lower():
            raise HeadscoreError(f"{where}: the answer does not occur in the needle")
        needles.append(Needle(id=str(record.get("id", f"{path.stem}-{len(needles)}")),
                              needle=record["needle"], question=record["question"], answer=answer))
    if not needles:
        raise HeadscoreError(f"needle file {path} holds no needles")
    return needles, fingerprint_bytes(raw)


def context_lengths(min_length: int, max_length: int | None, count: int, max_context: int | None,
                    past_context: bool = False) -> list[int]:
    """`count` target prompt lengths evenly spaced over [min_length, max_length] (in model tokens), rounded
    half-to-even as the authors' `np.round(np.linspace(...))`.

    The default `max_length` (None) is 8000 capped at the model's context minus a 200-token buffer;
    an explicit value above that cap is an error unless `past_context` (the official template: the authors
    run 10000 on Llama-3's 8192 positions; `build_needle_trials` warns instead).
    """
    cap = max_context - CONTEXT_BUFFER if max_context else None
    if min_length < 0:
        raise HeadscoreError(f"--min-length must be at least 0, got {min_length}")
    if max_length is None:
        max_length = min(8000, cap) if cap else 8000
    elif cap is not None and max_length > cap and not past_context:
        raise HeadscoreError(f"--max-length {max_length} is above the model's context "
                             f"({max_context} tokens, minus a {CONTEXT_BUFFER}-token buffer = {cap})")
    if count < 1:
        raise HeadscoreError("--lengths must be at least 1")
    if min_length > max_length:
        raise HeadscoreError(f"--min-length {min_length} is above the maximum length {max_length}")
    return evenly_spaced(min_length, max_length, count)


def depth_percents(count: int, whole: bool = False) -> list[float]:
    """`count` depths evenly spaced over 0–100 %; `whole`: rounded to whole percents, as the authors' grid
    (`np.round(np.linspace(0, 100, count))`: 0, 11, 22, ... for 10)."""
    if count < 1:
        raise HeadscoreError("--depths must be at least 1")
    if count == 1:
        return [0.0]
    return [float(round(100 * i / (count - 1))) if whole else round(100 * i / (count - 1), 2)
            for i in range(count)]


def build_trials(
    tokenizer: Any,
    haystack: Haystack | Sequence[Haystack],
    needles: Sequence[Needle],
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    kind: str,
    template: str = "raw",
    model_name: str = "",
    needles_fingerprint: str = "",
    progress: Callable[[], None] | None = None,
    span: str = "answer",
) -> list[Trial]:
    """One trial per (length, depth, needle), in that nesting order.

    `haystack`: one for every needle, or one per needle (the authors' `part{i}` folders). `raw` and `chat`
    prompts hold about `length` tokens, the needle placed by `prompts.place_texts`; `official` prompts are
    the authors' construction (`prompts.OfficialHaystack`: at most `length - 200` context tokens, then the
    question; length 0 gives the needle and the question only). Each trial's `answer_span` is the token span
    `[start, end)` of the answer inside the tokenized prompt (`encode_prompt`), found from the tokenizer's
    character offsets (`span` "answer"), or by the authors' token-overlap search (`span` "official",
    `prompts.official_answer_span`: the r2 rule for `kind` reasoning, Retrieval_Head's for retrieval).
    """
    if span not in SPAN_RULES:
        raise HeadscoreError(f"unknown span rule '{span}': use one of {', '.join(SPAN_RULES)}")
    hays = [haystack] * len(needles) if isinstance(haystack, Haystack) else list(haystack)
    if len(hays) != len(needles):
        raise HeadscoreError(f"{len(needles)} needles need as many haystacks, got {len(hays)}")
    groups: dict[str, list[Needle]] = {}
    for hay_of, needle in zip(hays, needles, strict=True):
        groups.setdefault(hay_of.fingerprint, []).append(needle)
    first = {h.fingerprint: h for h in reversed(hays)}
    official: dict[str, OfficialHaystack] | None = None
    fillers: dict[str, Any] = {}
    budgets: dict[tuple[int, str], int] = {}
    if template == "official":
        official = {fp: OfficialHaystack(tokenizer, first[fp].text, max(lengths)) for fp in groups}
    else:
        for fp, group in groups.items():
            fillers[fp], room = filler_budgets(tokenizer, first[fp], group, lengths, template)
            budgets.update(room)
    tok_fp = tokenizer_fingerprint(tokenizer)
    trials = []
    for length in lengths:
        for depth in depths:
            for number, needle in enumerate(needles):
                hay_fp = hays[number].fingerprint
                if official is not None:
                    prompt, answer_chars = official[hay_fp].prompt(needle.needle, needle.question, needle.answer,
                                                                   length, depth)
                else:
                    context, (at,) = place_texts(fillers[hay_fp], budgets[(length, needle.id)], [needle.needle],
                                                 [depth])
                    prompt = render_prompt(tokenizer, context, needle.question, template)
                    answer_at = prompt.index(context) + at + needle.needle.lower().index(needle.answer.lower())
                    answer_chars = (answer_at, answer_at + len(needle.answer))
                encoded = encode_prompt(tokenizer, prompt, template, offsets=True)
                if span == "official":
                    found = official_answer_span(tokenizer, encoded["input_ids"], needle.answer, kind)
                else:
                    found = answer_token_span(encoded["offset_mapping"], *answer_chars)
                trials.append(Trial(
                    id=f"{kind}-L{length}-D{depth:g}-N{number}",
                    kind=kind,
                    needle_id=needle.id,
                    target_length=length,
                    length=len(encoded["input_ids"]),
                    depth=depth,
                    template=template,
                    question=needle.question,
                    answer=needle.answer,
                    answer_span=(found[0], found[1]),
                    answer_chars=answer_chars,
                    tokenizer=model_name,
                    tokenizer_fingerprint=tok_fp,
                    haystack_fingerprint=hay_fp,
                    needles_fingerprint=needles_fingerprint,
                    prompt=prompt,
                ))
                if progress:
                    progress()
    return trials


def filler_budgets(tokenizer: Any, haystack: Haystack, needles: Sequence[Needle], lengths: Sequence[int],
                   template: str) -> tuple[HaystackTokens, dict[tuple[int, str], int]]:
    """Raw/chat prompts: the haystack tokens and, per (length, needle id), how many of them fill the prompt
    to about `length` tokens with the needle and the question."""
    overheads = {n.id: len(encode_prompt(tokenizer, render_prompt(tokenizer, "", n.question, template),
                                         template)["input_ids"]) for n in needles}
    needle_tokens = {n.id: len(tokenizer(n.needle, add_special_tokens=False)["input_ids"]) for n in needles}
    budgets = {(length, n.id): length - overheads[n.id] - needle_tokens[n.id] for length in lengths
               for n in needles}
    for (length, needle_id), budget in budgets.items():
        if budget < 16:
            raise HeadscoreError(f"length {length} is too short to hold needle '{needle_id}' and its "
                                 f"question (needs at least {length - budget + 16} tokens)")
    return HaystackTokens(tokenizer, haystack.text, max(budgets.values())), budgets


def write_trials(path: str | Path, trials: Sequence[Trial]) -> None:
    atomic_write_text(path, "".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in trials))


TRIAL_FIELDS = ("id", "prompt", "answer", "answer_span", "template", "tokenizer_fingerprint")


def read_trials(path: str | Path) -> list[Trial]:
    """Read a trials JSONL file written by `build-needles`, checking the fields later stages need."""
    path = Path(path)
    if not path.is_file():
        raise HeadscoreError(f"trial file not found: {path}")
    trials = []
    for number, record in read_jsonl(path, "trial file"):
        if not isinstance(record, dict):
            raise HeadscoreError(f"trial file {path} line {number} is not a JSON object")
        missing = [f for f in TRIAL_FIELDS if f not in record]
        if missing:
            raise HeadscoreError(f"trial file {path} line {number} lacks {', '.join(missing)}")
        trials.append(Trial.from_dict(record))
    if not trials:
        raise HeadscoreError(f"trial file {path} holds no trials")
    return trials


def trials_fingerprint(trials: Sequence[Trial]) -> str:
    return fingerprint_bytes(*(json.dumps(t.to_dict(), sort_keys=True) for t in trials))


def build_needle_trials(
    model: str,
    *,
    kind: str = "reasoning",
    haystack: str | None = None,
    needles: str | None = None,
    min_length: int = 1000,
    max_length: int | None = None,
    lengths: int = 5,
    depths: int = 10,
    template: str = "raw",
    progress: Callable[[], None] | None = None,
    warn: Callable[[str], None] | None = None,
    span: str = "answer",
) -> list[Trial]:
    """The trial set for `model`'s tokenizer: `lengths` × `depths` × needles records (see `build_trials`).

    A `haystack` folder with `part0/`, `part1/`, ... subfolders gives needle i the texts of the i-th part in
    numeric order (the authors' layout: `part{i}` for needle i of the r2 set, part1..3 for the three retrieval
    needles). With the official template, lengths may exceed the model's context: `warn` (default
    `warnings.warn`) is told how many prompts do, as the authors run them anyway.
    """
    if kind not in NEEDLE_FILES:
        raise HeadscoreError(f"unknown needle kind '{kind}': use one of {', '.join(NEEDLE_FILES)}")
    if template not in NEEDLE_TEMPLATES:
        raise HeadscoreError(f"unknown template '{template}': use one of {', '.join(NEEDLE_TEMPLATES)}")
    needle_list, needle_fp = load_needles(needles or kind)
    geometry = load_geometry(model)
    official = template == "official"
    target_lengths = context_lengths(min_length, max_length, lengths, geometry.max_context, past_context=official)
    depth_list = depth_percents(depths, whole=official)
    tokenizer = load_tokenizer(model)
    parts = load_haystack_parts(haystack)
    if parts is not None and len(parts) < len(needle_list):
        raise HeadscoreError(f"haystack {haystack} has {len(parts)} part folders for {len(needle_list)} needles")
    hay = parts[: len(needle_list)] if parts is not None else load_haystack(haystack)
    trials = build_trials(tokenizer, hay, needle_list, lengths=target_lengths, depths=depth_list, kind=kind,
                          template=template, model_name=model, needles_fingerprint=needle_fp,
                          progress=progress, span=span)
    context = geometry.max_context
    past = [t.length for t in trials if context and t.length is not None and t.length > context]
    if past:
        (warn or warnings.warn)(f"{len(past)} of {len(trials)} prompts are longer than the model's "
                                f"{context} positions (up to {max(past)} tokens)")
    return trials
