"""Prompts, the one way every stage builds them: rendering (raw or chat template), encoding, haystack
tokenization and needle placement at a sentence boundary, and answer token spans from character offsets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from headscore.core.errors import HeadscoreError
from headscore.core.files import fingerprint_bytes

TEMPLATES = ("raw", "chat", "llama2")
QUESTION_TEMPLATE = "Based on the content of the book, Question: {question}"


def render_prompt(tokenizer: Any, context: str, question: str, template: str = "raw",
                  answer_prefix: str = "") -> str:
    """The prompt text: context, then the question (raw), or the same as one chat user turn (chat).

    `answer_prefix` (the kvpress / RULER convention) opens the answer: it follows the generation prompt, so
    it lies in the observation window and the model continues it.
    """
    ask = QUESTION_TEMPLATE.format(question=question)
    return apply_template(tokenizer, f"{context}\n\n{ask}", template, raw_suffix="\nAnswer:") + answer_prefix


def apply_template(tokenizer: Any, text: str, template: str, raw_suffix: str = "") -> str:
    """`raw`: the text (plus `raw_suffix`); `chat`: the text as one user turn of the tokenizer's chat
    template, with the generation prompt; `llama2`: `[INST] text [/INST]` (the wrap KVCache-Factory's
    LongBench script gives Llama-2 models; the tokenizer adds BOS)."""
    if template == "raw":
        return text + raw_suffix
    if template == "llama2":
        return f"[INST] {text} [/INST]"
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise HeadscoreError("template 'chat' needs a tokenizer with a chat template")
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise HeadscoreError(f"unknown template '{template}': use one of {', '.join(TEMPLATES)}")


def encode_prompt(tokenizer: Any, prompt: str, template: str = "raw", offsets: bool = False) -> dict:
    """Tokenize a prompt the one way every stage does: raw and llama2 prompts get the tokenizer's special
    tokens, chat prompts already carry them as text."""
    return tokenizer(prompt, add_special_tokens=template != "chat", return_offsets_mapping=offsets)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return fingerprint_bytes(vocab)


def evenly_spaced(low: float, high: float, count: int) -> list[int]:
    if count == 1:
        return [round(high)]
    return [round(low + (high - low) * i / (count - 1)) for i in range(count)]


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
