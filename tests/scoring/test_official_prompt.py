"""`build-needles --template official`: the authors' prompt, character for character.

The reference below re-implements, in plain Python, the steps of HeadKV's `retrieval_head_detection_r2.py`
(`read_context_files`, `encode_and_trim`, `insert_needle`, `evaluate_and_log`), for every trial (the context,
which depends on the length alone, tokenized once per length), without any of headscore's helpers;
headscore's trials must equal it on SmolLM2's tokenizer (no BOS) and on a tiny BPE
tokenizer trained here that adds a BOS (as Llama and Mistral tokenizers do).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from headscore.core.errors import HeadscoreError
from headscore.core.haystack import Haystack, load_haystack, load_haystack_parts
from headscore.core.prompts import OFFICIAL_QUESTION, encode_prompt
from headscore.scoring.trials import (
    build_needle_trials,
    build_trials,
    context_lengths,
    depth_percents,
    load_needles,
    read_trials,
)


@functools.lru_cache(maxsize=64)
def authors_context_tokens(enc, haystack_text: str, context_length: int, max_context_length: int) -> tuple[int, ...]:
    """Their context for one length, tokenized: the part of their steps that depends on neither the needle nor
    the depth (memoized, so the reference encodes the haystack once per length, not once per trial)."""
    context = ""
    while len(context.split()) < max_context_length:  # read_context_files (one file)
        context += haystack_text
    tokens = enc.encode(context)  # encode_and_trim
    if len(tokens) > context_length:
        context = enc.decode(tokens[:context_length])
    return tuple(enc.encode(context))


def official_prompt(enc, haystack_text: str, needle: str, question: str, context_length: int,
                    depth_percent: float, max_context_length: int, period_tokens: list[int]) -> str:
    """The authors' steps, as they run them for one trial."""
    tokens_context = list(authors_context_tokens(enc, haystack_text, context_length, max_context_length))
    tokens_needle = enc.encode(needle)  # insert_needle
    context_length -= 200
    if len(tokens_context) + len(tokens_needle) > context_length:
        tokens_context = tokens_context[:context_length - len(tokens_needle)]
    if depth_percent == 100:
        tokens_new_context = tokens_context + tokens_needle
    else:
        insertion_point = int(len(tokens_context) * (depth_percent / 100))
        tokens_new_context = tokens_context[:insertion_point]
        while tokens_new_context and tokens_new_context[-1] not in period_tokens:
            insertion_point -= 1
            tokens_new_context = tokens_context[:insertion_point]
        tokens_new_context += tokens_needle + tokens_context[insertion_point:]
    new_context = enc.decode(tokens_new_context)
    template = f"Based on the content of the book, Question: {question}\nAnswer:"  # evaluate_and_log
    return new_context + template


@pytest.fixture(scope="module")
def smollm2_tokenizer(tokenizer):
    """The shared SmolLM2 tokenizer (no BOS), named apart from the BOS tokenizer below."""
    return tokenizer


def check_trials(tokenizer, trials, haystack_text, needles, lengths):
    periods = [tokenizer.get_vocab()["."]]  # what the authors' hard-coded lists hold for these vocabularies
    by_id = {n.id: n for n in needles}
    for trial in trials:
        needle = by_id[trial.needle_id]
        expected = official_prompt(tokenizer, haystack_text, needle.needle, needle.question,
                                   trial.target_length, trial.depth, max(lengths), periods)
        assert trial.prompt == expected, trial.id
        ids = encode_prompt(tokenizer, trial.prompt, "official")["input_ids"]
        assert ids == tokenizer(expected)["input_ids"]  # tokenized with the default special tokens
        question = len(tokenizer(expected[expected.rindex("Based on the content"):])["input_ids"])
        assert len(ids) == trial.length <= trial.target_length - 200 + question + 2
        start, end = trial.answer_span
        assert tokenizer.decode(ids[start:end]).strip().lower() == needle.answer.lower(), trial.id


def test_official_prompt_equals_the_authors_steps_on_smollm2(smollm2_tokenizer):
    text = load_haystack(None).text[:30_000]  # a slice keeps the per-trial reference fast
    needles, _ = load_needles("reasoning")
    lengths, depths = [400, 1100], depth_percents(10, whole=True)
    assert depths == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]  # the authors' grid
    trials = build_trials(smollm2_tokenizer, Haystack("slice", text), needles, lengths=lengths, depths=depths,
                          kind="reasoning", template="official")
    assert len(trials) == 2 * 10 * 2
    assert trials[0].prompt.endswith("Mary?\nAnswer:") and "\n\nBased on" not in trials[0].prompt
    check_trials(smollm2_tokenizer, trials, text, needles, lengths)


