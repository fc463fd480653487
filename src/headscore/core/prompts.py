"""Prompts, the one way every stage builds them: rendering (raw or chat template), encoding, haystack
tokenization and needle placement at a sentence boundary (`place_texts`, for needle trials and evaluation
tasks alike), the authors' own needle prompt (`OfficialHaystack`), and answer token spans from character
offsets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from headscore.core.errors import HeadscoreError
from headscore.core.files import fingerprint_bytes

TEMPLATES = ("raw", "chat", "llama2")
NEEDLE_TEMPLATES = (*TEMPLATES, "official")  # build-needles also builds the authors' prompt
QUESTION_TEMPLATE = "Based on the content of the book, Question: {question}"
OFFICIAL_QUESTION = "Based on the content of the book, Question: {question}\nAnswer:"
OFFICIAL_BUFFER = 200  # tokens the authors keep free below the context length (final_context_length_buffer)


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
    """Tokenize a prompt the one way every stage does: raw, llama2 and official prompts get the tokenizer's
    special tokens, chat prompts already carry them as text."""
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


def place_texts(hay: HaystackTokens, filler: int, texts: Sequence[str], depths: Sequence[float], *,
                pad_start: bool = False) -> tuple[str, list[int]]:
    """The one placement of texts in haystack filler (needle trials and evaluation tasks).

    Takes the first `filler` haystack tokens and puts `texts[i]` at the sentence boundary at or before
    `depths[i]` % of them (texts sharing a boundary keep their order). A text follows a space unless it opens
    the filler or starts with whitespace; `pad_start` adds a space after a text that opens the filler.
    Returns (context, character offset of each text in it).
    """
    context = hay.prefix(filler)
    cuts = [insertion_point(context, hay.char_at(int(filler * depth / 100))) for depth in depths]
    pieces, starts, previous, written = [], [0] * len(texts), 0, 0
    for i in sorted(range(len(texts)), key=lambda i: cuts[i]):  # stable: equal cuts keep their order
        cut, text = cuts[i], texts[i]
        lead = "" if cut == 0 or text[:1].isspace() else " "
        piece = lead + text + (" " if cut == 0 and pad_start else "")
        pieces += [context[previous:cut], piece]
        starts[i] = written + cut - previous + len(lead)
        written += cut - previous + len(piece)
        previous = cut
    pieces.append(context[previous:])
    return "".join(pieces), starts


def period_token_ids(tokenizer: Any) -> set[int]:
    """The tokens that end a sentence for the authors' needle placement: `.` and `▁.` where the vocabulary has
    them. This gives their hard-coded lists: Llama-2 [29889, 869], Llama-3 [13], Mistral [842, 28723]."""
    vocab = tokenizer.get_vocab()
    return {vocab[token] for token in (".", "\u2581.") if token in vocab}


class OfficialHaystack:
    """The authors' needle prompt (HeadKV `retrieval_head_detection_r2.py`, FYYFU/HeadKV), step for step.

    1. `read_context_files`: the haystack text, repeated whole until it holds `max_length` whitespace-separated
       words (`count="tokens"`: tokens, special tokens included, as their `run_needle_in_haystack.py`).
       2. `encode_and_trim`: encode it with the tokenizer's special tokens and, if longer than `length` tokens,
       decode the first `length` (special tokens kept as text). 3. `insert_needle`: encode that context
       and the needle (special tokens again), cut the context to `length - 200 - len(needle)` tokens, and put
       the needle at the last period token at or before `int(len(context) * depth / 100)` (at the end for depth
       100); decode. 4. The prompt is that text followed directly by `OFFICIAL_QUESTION`, tokenized with the
       tokenizer's special tokens. With a BOS-adding tokenizer the decoded text holds BOS strings at the start
       and just before the needle, as theirs does. The trimmed context is encoded once per length.
    """

    def __init__(self, tokenizer: Any, text: str, max_length: int, count: str = "words"):
        def size(context: str) -> int:
            return len(tokenizer.encode(context)) if count == "tokens" else len(context.split())

        context = text
        while size(context) < max_length:
            context += text
        self.tokenizer = tokenizer
        self.context = context
        self.tokens = tokenizer.encode(context)
        self.periods = period_token_ids(tokenizer)
        self._trimmed: dict[int, list[int]] = {}

    def trimmed(self, length: int) -> list[int]:
        """Token ids of the context trimmed to `length` tokens, re-encoded (steps 2 and 3)."""
        if length not in self._trimmed:
            context = self.tokenizer.decode(self.tokens[:length]) if len(self.tokens) > length else self.context
            self._trimmed[length] = self.tokenizer.encode(context)
        return self._trimmed[length]

    def insert(self, needle: str, length: int, depth: float) -> tuple[str, int, int]:
        """(context with the needle, character window `[start, end)` of the context that holds the needle)."""
        needle_ids = self.tokenizer.encode(needle)
        room = length - OFFICIAL_BUFFER - len(needle_ids)
        context = self.trimmed(length)
        if len(context) + len(needle_ids) > length - OFFICIAL_BUFFER:
            context = context[:room]  # as theirs: a negative room cuts from the end (length 0: no context)
        point = len(context)
        if depth != 100:
            point = int(len(context) * (depth / 100))
            while point > 0 and context[point - 1] not in self.periods:
                point -= 1
        before = self.tokenizer.decode(context[:point])
        through = self.tokenizer.decode(context[:point] + needle_ids)
        text = self.tokenizer.decode(context[:point] + needle_ids + context[point:])
        return text, max(0, len(before) - 8), len(through) + 8  # decoding may join tokens differently

    def prompt(self, needle: str, question: str, answer: str, length: int, depth: float
               ) -> tuple[str, tuple[int, int]]:
        """(the official prompt, the characters `[start, end)` of `answer` in the needle inside it)."""
        context, start, end = self.insert(needle, length, depth)
        at = context.lower().find(answer.lower(), start, end)
        if at < 0:
            raise HeadscoreError(f"the answer '{answer[:40]}' is not found in the decoded needle (the tokenizer "
                                 "does not decode the needle back to its text); use --template raw or chat")
        return context + OFFICIAL_QUESTION.format(question=question), (at, at + len(answer))


def insertion_point(context: str, char: int) -> int:
    """The sentence boundary at or before `char`: just after the last '.' that ends a sentence."""
    if char >= len(context):
        return len(context)
    cut = context.rfind(".", 0, char)
    return 0 if cut < 0 else cut + 1


SPAN_RULES = ("answer", "official")


def window_overlaps(prompt_ids: Sequence[int], needle_ids: Sequence[int]) -> torch.Tensor:
    """Float64 `[len(prompt)]`: for every start i, the share of the needle's distinct ids that occur in the
    window `prompt[i : i + len(needle)]` (cut at the end), as the authors' `find_needle_idx` computes it."""
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long)
    distinct = torch.tensor(sorted(set(needle_ids)), dtype=torch.long)
    width, length = len(needle_ids), prompt.shape[0]
    hits = (prompt[None, :] == distinct[:, None]).to(torch.int32)  # [distinct ids, positions]
    counts = torch.nn.functional.pad(hits.cumsum(dim=1), (1, 0))  # counts[:, j] = hits before j
    starts = torch.arange(length)
    ends = (starts + width).clamp(max=length)
    present = (counts[:, ends] - counts[:, starts]) > 0
    return present.sum(dim=0).double() / distinct.shape[0]


