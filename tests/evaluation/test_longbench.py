"""LongBench / LooGLE as the authors ran them: metrics on worked examples (expected values computed by hand in
the comments), prompts for one small record of every dataset, truncation, the stop rule, the score table and
`--dump-prompts`."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from headscore.compression.generation import decode, prefill_compressed
from headscore.compression.presses import make_press
from headscore.core.errors import HeadscoreError
from headscore.core.metrics import rouge_l
from headscore.core.model import Geometry
from headscore.core.prompts import encode_prompt
from headscore.evaluation.evaluate import EvaluateOptions, build_tasks, evaluate
from headscore.evaluation.tasks import Sample, expand_specs, get_task, score
from headscore.evaluation.tasks.longbench import (
    MAIN_TABLE_LOOGLE,
    MAIN_TABLE_QA,
    dataset_entry,
    longbench_datasets,
    longbench_e_datasets,
    longbench_markdown,
    longbench_table,
    loogle_tasks,
    middle_truncate,
    paper_averages,
    profile,
)
from headscore.evaluation.tasks.longbench_metrics import (
    classification_score,
    code_sim_score,
    corpus_score,
    count_score,
    first_line,
    fuzz_ratio,
    length_bucket,
    qa_f1_score,
    retrieval_score,
    rouge_score,
    score_record,
)

TREC_CLASSES = ["Abbreviation", "Entity", "Description", "Human being", "Location", "Numeric value"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ metrics


def test_qa_f1_score():
    # normalized: [cat, sat] vs [cat, sat, down]: P = 1, R = 2/3, F1 = 2·(2/3)/(5/3) = 0.8
    assert qa_f1_score("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert qa_f1_score("", "cat") == 0.0 and qa_f1_score("dog", "cat") == 0.0


def test_rouge_score_is_the_rouge_package_rouge_l_f():
    # distinct words: ref {a, c, d, e} m = 4, hyp {a, b, c} n = 3, LCS "a c" = 2: R = 1/2, P = 2/3, F = 4/7
    assert rouge_score("a b c", "a c d e") == pytest.approx(4 / 7, abs=1e-6)
    # case-sensitive: only "c" is shared: R = 1/4, P = 1/3, F = 2/7
    assert rouge_score("A b c", "a c d e") == pytest.approx(2 / 7, abs=1e-6)
    # summary level: the hypothesis splits at '.', into "cat" and "dog"; each sentence's LCS with the reference
    # sentence "dog cat" is one word, their union two: R = P = 1 (headscore's own rouge_l, one LCS: 1/2)
    assert rouge_score("cat. dog", "dog cat") == pytest.approx(1.0, abs=1e-6)
    assert rouge_l("cat. dog", "dog cat") == pytest.approx(0.5)
    # repeated words count once (distinct n-grams): R = P = 1
    assert rouge_score("a a", "a") == pytest.approx(1.0, abs=1e-6)
    assert rouge_score("", "a summary") == 0.0  # the package raises on an empty hypothesis: LongBench gives 0


def test_classification_score():
    assert classification_score("Entity", "Entity", TREC_CLASSES) == 1.0
    # both named, neither a strict substring of the answer: 1/2
    assert classification_score("Human being or Location", "Location", TREC_CLASSES) == 0.5
    assert classification_score("Numeric", "Numeric value", TREC_CLASSES) == 0.0
    # the drop loop removes "ab" (strict substring of "abc") while iterating, so "b" after it is skipped and
    # stays: ["abc", "b", "x"] -> 1/3 (a loop without the quirk would leave ["abc", "x"] -> 1/2)
    assert classification_score("abc b x", "abc", ["abc", "ab", "b", "x"]) == pytest.approx(1 / 3)
    with pytest.raises(HeadscoreError, match="all_classes"):
        classification_score("Entity", "Entity", None)


def test_retrieval_and_count_scores():
    assert retrieval_score("Paragraph 12, not Paragraph 3", "Paragraph 12") == 0.5  # digits [12, 3]
    assert retrieval_score("12 and 120", "Paragraph 12") == 0.5
    assert retrieval_score("I do not know", "Paragraph 12") == 0.0
    assert count_score("There are 4 unique paragraphs out of 14", "4") == 0.5
    assert count_score("4", "4") == 1.0 and count_score("none", "4") == 0.0
    with pytest.raises(HeadscoreError, match="Paragraph N"):
        retrieval_score("1", "first")


def test_code_sim_score():
    prediction = "\n# comment\n    x = foo(1)  // note\n    y = 2\n"
    # first line with no '#', '//' or backtick: "    y = 2" (9 chars); vs "    y = 3": LCS 8, 2·8/18 = 88.9 -> 89
    assert code_sim_score(prediction, "    y = 3") == 0.89
    # indentation is kept: vs "y = 2": LCS 5, 2·5/14 = 71.4 -> 71
    assert code_sim_score(prediction, "y = 2") == 0.71
    assert code_sim_score("# only a comment\n", "y = 2") == 0.0
    # fuzzywuzzy rounds with Python's round: 2·1/16 = 12.5 -> 12 (half to even)
    assert fuzz_ratio("abbbbbbb", "accccccc") == 12
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("", "a") == 0


def test_first_line_scoring_max_over_answers_and_corpus():
    assert first_line("\n\nLocation\nmore text") == "Location"
    # triviaqa: first line "Paris" -> F1 1 with "Paris"; without it [paris, france, is, ...] scores lower
    assert score_record("qa_f1", "\nParis\nFrance is big", ["Paris"], first_line_only=True) == 1.0
    assert score_record("qa_f1", "\nParis\nFrance is big", ["Paris"]) == pytest.approx(2 * 0.25 / 1.25)
    assert score_record("longbench:qa_f1", "Turin", ["Rome", "Turin"]) == 1.0  # max over answers
    assert corpus_score([1.0, 0.5, 0.0]) == 50.0
    assert corpus_score([1 / 3]) == 33.33
    assert [length_bucket(n) for n in (0, 3999, 4000, 7999, 8000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+"]
    with pytest.raises(HeadscoreError, match="unknown LongBench metric"):
        score_record("bleu", "a", ["a"])


# ------------------------------------------------------------------------------------------------ profile


def test_profile_holds_the_authors_strings():
    names = longbench_datasets()
    assert names == ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report",
                     "qmsum", "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en",
                     "lcc", "repobench-p"]
    data = profile()
    assert data["longbench"]["provenance"]["prompts"]["license"].startswith("MIT")
    prompts = [data["longbench"]["datasets"][n]["prompt"] for n in names]
    # sha256 of the 16 templates joined by NUL, taken from KVCache-Factory's model2prompt strings: any edit fails
    digest = hashlib.sha256("\0".join(prompts).encode()).hexdigest()
    assert digest == "c9543dd43c893ba18b183361b6d7207fe97ac48f6aaad2f3c3494e63de317305"
    assert prompts[0].count("asconcisely") == 2  # LongBench v1's original narrativeqa string, as the authors ran it
    assert [data["longbench"]["datasets"][n]["max_new_tokens"] for n in names] == [
        128, 128, 64, 32, 32, 32, 512, 512, 512, 64, 32, 128, 32, 32, 64, 64]
    assert {n for n in names if data["longbench"]["datasets"][n]["first_line"]} == {"trec", "triviaqa", "samsum"}
    assert loogle_tasks() == ["comprehension_and_reasoning", "computation", "multiple_information_retrieval",
                              "timeline_reorder"]
    assert dataset_entry("hotpotqa_e") == dataset_entry("hotpotqa")
    assert len(longbench_e_datasets()) == 13 and "qmsum_e" not in longbench_e_datasets()



def test_truncation_lengths_are_headkvs_run_longbench():
    """HeadKV's run_longbench.py (L85–91, L137–139): the first key of `model2maxlen` contained in the lowercased
    model path gives the truncation; the profile records it and the paper configs use it (not KVCache-Factory's
    7500 for Llama-3)."""
    from pathlib import Path

    from headscore.study.reproduce import load_config

    model2maxlen = {"llama2": 3950, "llama-2": 3950, "llama3": 7950, "llama-3": 7950, "mistral": 31500}

    def theirs(model_path: str) -> int:
        found = None
        for key in model2maxlen:
            if key in model_path.lower():
                found = model2maxlen[key]
        assert found is not None
        return found

    values = profile()["model_max_length"]["values"]
    assert profile()["model_max_length"]["provenance"]["repository"] == "FYYFU/HeadKV"
    assert values["Meta-Llama-3-8B-Instruct"] == theirs("meta-llama/Meta-Llama-3-8B-Instruct") == 7950
    assert values["Mistral-7B-Instruct-v0.2"] == theirs("mistralai/Mistral-7B-Instruct-v0.2") == 31500
    configs = Path(__file__).resolve().parents[2] / "configs"
    for name in ("llama3-8b-instruct", "mistral-7b-instruct"):
        config = load_config(configs / f"{name}.yaml")
        assert config.section("evaluate")["max_length"] == theirs(config.top["model"].partition("@")[0])


# ------------------------------------------------------------------------------------------------ prompts


RECORDS = {  # one small record per dataset, written for the test
    "narrativeqa": {"context": "Ann finds a key.", "input": "What does Ann find?", "answers": ["a key"]},
    "qasper": {"context": "We use 3 layers.", "input": "How many layers?", "answers": ["3"]},
    "multifieldqa_en": {"context": "The bridge is red.", "input": "What colour is the bridge?",
                        "answers": ["red"]},
    "hotpotqa": {"context": "Passage 1:\nBo was born in Oslo.", "input": "Where was Bo born?",
                 "answers": ["Oslo"]},
    "2wikimqa": {"context": "Passage 1:\nCy directed Rain.", "input": "Who directed Rain?", "answers": ["Cy"]},
    "musique": {"context": "Passage 1:\nDee sang Fog.", "input": "Who sang Fog?", "answers": ["Dee"]},
    "gov_report": {"context": "The agency spent more.", "input": "", "answers": ["Spending rose."]},
    "qmsum": {"context": "A: We agree.", "input": "What was agreed?", "answers": ["They agreed."]},
    "multi_news": {"context": "Rain fell. Rivers rose.", "input": "", "answers": ["Floods."]},
    "trec": {"context": "Question: Who wrote Emma?\nType: Human being", "input": "Where is Lima?",
             "answers": ["Location"], "all_classes": TREC_CLASSES},
    "triviaqa": {"context": "Passage: Lima is in Peru.\nQuestion: Where is Lima?\nAnswer: Peru",
                 "input": "Passage: Oslo is in Norway.\nQuestion: Where is Oslo?\nAnswer:", "answers": ["Norway"]},
    "samsum": {"context": "Dialogue: A: hi\nSummary: A greets.", "input": "Dialogue: B: bye\nSummary:",
               "answers": ["B leaves."]},
    "passage_count": {"context": "Paragraph 1: x\nParagraph 2: x", "input": "", "answers": ["1"]},
    "passage_retrieval_en": {"context": "Paragraph 1: cats\nParagraph 2: dogs", "input": "About dogs.",
                             "answers": ["Paragraph 2"]},
    "lcc": {"context": "def f(x):\n", "input": "", "answers": ["    return x"]},
    "repobench-p": {"context": "# a.py\nX = 1\n", "input": "import a\nprint(", "answers": ["a.X)"]},
}


def test_every_dataset_renders_its_template(tokenizer, tmp_path):
    assert list(RECORDS) == longbench_datasets()
    for dataset, record in RECORDS.items():
        path = tmp_path / f"{dataset}.jsonl"
        write_jsonl(path, [{**record, "length": 10}])
        (sample,) = get_task(f"longbench:{path}").samples(tokenizer)
        entry = dataset_entry(dataset)
        assert sample.prompt == entry["prompt"].format(**record), dataset
        assert sample.template == "raw" and sample.stop == "eos" and sample.min_new_tokens == 1
        assert sample.max_new_tokens == entry["max_new_tokens"] and sample.task == f"longbench:{dataset}"
        assert sample.length == len(tokenizer(sample.prompt, add_special_tokens=True)["input_ids"])
        assert record["context"] in sample.prompt and record["input"] in sample.prompt
    # three prompts written out in full, from LongBench's strings
    trec = get_task(f"longbench:{tmp_path / 'trec.jsonl'}").samples(tokenizer)[0]
    assert trec.prompt == ("Please determine the type of the question below. Here are some examples of "
                           "questions.\n\nQuestion: Who wrote Emma?\nType: Human being\nWhere is Lima?")
    lcc = get_task(f"longbench:{tmp_path / 'lcc.jsonl'}").samples(tokenizer)[0]
    assert lcc.prompt == "Please complete the code given below. \ndef f(x):\nNext line of code:\n"
    repo = get_task(f"longbench:{tmp_path / 'repobench-p.jsonl'}").samples(tokenizer)[0]
    assert repo.prompt == ("Please complete the code given below. \n# a.py\nX = 1\nimport a\nprint("
                           "Next line of code:\n")
    # LongBench-E records (dataset field hotpotqa_e) use the hotpotqa template
    path = tmp_path / "e.jsonl"
    write_jsonl(path, [{**RECORDS["hotpotqa"], "dataset": "hotpotqa_e", "length": 5000}])
    (e,) = get_task(f"longbench:{path}").samples(tokenizer)
    assert e.task == "longbench:hotpotqa_e" and e.prompt == dataset_entry("hotpotqa")["prompt"].format(
        **RECORDS["hotpotqa"]) and e.meta["record_length"] == 5000


def test_llama2_and_chat_templates(tokenizer, tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    write_jsonl(path, [RECORDS["hotpotqa"]])
    plain = dataset_entry("hotpotqa")["prompt"].format(**RECORDS["hotpotqa"])
    (wrapped,) = get_task(f"longbench:{path}", template="llama2").samples(tokenizer)
    assert wrapped.prompt == f"[INST] {plain} [/INST]"
    (chat,) = get_task(f"longbench:{path}", template="chat").samples(tokenizer)
    messages = [{"role": "user", "content": plain}]
    assert chat.prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.length == len(encode_prompt(tokenizer, chat.prompt, "chat")["input_ids"])


class WordTokenizer:
    """Words as tokens, BOS (id 0) added with special tokens: the authors' truncation by hand."""

    def __init__(self):
        self.vocab = {"<s>": 0}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=False):
        words = {i: w for w, i in self.vocab.items()}
        return "".join(f" {words[i]}" for i in ids if not (skip_special_tokens and i == 0))