def test_official_prompt_equals_the_authors_steps_with_a_bos_tokenizer(bos_tokenizer):
    """With a BOS, the decoded text holds '<s>' at its start and just before the needle, as the authors'."""
    text = load_haystack(None).text[:40_000]
    needles, _ = load_needles("retrieval")
    lengths = [400, 900]
    depths = depth_percents(6, whole=True)
    trials = build_trials(bos_tokenizer, Haystack("slice", text), needles, lengths=lengths, depths=depths,
                          kind="retrieval", template="official")
    check_trials(bos_tokenizer, trials, text, needles, lengths)
    middle = next(t for t in trials if t.depth == 40)
    needle = next(n for n in needles if n.id == middle.needle_id).needle
    assert middle.prompt.startswith("<s>") and f"<s>{needle}" in middle.prompt


HAYSTACKS = Path(__file__).resolve().parents[1] / "data" / "haystacks"  # tests/data/README.md


def authors_lengths(s_len: int, e_len: int, num: int = 5) -> list[int]:
    """`np.round(np.linspace(context_lengths_min, context_lengths_max, num)).astype(int)` (their L143)."""
    return [int(v) for v in np.round(np.linspace(s_len, e_len, num=num, endpoint=True)).astype(int)]


def test_official_lengths_from_zero_are_the_authors(smollm2_tokenizer):
    """`--s 0 --e L`: length 0 is the needle and the question only (a negative room cuts the context away, as
    their `tokens_context[:context_length - len(tokens_needle)]` does); every prompt equals their steps on
    their haystack, needle i reading part{i}."""
    r2 = HAYSTACKS / "headkv" / "haystack_for_detect_r2"
    parts = load_haystack_parts(str(r2))
    assert [Path(p.source).name for p in parts] == ["part0", "part1"]
    lengths = context_lengths(0, 1200, 5, 8192, past_context=True)
    assert lengths == authors_lengths(0, 1200) == [0, 300, 600, 900, 1200]
    assert context_lengths(0, 10000, 5, 8192, past_context=True) == authors_lengths(0, 10000)
    needles, _ = load_needles("reasoning")
    trials = build_trials(smollm2_tokenizer, parts, needles, lengths=lengths, depths=depth_percents(3, whole=True),
                          kind="reasoning", template="official")
    for trial in trials:
        number = int(trial.id.rsplit("N", 1)[1])
        text = (r2 / f"part{number}" / "p1.txt").read_text(encoding="utf-8")
        assert trial.haystack_fingerprint == parts[number].fingerprint
        needle = needles[number]
        assert trial.prompt == official_prompt(smollm2_tokenizer, text, needle.needle, needle.question,
                                               trial.target_length, trial.depth, max(lengths),
                                               [smollm2_tokenizer.get_vocab()["."]]), trial.id
    zero = [t for t in trials if t.target_length == 0]
    assert len(zero) == 3 * 2 and all(t.prompt == needles[int(t.id[-1])].needle
                                      + OFFICIAL_QUESTION.format(question=t.question) for t in zero)
    start, end = zero[0].answer_span
    ids = encode_prompt(smollm2_tokenizer, zero[0].prompt, "official")["input_ids"]
    assert smollm2_tokenizer.decode(ids[start:end]).strip() == needles[0].answer


def test_retrieval_parts_go_to_their_needles_in_order():
    """Retrieval_Head reads `part{i}` for i in 1..3: needle 0 takes part1, and so on."""
    parts = load_haystack_parts(str(HAYSTACKS / "retrieval_head" / "haystack_for_detect"))
    texts = [(HAYSTACKS / "retrieval_head" / "haystack_for_detect" / f"part{i}" / "p1.txt").read_text()
             for i in (1, 2, 3)]
    assert [p.text for p in parts] == texts and len(set(texts)) == 3
    assert load_haystack_parts(str(HAYSTACKS / "retrieval_head" / "haystack_for_detect" / "part1")) is None


