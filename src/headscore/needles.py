"""Needle definitions and needle-in-a-haystack trial construction with exact answer token spans."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headscore.errors import HeadscoreError
from headscore.files import fingerprint_bytes, read_jsonl
from headscore.haystack import Haystack

NEEDLE_FILES = {"reasoning": "reasoning.jsonl", "retrieval": "retrieval.jsonl"}
TEMPLATES = ("raw", "chat")
QUESTION_TEMPLATE = "Based on the content of the book, Question: {question}"
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


def needles_dir() -> Path:
    """`needles/` at the repository root (editable installs) or inside the installed package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "needles", here.parent.parent / "needles"):
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
    needles = []
    for number, record in read_jsonl(path, "needle file"):
        where = f"needle file {path} line {number}"
        if not isinstance(record, dict):
            raise HeadscoreError(f"{where} is not a JSON object")
        answer = record.get("answer", record.get("real_needle"))
        for field, value in (("needle", record.get("needle")), ("question", record.get("question")),
                             ("answer", answer)):
            if not isinstance(value, str) or not value.strip():
                raise HeadscoreError(f"{where} has no non-empty string field '{field}'")
        if answer.lower() not in record["needle"].lower():
            raise HeadscoreError(f"{where}: the answer does not occur in the needle")
        needles.append(Needle(id=str(record.get("id", f"{path.stem}-{len(needles)}")),
                              needle=record["needle"], question=record["question"], answer=answer))
    if not needles:
        raise HeadscoreError(f"needle file {path} holds no needles")
    return needles, fingerprint_bytes(raw)


def render_prompt(tokenizer: Any, context: str, question: str, template: str = "raw") -> str:
    """The prompt text: context, then the question (raw), or the same as one chat user turn (chat)."""
    ask = QUESTION_TEMPLATE.format(question=question)
    return apply_template(tokenizer, f"{context}\n\n{ask}", template, raw_suffix="\nAnswer:")


def apply_template(tokenizer: Any, text: str, template: str, raw_suffix: str = "") -> str:
    """`raw`: the text (plus `raw_suffix`); `chat`: the text as one user turn of the tokenizer's chat
    template, with the generation prompt."""
    if template == "raw":
        return text + raw_suffix
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise HeadscoreError("template 'chat' needs a tokenizer with a chat template")
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise HeadscoreError(f"unknown template '{template}': use one of {', '.join(TEMPLATES)}")


def encode_prompt(tokenizer: Any, prompt: str, template: str = "raw", offsets: bool = False) -> dict:
    """Tokenize a prompt the one way every stage does: raw prompts get the tokenizer's special tokens,
    chat prompts already carry them as text."""
    return tokenizer(prompt, add_special_tokens=template == "raw", return_offsets_mapping=offsets)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return fingerprint_bytes(vocab)


def evenly_spaced(low: float, high: float, count: int) -> list[int]:
    if count == 1:
        return [round(high)]
    return [round(low + (high - low) * i / (count - 1)) for i in range(count)]


def context_lengths(min_length: int, max_length: int | None, count: int, max_context: int | None) -> list[int]:
    """`count` target prompt lengths evenly spaced over [min_length, max_length] (in model tokens).

    The default `max_length` (None) is 8000 capped at the model's context minus a 200-token buffer;
    an explicit value above that cap is an error.
    """
    cap = max_context - CONTEXT_BUFFER if max_context else None
    if max_length is None:
        max_length = min(8000, cap) if cap else 8000
    elif cap is not None and max_length > cap:
        raise HeadscoreError(f"--max-length {max_length} is above the model's context "
                             f"({max_context} tokens, minus a {CONTEXT_BUFFER}-token buffer = {cap})")
    if count < 1:
        raise HeadscoreError("--lengths must be at least 1")
    if min_length > max_length:
        raise HeadscoreError(f"--min-length {min_length} is above the maximum length {max_length}")
    return evenly_spaced(min_length, max_length, count)


def depth_percents(count: int) -> list[float]:
    """`count` depths evenly spaced over 0–100 %."""
    if count < 1:
        raise HeadscoreError("--depths must be at least 1")
    return [0.0] if count == 1 else [round(100 * i / (count - 1), 2) for i in range(count)]


class HaystackTokens:
    """The haystack tokenized once (repeated if it is shorter than needed), with character offsets."""

    def __init__(self, tokenizer: Any, text: str, tokens_needed: int):
        chars = max(4 * tokens_needed + 4096, 1)
        repeated = text
        while len(repeated) < chars:
            repeated += "\n\n" + text
        while True:
            encoded = tokenizer(repeated[:chars], add_special_tokens=False, return_offsets_mapping=True)
            if len(encoded["input_ids"]) > tokens_needed or chars >= len(repeated):
                break
            chars *= 2
            while len(repeated) < chars:
                repeated += "\n\n" + text
        self.text = repeated[:chars]
        self.ends = [end for _, end in encoded["offset_mapping"]]
        self.starts = [start for start, _ in encoded["offset_mapping"]]

    def prefix(self, tokens: int) -> str:
        """Text of the first `tokens` tokens, cut at a token boundary."""
        return self.text[: self.ends[tokens - 1]] if tokens > 0 else ""

    def char_at(self, token: int) -> int:
        return self.starts[token] if token < len(self.starts) else len(self.text)