def test_middle_truncation_counts_special_tokens():
    tok = WordTokenizer()
    text = " ".join(f"w{i}" for i in range(20))  # 21 ids with BOS
    # max 10 -> half 5: ids [BOS, w0..w3] and [w15..w19]; BOS is skipped when decoding
    assert middle_truncate(tok, text, 10) == " w0 w1 w2 w3 w15 w16 w17 w18 w19"
    assert middle_truncate(tok, text, 21) == text  # 21 ids fit
    assert middle_truncate(tok, text, 11) == " w0 w1 w2 w3 w15 w16 w17 w18 w19"  # int(11 / 2) = 5
    assert middle_truncate(tok, text, None) == text


def test_truncation_on_a_real_tokenizer(tokenizer, tmp_path):
    words = " ".join(f"w{i}" for i in range(400))
    record = {"context": words, "input": "Which word?", "answers": ["w1"]}
    path = tmp_path / "hotpotqa.jsonl"
    write_jsonl(path, [record])
    full = dataset_entry("hotpotqa")["prompt"].format(**record)
    ids = tokenizer(full, add_special_tokens=True)["input_ids"]
    (sample,) = get_task(f"longbench:{path}", max_length=100).samples(tokenizer)
    assert sample.prompt == tokenizer.decode(ids[:50], skip_special_tokens=True) + tokenizer.decode(
        ids[-50:], skip_special_tokens=True)
    assert sample.prompt.startswith("Answer the question") and sample.prompt.endswith("Which word?\nAnswer:")
    assert "w200" not in sample.prompt and abs(sample.length - 100) <= 2
    with pytest.raises(HeadscoreError, match="at least 2"):
        get_task(f"longbench:{path}", max_length=1).samples(tokenizer)