def test_official_set_past_the_context_warns_and_is_built(tmp_path, headscore_cli):
    """`build-needles --template official --haystack <their folder> --min-length 0 --max-length L --lengths 5`:
    their trial set, length 0 included; past the model's context a warning, not an error."""
    out = tmp_path / "trials.jsonl"
    result = headscore_cli("build-needles", "--template", "official", "--haystack",
                           HAYSTACKS / "headkv" / "haystack_for_detect_r2", "--min-length", "0", "--max-length",
                           "10000", "--lengths", "5", "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "longer than the model's 8192 positions" in result.stderr
    trials = read_trials(out)
    assert len(trials) == 5 * 10 * 2
    assert sorted({t.target_length for t in trials}) == authors_lengths(0, 10000)
    assert max(t.length for t in trials) > 8192
    with pytest.raises(HeadscoreError, match="above the model's context"):  # the other templates still refuse
        build_needle_trials("smollm2-135m", min_length=1000, max_length=10000, lengths=2, depths=1)
    with pytest.raises(HeadscoreError, match="at least 0"):
        build_needle_trials("smollm2-135m", template="official", min_length=-1, max_length=100, lengths=2)


def test_fixture_is_the_head_of_their_files(reference_dir):
    summary = json.loads((HAYSTACKS / "summary.json").read_text())
    for name, entry in summary.items():
        raw = (reference_dir / name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == entry["sha256"] and len(raw) == entry["bytes"]
        assert (HAYSTACKS / name).read_bytes() == raw[: entry["fixture_bytes"]]


def authors_find_needle_idx_r2(enc, prompt_ids, needle):
    """HeadKV `retrieval_head_detection_r2.py` `find_needle_idx` L259–286, line for line."""
    needle_ids = enc(needle, add_special_tokens=False)["input_ids"]
    span_len = len(needle_ids)
    max_overlap = 0.0
    start = end = 0
    if len(enc.encode("")) != 0:
        for i in range(len(prompt_ids)):
            if prompt_ids[i] == enc.encode("")[0]:
                span_ids = set(prompt_ids[i + 1: i + span_len + 1])
                overlap = float(len(span_ids.intersection(set(needle_ids)))) / len(set(needle_ids))
                if overlap >= max_overlap:
                    max_overlap, start, end = overlap, i + 1, i + span_len + 1
    else:
        for i in range(len(prompt_ids)):
            span_ids = set(prompt_ids[i: i + span_len])
            overlap = float(len(span_ids.intersection(set(needle_ids)))) / len(set(needle_ids))
            if overlap >= max_overlap:
                max_overlap, start, end = overlap, i, i + span_len
    return start, end


def authors_find_needle_idx_retrieval(enc, prompt_ids, needle):
    """Retrieval_Head `retrieval_head_detection.py` `find_needle_idx` L249–259."""
    needle_ids = enc(needle, add_special_tokens=False)["input_ids"]
    span_len = len(needle_ids)
    for i in range(len(prompt_ids)):
        span_ids = set(prompt_ids[i: i + span_len])
        if float(len(span_ids.intersection(set(needle_ids)))) / len(set(needle_ids)) > 0.9:
            return i, i + span_len
    return -1, -1


@pytest.mark.parametrize("which", ["smollm2", "bos"])
def test_official_span_is_the_authors_search(smollm2_tokenizer, bos_tokenizer, which):
    """`--span official`: the answer span their scorers use, which differs from the answer's own tokens (on
    SmolLM2 the r2 needle 0's window lies 6 tokens later, the retrieval windows start a token early)."""
    tokenizer = smollm2_tokenizer if which == "smollm2" else bos_tokenizer
    differs = 0
    for kind, folder, theirs in (("reasoning", "headkv/haystack_for_detect_r2", authors_find_needle_idx_r2),
                                 ("retrieval", "retrieval_head/haystack_for_detect",
                                  authors_find_needle_idx_retrieval)):
        needles, _ = load_needles(kind)
        parts = load_haystack_parts(str(HAYSTACKS / folder))[: len(needles)]
        if which == "bos" and kind == "retrieval":  # the tiny BPE splits "Because" / "because" apart: their
            # search finds no window over 90 % (their scorer then counts no head), ours says so
            with pytest.raises(HeadscoreError, match="no window"):
                build_trials(tokenizer, parts, needles, lengths=[700], depths=[50], kind=kind, template="official",
                             span="official")
            needles, parts = needles[:2], parts[:2]
        plain = build_trials(tokenizer, parts, needles, lengths=[0, 700], depths=[0, 50, 100], kind=kind,
                             template="official")
        official = build_trials(tokenizer, parts, needles, lengths=[0, 700], depths=[0, 50, 100], kind=kind,
                                template="official", span="official")
        for ours, trial in zip(plain, official, strict=True):
            ids = encode_prompt(tokenizer, trial.prompt, "official")["input_ids"]
            assert tuple(trial.answer_span) == theirs(tokenizer, ids, trial.answer), trial.id
            differs += tuple(trial.answer_span) != tuple(ours.answer_span)
    if which == "smollm2":
        assert differs > 0
    with pytest.raises(HeadscoreError, match="span rule"):
        build_trials(tokenizer, parts, needles, lengths=[0], depths=[0], kind="retrieval", template="official",
                     span="overlap")