def official_answer_span(tokenizer: Any, prompt_ids: Sequence[int], answer: str, kind: str) -> tuple[int, int]:
    """The answer span as the authors' scorers find it (`find_needle_idx`), `len(answer ids)` tokens long.

    `reasoning` (HeadKV `retrieval_head_detection_r2.py` L259–286): with a BOS-adding tokenizer only windows
    right after a BOS token, else every window; the LAST with the highest overlap. `retrieval` (Retrieval_Head
    `retrieval_head_detection.py` L249–259): the FIRST window with overlap > 0.9.
    """
    needle_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    overlaps = window_overlaps(prompt_ids, needle_ids)
    if kind == "retrieval":
        found = (overlaps > 0.9).nonzero()
        if not found.numel():
            raise HeadscoreError(f"the authors' span search finds no window over 90 % of the answer "
                                 f"'{answer[:40]}' (their scorer then counts no head for this trial); use "
                                 "--span answer")
        start = int(found[0])
        return start, start + len(needle_ids)
    empty = tokenizer.encode("")
    if empty:  # BOS-adding: windows starting just after each BOS
        starts = (torch.tensor(list(prompt_ids)) == empty[0]).nonzero().flatten() + 1
        starts = starts[starts < len(prompt_ids)]
    else:
        starts = torch.arange(len(prompt_ids))
    scores = overlaps[starts]
    best = starts[(scores == scores.max()).nonzero().flatten()[-1]]  # `>=`: the last of the best
    return int(best), int(best) + len(needle_ids)


def answer_token_span(offsets: Sequence[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """Tokens `[start, end)` covering the characters `[char_start, char_end)` (from tokenizer offsets)."""
    ends = [end if end > start else -1 for start, end in offsets]  # special tokens have empty offsets
    starts = [start if end > start else 10**12 for start, end in offsets]
    start = next(i for i, end in enumerate(ends) if end > char_start)
    end = max(i for i, s in enumerate(starts) if s < char_end) + 1
    return start, end