def test_sample_scores_use_the_profile(tokenizer, tmp_path):
    path = tmp_path / "trec.jsonl"
    write_jsonl(path, [RECORDS["trec"]])
    (trec,) = get_task(f"longbench:{path}").samples(tokenizer)
    assert trec.metric == "longbench:classification" and trec.meta["first_line"]
    assert score(trec, "\nLocation\nEntity") == 1.0  # first line only: "Location"
    assert score(trec, "Location Entity") == 0.5
    path = tmp_path / "passage_retrieval_en.jsonl"
    write_jsonl(path, [RECORDS["passage_retrieval_en"]])
    assert score(get_task(f"longbench:{path}").samples(tokenizer)[0], "Paragraph 2") == 1.0
    write_jsonl(path, [{**RECORDS["trec"], "all_classes": None}])
    with pytest.raises(HeadscoreError, match="all_classes"):
        get_task(f"longbench:{path}", dataset="trec").samples(tokenizer)


def test_longbench_errors(tokenizer, tmp_path):
    path = tmp_path / "mystery.jsonl"
    write_jsonl(path, [{"context": "c", "input": "q", "answers": ["a"]}])
    with pytest.raises(HeadscoreError, match="unknown LongBench dataset 'mystery'"):
        get_task(f"longbench:{path}").samples(tokenizer)
    write_jsonl(path, [{"context": "c", "input": "q", "answers": []}])
    with pytest.raises(HeadscoreError, match="answers"):
        get_task(f"longbench:{path}", dataset="hotpotqa").samples(tokenizer)
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(HeadscoreError, match="not valid JSON"):
        get_task(f"longbench:{path}").samples(tokenizer)
    with pytest.raises(HeadscoreError, match="not found"):
        get_task(f"longbench:{tmp_path / 'missing.jsonl'}").samples(tokenizer)
    with pytest.raises(HeadscoreError, match="unknown template"):
        get_task(f"longbench:{path}", template="alpaca").samples(tokenizer)


