"""Evaluation tasks: sample construction, seeded determinism, gold answers checked by re-deriving them."""

from __future__ import annotations

import re

import pytest

from headscore.core.errors import HeadscoreError
from headscore.core.prompts import encode_prompt
from headscore.evaluation.tasks import Sample, expand_specs, get_task, score
from headscore.scoring.trials import load_needles, needles_dir

LENGTHS = (300, 500)


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


@pytest.fixture
def task_registry():
    """The task registries as they were, after the test."""
    from headscore.evaluation.tasks import SHORTHANDS, TASKS

    kept = [(registry, dict(registry)) for registry in (TASKS, SHORTHANDS)]
    yield
    for registry, entries in kept:
        registry.clear()
        registry.update(entries)


def test_a_task_family_registers_by_decorator(task_registry, headscore_cli):
    """One class registers a family of names (each fixing a setting) in a group; the group is a shorthand;
    `--tasks`' help lists what is registered."""
    from dataclasses import dataclass

    from headscore.evaluation.tasks import Task, register_task, task_settings, tasks_help

    @dataclass
    class Echo(Task):
        word: str = "a"
        times: int = 1

        def samples(self, tokenizer):
            return []

    for word in ("x", "y"):
        register_task(f"echo:{word}", group="echoes", word=word)(Echo)
    assert Echo.name == "echo:x"  # the first name, unless the class names itself
    assert expand_specs("niah,echoes") == ["niah", "echo:x", "echo:y"]
    assert get_task("echo:y", times=2) == Echo(word="y", times=2)
    assert task_settings("echo:x") == ["times"]  # the name fixes `word`
    with pytest.raises(HeadscoreError, match="no setting word"):
        get_task("echo:x", word="z")
    with pytest.raises(HeadscoreError, match="unknown task 'echo:z'.*echoes"):
        get_task("echo:z")
    with pytest.raises(HeadscoreError, match="registered twice"):
        register_task("echo:x")(Echo)
    assert "echoes (= echo:x, echo:y)" in tasks_help()
    help_text = headscore_cli("evaluate", "--help", env={"COLUMNS": "400"}).stdout
    assert "synthetic (= multikey, multivalue, vartrack, twohop)" in help_text and "echo:x, echo:y" in help_text


def test_registry():
    with pytest.raises(HeadscoreError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(HeadscoreError, match="no setting depths"):
        get_task("multikey", depths=(0,))
    assert get_task("niah", lengths=None, seed=None).lengths == (1000, 2000, 4000)  # None settings dropped
    with pytest.raises(HeadscoreError, match="needs a source"):
        get_task("longbench:")
    assert expand_specs("niah, synthetic") == ["niah", "multikey", "multivalue", "vartrack", "twohop"]
