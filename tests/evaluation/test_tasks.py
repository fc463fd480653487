"""Evaluation tasks: sample construction, seeded determinism, gold answers checked by re-deriving them."""

from __future__ import annotations

import json
import re

import pytest

from headscore.core.errors import HeadscoreError
from headscore.core.prompts import encode_prompt
from headscore.evaluation.tasks import Sample, expand_specs, get_task, score
from headscore.evaluation.tasks.longbench import middle_truncate
from headscore.scoring.trials import load_needles, needles_dir

LENGTHS = (300, 500)


@pytest.fixture(scope="module")
def tokenizer():
    from headscore.core.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


def test_niah_grid_lengths_and_depths(tokenizer):
    samples = get_task("niah", lengths=LENGTHS, depths=(0, 50, 100)).samples(tokenizer)
    needles, _ = load_needles(str(needles_dir() / "eval.jsonl"))
    assert len(samples) == len(LENGTHS) * 3 * len(needles)
    assert len({s.id for s in samples}) == len(samples)
    for s in samples:
        needle = next(n for n in needles if n.id == s.meta["needle_id"])
        assert s.answers == [needle.answer] and s.metric == "rouge1_recall"
        assert abs(s.length - s.target_length) <= 3
        assert s.length == len(encode_prompt(tokenizer, s.prompt)["input_ids"])
        assert needle.needle in s.context and s.context in s.prompt and s.question in s.prompt
        where = s.context.index(needle.needle) / len(s.context)
        assert abs(where - s.depth / 100) < 0.2  # sentence boundary near the requested depth
    assert samples[0].context.startswith(needles[0].needle)  # depth 0: at the very start


def test_eval_needles_do_not_leak_scoring_needles():
    evaluation, _ = load_needles(str(needles_dir() / "eval.jsonl"))
    scoring = load_needles("reasoning")[0] + load_needles("retrieval")[0]
    scoring_text = " ".join(n.needle.lower() for n in scoring)
    for needle in evaluation:
        assert needle.answer.lower() not in scoring_text


def test_niah_scoring():
    sample = Sample(id="x", task="niah", context="", question="q", answers=["smoked paprika from Valencia"],
                    metric="rouge1_recall", prompt="", length=0)
    assert score(sample, "Smoked paprika from Valencia.") == 1.0
    assert score(sample, "It is smoked paprika.") == 0.5  # 2 of the 4 reference tokens
    assert score(sample, "Salt.") == 0.0


@pytest.mark.parametrize("name", ["multikey", "multivalue", "vartrack", "twohop"])
def test_synthetic_deterministic_and_answerable(tokenizer, name):
    task = get_task(name, lengths=LENGTHS, samples_per_length=3, seed=7)
    first, again = task.samples(tokenizer), task.samples(tokenizer)
    assert [s.to_dict() for s in first] == [s.to_dict() for s in again]
    other = get_task(name, lengths=LENGTHS, samples_per_length=3, seed=8).samples(tokenizer)
    assert [s.answers for s in other] != [s.answers for s in first]
    assert len(first) == 6
    for s in first:
        assert abs(s.length - s.target_length) <= 5
        assert all(a in s.context for a in s.answers)
        assert task.score(s, " ".join(s.answers)) == 1.0
        assert task.score(s, "I do not know.") == 0.0


def test_multikey_answer_is_the_asked_key(tokenizer):
    for s in get_task("multikey", lengths=(400,), samples_per_length=4).samples(tokenizer):
        facts = dict(re.findall(r"The access code for the (\w+ \w+) vault is (\d+)\.", s.context))
        assert len(facts) == 4
        key = re.search(r"for the (\w+ \w+) vault\?", s.question).group(1)
        assert s.answers == [facts[key]]


def test_multivalue_partial_credit(tokenizer):
    s = get_task("multivalue", lengths=(400,), samples_per_length=1).samples(tokenizer)[0]
    assert s.metric == "contains_all" and len(s.answers) == 4
    assert score(s, f"{s.answers[0]} and {s.answers[2]}") == 0.5


def test_vartrack_answers_resolve_to_the_value(tokenizer):
    for s in get_task("vartrack", lengths=(500,), samples_per_length=4, hops=3).samples(tokenizer):
        value = re.search(r"assigned the value (\d+)", s.question).group(1)
        env: dict[str, str] = {}
        for name, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", s.context):  # reference resolver
            env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
        assert sorted(n for n, v in env.items() if v == value) == sorted(s.answers)
        assert len(s.answers) == 4 and len(env) == 7