def test_shorthands(tmp_path):
    assert expand_specs("loogle") == ["loogle:bigai-nlco/LooGLE"]
    with pytest.raises(HeadscoreError, match="needs the folder"):
        expand_specs("longbench")
    for name in longbench_datasets():
        (tmp_path / f"{name}.jsonl").write_text("")
    local = expand_specs(f"longbench:{tmp_path}")
    assert local == [f"longbench:{tmp_path / name}.jsonl" for name in longbench_datasets()]
    with pytest.raises(HeadscoreError, match="lacks qasper_e.jsonl, multifieldqa_en_e.jsonl"):
        expand_specs(f"longbench-e:{tmp_path}")
    # the generated tasks default to the chat template in evaluate, LongBench to the authors' raw prompt
    path = tmp_path / "hotpotqa.jsonl"
    write_jsonl(path, [RECORDS["hotpotqa"]])
    built = build_tasks(f"niah,longbench:{path}")
    assert [t.template for t in built] == ["chat", "raw"]


# ------------------------------------------------------------------------------------------------ LooGLE


def test_loogle_layouts(tokenizer, tmp_path):
    pairs = [{"Q": "When did Ann leave?", "A": "In 1990", "type": "timeline_reorder", "S": ["..."]},
             {"Q": "How old is Ann?", "A": "40", "type": "computation", "S": []},
             {"Q": "Short one?", "A": "x", "type": "shortdep", "S": []}]
    github = tmp_path / "longdep_qa.jsonl"
    write_jsonl(github, [{"input": "Ann left in 1990 aged 40.", "title": "Ann", "qa_pairs": repr(pairs),
                          "output": "none"}])
    samples = get_task(f"loogle:{github}").samples(tokenizer)
    assert [s.task for s in samples] == ["loogle:timeline_reorder", "loogle:computation"]  # shortdep skipped
    expected = ("Please answer the question based on the long texts below. \nAnn left in 1990 aged 40.\n"
                "Question: When did Ann leave?\nAnswer:")
    assert samples[0].prompt == expected
    assert [s.max_new_tokens for s in samples] == [32, 32] and samples[0].metric == "longbench:qa_f1"
    assert score(samples[0], "in 1990") == 1.0 and not samples[0].meta["first_line"]
    flat = tmp_path / "flat.jsonl"
    write_jsonl(flat, [{"context": "Doc.", "question": "Why?", "answer": "Because.",
                        "type": "comprehension_and_reasoning", "doc_id": "d1"}])
    (one,) = get_task(f"loogle:{flat}").samples(tokenizer)
    assert one.task == "loogle:comprehension_and_reasoning" and one.answers == ["Because."]
    assert one.max_new_tokens == 64
    write_jsonl(flat, [{"context": "Doc.", "question": "Why?", "answer": "Because."}])
    with pytest.raises(HeadscoreError, match="no question type"):
        get_task(f"loogle:{flat}").samples(tokenizer)


