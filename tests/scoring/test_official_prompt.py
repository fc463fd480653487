"""`build-needles --template official`: the authors' prompt, character for character.

The reference below re-implements, in plain Python, the steps of HeadKV's `retrieval_head_detection_r2.py`
(`read_context_files`, `encode_and_trim`, `insert_needle`, `evaluate_and_log`), once per trial, without any
of headscore's helpers; headscore's trials must equal it on SmolLM2's tokenizer (no BOS) and on a tiny BPE
tokenizer trained here that adds a BOS (as Llama and Mistral tokenizers do).
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from headscore.core.errors import HeadscoreError
from headscore.core.haystack import Haystack, load_haystack
from headscore.core.prompts import encode_prompt
from headscore.scoring.trials import build_needle_trials, build_trials, depth_percents, load_needles


def official_prompt(enc, haystack_text: str, needle: str, question: str, context_length: int,
                    depth_percent: float, max_context_length: int, period_tokens: list[int]) -> str:
    """The authors' steps, as they run them for one trial."""
    context = ""
    while len(context.split()) < max_context_length:  # read_context_files (one file)
        context += haystack_text
    tokens = enc.encode(context)  # encode_and_trim
    if len(tokens) > context_length:
        context = enc.decode(tokens[:context_length])
    tokens_needle = enc.encode(needle)  # insert_needle
    tokens_context = enc.encode(context)
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


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A tiny byte-level BPE that adds <s> to every encoding (trained here on a slice of the haystack)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([load_haystack(None).text[:80_000]], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


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


def test_official_prompt_needs_room_for_the_buffer(smollm2_tokenizer):
    with pytest.raises(HeadscoreError, match="too short for the official prompt"):
        build_needle_trials("smollm2-135m", template="official", min_length=220, max_length=220, lengths=1,
                            depths=2)