def test_twohop_answer_follows_the_ages(tokenizer):
    for s in get_task("twohop", lengths=(400,), samples_per_length=6).samples(tokenizer):
        ages = {p: int(a) for p, a in re.findall(r"(\w+ \w+) is (\d+) years old\.", s.context)}
        likes = dict(re.findall(r"(\w+ \w+)'s favourite instrument is the (\w+)\.", s.context))
        pick = max if "older" in s.question else min
        assert s.answers == [likes[pick(ages, key=ages.get)]]
        assert s.meta["distractor"] in likes.values() and s.meta["distractor"] != s.answers[0]


def test_too_short_length_is_an_error(tokenizer):
    with pytest.raises(HeadscoreError, match="too short"):
        get_task("vartrack", lengths=(40,)).samples(tokenizer)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_longbench_jsonl_metrics_and_prompt(tokenizer, tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    write_jsonl(path, [
        {"context": "Passage 1: Ada lived in Turin.", "input": "Where did Ada live?", "answers": ["Turin"],
         "_id": "a1"},
        {"context": "A long report.", "input": "", "answers": ["A summary."], "dataset": "gov_report"},
    ])
    samples = get_task(f"longbench:{path}").samples(tokenizer)
    assert [s.id for s in samples] == ["a1", "gov_report-1"]
    assert [s.metric for s in samples] == ["qa_f1", "rouge_l"]  # from the file stem, then the record's field
    assert [s.max_new_tokens for s in samples] == [32, 512]
    assert "Where did Ada live?" in samples[0].prompt and samples[0].prompt.startswith("Passage 1")
    assert "summary" in samples[1].prompt.lower()
    # qa_f1("in turin", "turin") = 2 * (1/2) * 1 / (3/2) = 2/3
    assert score(samples[0], "In Turin") == pytest.approx(2 / 3)
    forced = get_task(f"longbench:{path}", metric="contains", limit=1).samples(tokenizer)
    assert len(forced) == 1 and forced[0].metric == "contains"


def test_longbench_middle_truncation(tokenizer, tmp_path):
    words = " ".join(f"w{i}" for i in range(400))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    cut = middle_truncate(tokenizer, words, 100)
    assert cut.startswith(tokenizer.decode(ids[:50])) and cut.endswith(tokenizer.decode(ids[-50:]))
    assert abs(len(tokenizer(cut, add_special_tokens=False)["input_ids"]) - 100) <= 2
    assert "w200" not in cut
    assert middle_truncate(tokenizer, "short text", 100) == "short text"
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [{"context": words, "input": "q", "answers": ["a"]}])
    s = get_task(f"longbench:{path}", max_length=100, metric="qa_f1").samples(tokenizer)[0]
    assert s.context == cut


def test_longbench_errors(tokenizer, tmp_path):
    path = tmp_path / "trec.jsonl"
    write_jsonl(path, [{"context": "c", "input": "q", "answers": ["a"]}])
    with pytest.raises(HeadscoreError, match="no metric known"):
        get_task(f"longbench:{path}").samples(tokenizer)
    write_jsonl(path, [{"context": "c", "input": "q", "answers": []}])
    with pytest.raises(HeadscoreError, match="answers"):
        get_task(f"longbench:{path}", metric="qa_f1").samples(tokenizer)
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(HeadscoreError, match="not valid JSON"):
        get_task(f"longbench:{path}", metric="qa_f1").samples(tokenizer)
    with pytest.raises(HeadscoreError, match="not found"):
        get_task(f"longbench:{tmp_path / 'missing.jsonl'}").samples(tokenizer)


def test_registry():
    with pytest.raises(HeadscoreError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(HeadscoreError, match="no setting depths"):
        get_task("multikey", depths=(0,))
    assert get_task("niah", lengths=None, seed=None).lengths == (1000, 2000, 4000)  # None settings dropped
    with pytest.raises(HeadscoreError, match="needs a source"):
        get_task("longbench:")
    assert expand_specs("niah, synthetic") == ["niah", "multikey", "multivalue", "vartrack", "twohop"]