# ------------------------------------------------------------------------------------------------ generation


def test_min_new_tokens_keeps_eos_from_ending_at_once(tiny_llama):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8, vocab=64)
    geometry = Geometry.from_config(model.config)
    ids = torch.arange(3, 40)[None]
    press = make_press("full", geometry)
    cache, logits, _ = prefill_compressed(model, ids, press)
    first = int(logits.argmax())
    tokens, _ = decode(model, cache, logits, 4, eos={first})
    assert tokens == [first]  # plain: the EOS ends at once
    cache, logits, _ = prefill_compressed(model, ids, press)
    tokens, _ = decode(model, cache, logits, 4, eos={first}, min_new_tokens=1)
    masked = logits.clone()
    masked[first] = float("-inf")
    assert tokens[0] == int(masked.argmax()) and tokens[0] != first
    # the authors' call: transformers' generate with min_length = context + 1 and the EOS list
    with torch.inference_mode():
        reference = model.generate(ids, max_new_tokens=4, do_sample=False, num_beams=1,
                                   min_length=ids.shape[1] + 1, eos_token_id=[first], pad_token_id=0)
    assert tokens == reference[0, ids.shape[1]:].tolist()


def test_evaluate_writes_the_longbench_table(tiny_llama, tokenizer, tmp_path):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=len(tokenizer))
    records = [{**RECORDS["hotpotqa"], "_id": f"h{i}", "dataset": "hotpotqa_e", "length": n}
               for i, n in enumerate((100, 5000, 9000))]
    path = tmp_path / "hotpotqa_e.jsonl"
    write_jsonl(path, records)
    samples = get_task(f"longbench:{path}", max_new_tokens=3).samples(tokenizer)
    options = EvaluateOptions(methods=["full", "snapkv"], budgets=[16])
    result = evaluate(model, tokenizer, samples, tmp_path / "run", options=options, model_name="tiny",
                      figures=False)
    table = longbench_table(samples, result.rows)
    for entry in table:
        scores = [r["score"] for r in result.rows if r["method"] == entry["method"]]
        assert entry["hotpotqa_e"] == round(100 * sum(scores) / 3, 2) == entry["average"]
        assert [entry[f"hotpotqa_e {b}"] for b in ("0-4k", "4-8k", "8k+")] == [round(100 * s, 2) for s in scores]
    assert "| snapkv | 16 |" in (tmp_path / "run" / "longbench.md").read_text()
    assert all(len(tokenizer(r["prediction"])["input_ids"]) <= 3 for r in result.rows)


