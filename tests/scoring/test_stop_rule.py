"""The authors' decoding of a trial (docs/fidelity.md, items 5 and 6): `--stop-rule official` against a plain
re-implementation of their loop (HeadKV `retrieval_head_detection_r2.py` `decode` L243–257; Retrieval_Head
`retrieval_head_detection.py` `decode` L235–247), and `--rouge stemmed` against `rouge_score`."""

from __future__ import annotations

import pytest
import torch
from rouge_score import rouge_scorer
from transformers import DynamicCache

from headscore.core.errors import HeadscoreError
from headscore.core.metrics import rouge1_recall, rouge1_recall_stemmed
from headscore.core.model import with_cache
from headscore.scoring.capture import attention_capture
from headscore.scoring.estimate import (
    EstimateOptions,
    decode_trial,
    encode_trial,
    official_newline_ids,
    stop_criteria,
)

VOCAB = 49152  # SmolLM2's tokenizer


class SentencePieceVocab:
    def get_vocab(self) -> dict[str, int]:
        return {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 13, "▁the": 278}


def test_official_newline_test_is_theirs_and_never_fires_on_byte_level_newlines(tokenizer):
    assert official_newline_ids(SentencePieceVocab()) == {13, 144}
    assert official_newline_ids(tokenizer) == {144}  # SmolLM2: byte-level, no <0x0A>
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert newline and not set(newline) & official_newline_ids(tokenizer)


@torch.no_grad()
def authors_decode(model, tokenizer, prompt_ids, decode_len, answer_tokens_num, r2):
    """Their loop: prefill all but the last token, then greedy steps with their stop test."""
    past = DynamicCache(config=model.config)
    model(input_ids=prompt_ids[None, :-1], **with_cache(model, past), use_cache=True)
    inp, output = prompt_ids[-1], []
    for _ in range(decode_len):
        logits = model(input_ids=inp.view(1, 1), **with_cache(model, past), use_cache=True).logits
        inp = logits[0, -1].argmax()
        step_token = tokenizer.convert_ids_to_tokens(inp.item())
        output.append(inp.item())
        if r2 and (step_token == "<0x0A>" or inp.item() == 144 or inp.item() == model.config.eos_token_id
                   or len(output) >= answer_tokens_num):
            break
        if not r2 and (step_token == "<0x0A>" or inp.item() == 144):
            break
    return output


@pytest.fixture(scope="module")
def trial():
    from headscore.scoring.trials import build_needle_trials

    return build_needle_trials("smollm2-135m", kind="retrieval", min_length=150, max_length=150, lengths=1,
                               depths=1)[0]


@pytest.mark.parametrize("method", ["r2", "retrieval"])
def test_official_stop_rule_decodes_as_their_loop(tiny_llama, tokenizer, trial, method):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, vocab=VOCAB, seed=3)
    ids, span = encode_trial(trial, tokenizer)
    free = authors_decode(model, tokenizer, ids, 50, 10**6, r2=False)
    eos = free[2]  # make EOS fire at step 3 of the free run
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    answer_tokens = 20
    options = EstimateOptions(rule=method, stop_rule="official")
    stop = stop_criteria(model, tokenizer, options, answer_tokens, span[1] - span[0])
    with attention_capture(model, 2) as capture:
        _, generated, _ = decode_trial(model, tokenizer, ids, span, capture, method, stop.max_new_tokens,
                                       answer_tokens=answer_tokens, stop=stop)
    theirs = authors_decode(model, tokenizer, ids, 50, answer_tokens, r2=method == "r2")
    assert generated == theirs
    if method == "r2":
        assert len(generated) == free.index(eos) + 1  # stopped at EOS
    else:
        assert len(generated) > span[1] - span[0] and eos in generated  # no EOS stop, not capped at N
        default = stop_criteria(model, tokenizer, EstimateOptions(rule=method), answer_tokens, span[1] - span[0])
        assert default.max_new_tokens == span[1] - span[0] and eos in default.eos


def test_unknown_stop_rule_and_rouge_are_errors():
    with pytest.raises(HeadscoreError, match="stop rule"):
        EstimateOptions(stop_rule="eos")
    with pytest.raises(HeadscoreError, match="rouge"):
        EstimateOptions(rouge="porter")


@pytest.mark.parametrize("response,reference", [
    ("Taking walks in Chaoyang Park and having cups of espresso", "take a walk in Chaoyang Park and have a cup "
                                                                   "of Espresso in the evening"),
    ("Records were broken, for greenhouse gases and oceans.", "records were once again broken, and in some "
                                                              "cases smashed, for greenhouse gas levels"),
    ("", "Because he is a mean person"),
])
def test_stemmed_rouge_is_retrieval_heads_scorer(response, reference):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)  # their scorer, L63
    assert rouge1_recall_stemmed(response, reference) == scorer.score(reference, response)["rouge1"].recall


def test_stemming_changes_the_success_check():
    response, reference = "Taking walks in the parks", "take a walk in the park"
    assert rouge1_recall_stemmed(response, reference) > 0.5 >= rouge1_recall(response, reference)


def test_the_authors_trials_run_through_estimate(tiny_llama, tokenizer, tmp_path):
    """Length-0 official trials (needle + question only) on the authors' part folders, the official span and
    stop rule, stemmed ROUGE: estimate runs them and counts them."""
    from pathlib import Path

    from headscore.core.haystack import load_haystack_parts
    from headscore.scoring.estimate import estimate
    from headscore.scoring.trials import build_trials, load_needles

    folder = Path(__file__).resolve().parents[1] / "data" / "haystacks" / "retrieval_head" / "haystack_for_detect"
    needles, _ = load_needles("retrieval")
    trials = build_trials(tokenizer, load_haystack_parts(str(folder)), needles, lengths=[0, 300], depths=[50],
                          kind="retrieval", template="official", span="official")
    assert [t.target_length for t in trials] == [0, 0, 0, 300, 300, 300]
    model = tiny_llama(layers=2, heads=4, kv_heads=2, vocab=VOCAB, seed=3)
    options = EstimateOptions(rule="retrieval", stop_rule="official", rouge="stemmed", rouge_threshold=-1,
                              max_new_tokens=6)
    result = estimate(model, tokenizer, trials, tmp_path, options=options, model_name="tiny")
    assert result.run == result.counted == 6