def insertion_point(context: str, char: int) -> int:
    """The sentence boundary at or before `char`: just after the last '.' that ends a sentence."""
    if char >= len(context):
        return len(context)
    cut = context.rfind(".", 0, char)
    return 0 if cut < 0 else cut + 1


def answer_token_span(offsets: Sequence[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """Tokens `[start, end)` covering the characters `[char_start, char_end)` (from tokenizer offsets)."""
    ends = [end if end > start else -1 for start, end in offsets]  # special tokens have empty offsets
    starts = [start if end > start else 10**12 for start, end in offsets]
    start = next(i for i, end in enumerate(ends) if end > char_start)
    end = max(i for i, s in enumerate(starts) if s < char_end) + 1
    return start, end


def build_trials(
    tokenizer: Any,
    haystack: Haystack,
    needles: Sequence[Needle],
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    kind: str,
    template: str = "raw",
    model_name: str = "",
    needles_fingerprint: str = "",
    progress: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """One trial per (length, depth, needle), in that nesting order.

    Each record's `answer_span` is the token span `[start, end)` of the answer inside the tokenized prompt
    (`encode_prompt`), found from the tokenizer's character offsets.
    """
    overheads = {n.id: len(encode_prompt(tokenizer, render_prompt(tokenizer, "", n.question, template),
                                         template)["input_ids"]) for n in needles}
    needle_tokens = {n.id: len(tokenizer(n.needle, add_special_tokens=False)["input_ids"]) for n in needles}
    budgets = {(length, n.id): length - overheads[n.id] - needle_tokens[n.id] for length in lengths
               for n in needles}
    for (length, needle_id), budget in budgets.items():
        if budget < 16:
            raise HeadscoreError(f"length {length} is too short to hold needle '{needle_id}' and its "
                                 f"question (needs at least {length - budget + 16} tokens)")
    hay = HaystackTokens(tokenizer, haystack.text, max(budgets.values()))
    tok_fp = tokenizer_fingerprint(tokenizer)
    trials = []
    for length in lengths:
        for depth in depths:
            for number, needle in enumerate(needles):
                budget = budgets[(length, needle.id)]
                context = hay.prefix(budget)
                cut = insertion_point(context, hay.char_at(int(budget * depth / 100)))
                sep = "" if cut == 0 or needle.needle[:1].isspace() else " "
                with_needle = context[:cut] + sep + needle.needle + context[cut:]
                prompt = render_prompt(tokenizer, with_needle, needle.question, template)
                needle_at = prompt.index(with_needle) + cut + len(sep)
                answer_at = needle_at + needle.needle.lower().index(needle.answer.lower())
                answer_chars = (answer_at, answer_at + len(needle.answer))
                encoded = encode_prompt(tokenizer, prompt, template, offsets=True)
                span = answer_token_span(encoded["offset_mapping"], *answer_chars)
                trials.append({
                    "id": f"{kind}-L{length}-D{depth:g}-N{number}",
                    "kind": kind,
                    "needle_id": needle.id,
                    "target_length": length,
                    "length": len(encoded["input_ids"]),
                    "depth": depth,
                    "template": template,
                    "question": needle.question,
                    "answer": needle.answer,
                    "answer_span": list(span),
                    "answer_chars": list(answer_chars),
                    "tokenizer": model_name,
                    "tokenizer_fingerprint": tok_fp,
                    "haystack_fingerprint": haystack.fingerprint,
                    "needles_fingerprint": needles_fingerprint,
                    "prompt": prompt,
                })
                if progress:
                    progress()
    return trials


def write_trials(path: str | Path, trials: Sequence[dict[str, Any]]) -> None:
    from headscore.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in trials))


TRIAL_FIELDS = ("id", "prompt", "answer", "answer_span", "template", "tokenizer_fingerprint")


def read_trials(path: str | Path) -> list[dict[str, Any]]:
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
        trials.append(record)
    if not trials:
        raise HeadscoreError(f"trial file {path} holds no trials")
    return trials


def trials_fingerprint(trials: Sequence[dict[str, Any]]) -> str:
    return fingerprint_bytes(*(json.dumps(t, sort_keys=True) for t in trials))


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
) -> list[dict[str, Any]]:
    """The trial set for `model`'s tokenizer: `lengths` × `depths` × needles records (see `build_trials`)."""
    from headscore.haystack import load_haystack
    from headscore.model import load_geometry, load_tokenizer

    if kind not in NEEDLE_FILES:
        raise HeadscoreError(f"unknown needle kind '{kind}': use one of {', '.join(NEEDLE_FILES)}")
    if template not in TEMPLATES:
        raise HeadscoreError(f"unknown template '{template}': use one of {', '.join(TEMPLATES)}")
    needle_list, needle_fp = load_needles(needles or kind)
    geometry = load_geometry(model)
    target_lengths = context_lengths(min_length, max_length, lengths, geometry.max_context)
    depth_list = depth_percents(depths)
    tokenizer = load_tokenizer(model)
    hay = load_haystack(haystack)
    return build_trials(tokenizer, hay, needle_list, lengths=target_lengths, depths=depth_list, kind=kind,
                        template=template, model_name=model, needles_fingerprint=needle_fp,
                        progress=progress)