def test_longbench_table_by_hand():
    samples = [Sample(id=f"{d}{i}", task=f"longbench:{d}", context="", question="", answers=["a"],
                      metric="longbench:qa_f1", prompt="", length=1, meta={"dataset": d, "record_length": 1})
               for d in ("qasper", "musique") for i in range(2)]
    scores = {"qasper0": 1.0, "qasper1": 0.5, "musique0": 0.0, "musique1": 1 / 3}
    rows = [{"task": s.task, "sample": s.id, "method": "full", "budget": None, "score": scores[s.id]}
            for s in samples] + [{"task": "niah", "sample": "x", "method": "full", "budget": None, "score": 1.0}]
    (entry,) = longbench_table(samples, rows)
    # qasper 75.00, musique 16.67 (16.666...), average (75 + 16.67) / 2 = 45.835 -> 45.84 (45.83 in binary)
    assert entry["qasper"] == 75.0 and entry["musique"] == 16.67
    assert entry["average"] == round((75.0 + 16.67) / 2, 2)


# the paper's main table (HeadKV performance_table.png): 6 LongBench QA scores, their Avg., LooGLE's 4 (Doc.QA,
# Info. Retrieval, Timeline, Computation), their Avg.
PAPER_ROWS = {
    "Llama-3 FullKV": ([25.56, 32.07, 39.71, 43.57, 35.28, 21.18], 32.90, [8.73, 11.21, 0.67, 7.43], 7.01),
    "Llama-3 128 HeadKV-R2": ([21.80, 29.19, 41.89, 43.73, 35.01, 20.40], 32.00, [9.60, 11.13, 0.67, 7.22], 7.16),
    "Mistral FullKV": ([26.63, 32.99, 49.34, 42.77, 27.35, 18.78], 32.98, [12.17, 15.52, 0.49, 10.03], 9.55),
}


def test_paper_averages_are_the_main_tables():
    """Two averages, one over the 6 QA datasets and one over LooGLE's 4 tasks, reproduce the paper's Avg.
    columns from its own dataset scores."""
    assert set(loogle_tasks()) == set(MAIN_TABLE_LOOGLE) and set(MAIN_TABLE_QA) <= set(longbench_datasets())
    for qa, qa_average, loogle, loogle_average in PAPER_ROWS.values():
        scores = {**dict(zip(MAIN_TABLE_QA, qa, strict=True)), **dict(zip(MAIN_TABLE_LOOGLE, loogle, strict=True)),
                  "trec": 70.0}
        assert paper_averages(scores) == {"qa_average": qa_average, "loogle_average": loogle_average}
        assert paper_averages({k: v for k, v in scores.items() if k != "musique"}) == {
            "loogle_average": loogle_average}  # an average only where all its datasets ran
    samples = [Sample(id=d, task=f"longbench:{d}", context="", question="", answers=["a"],
                      metric="longbench:qa_f1", prompt="", length=1, meta={"dataset": d})
               for d in (*MAIN_TABLE_QA, "trec")]
    rows = [{"task": s.task, "sample": s.id, "method": "full", "budget": None, "score": 0.5 if s.id == "trec" else 0.2}
            for s in samples]
    (entry,) = longbench_table(samples, rows)
    assert entry["qa_average"] == 20.0 and entry["average"] == round((6 * 20 + 50) / 7, 2)
    assert "loogle_average" not in entry
    header = longbench_markdown([entry]).splitlines()[0]
    assert header.endswith("| trec | average | qa_average |")


# ------------------------------------------------------------------------------------------------ dump


def test_dump_prompts_cli(tokenizer, tmp_path, headscore_cli):
    for dataset in ("hotpotqa", "trec"):
        write_jsonl(tmp_path / f"{dataset}.jsonl", [RECORDS[dataset]])
    out = tmp_path / "prompts.jsonl"
    tasks = f"longbench:{tmp_path / 'hotpotqa.jsonl'},longbench:{tmp_path / 'trec.jsonl'}"
    result = headscore_cli("evaluate", "--tasks", tasks, "--max-length", "30", "--dump-prompts", out, "--out",
                           tmp_path / "never")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["dataset"] for line in lines] == ["hotpotqa", "trec"]
    full = dataset_entry("hotpotqa")["prompt"].format(**RECORDS["hotpotqa"])
    assert lines[0]["prompt"] == middle_truncate(tokenizer, full, 30) != full
    assert lines[0]["prompt_tokens"] == len(tokenizer(lines[0]["prompt"])["input_ids"])
    assert lines[1]["first_line"] and lines[1]["metric"] == "longbench:classification"
    assert {line["eos_token_ids"][0] for line in lines} == {tokenizer.eos_token_id}
    assert [(x["max_new_tokens"], x["min_new_tokens"], x["stop"], x["template"]) for x in lines] == [
        (32, 1, "eos", "raw"), (64, 1, "eos", "raw")]
    assert not (tmp_path / "never").exists()
    bad = headscore_cli("evaluate", "--tasks", f"longbench:{tmp_path / 'absent.jsonl'}", "--dump-prompts",
                        tmp_path / "x.jsonl")
    assert bad.returncode == 2 and "not found" in bad.stderr and not (tmp_path / "x.jsonl").exists()
