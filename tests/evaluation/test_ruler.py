"""RULER's tasks: every prompt against the hand-derived template of tests/data/ruler/templates.json (RULER's own
wording, answer prefix, tokens to generate, metric), gold answers re-derived from the generated text alone,
lengths, seeds, the question split, the QA loaders on records written here, and the two metrics."""

from __future__ import annotations

import json
import re
import string
from collections import Counter

import pytest

from headscore.core.errors import HeadscoreError
from headscore.core.haystack import load_haystack
from headscore.core.metrics import score_answers
from headscore.core.prompts import apply_template, encode_prompt
from headscore.evaluation.tasks import expand_specs, get_task, task_settings
from headscore.evaluation.tasks.ruler import RULER_SYNTHETIC, RULER_TASKS, largest_fitting
from headscore.evaluation.tasks.ruler_haystacks import NOISE

SLOTS = {"context": r"(?s:.*)", "example": r"(?s:.*?)", "key": r"[^\s,?]+", "keys": r"[^?]+?", "value": r"\d+",
         "query": r"[^\n]+", "answer": r"[^\n]+"}
VALUE = {"numbers": r"\d{7}", "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"}


@pytest.fixture(scope="module")
def templates(data_dir):
    return json.loads((data_dir / "ruler" / "templates.json").read_text())


def pattern(text: str, **slots: str) -> re.Pattern:
    """A regex of a template: literal text, each `{slot}` a named group (its later uses back-references)."""
    out, seen = [], set()
    for literal, name, _, _ in string.Formatter().parse(text):
        out.append(re.escape(literal))
        if name is not None:
            out.append(f"(?P={name})" if name in seen else f"(?P<{name}>{slots.get(name, SLOTS[name])})")
            seen.add(name)
    return re.compile("".join(out))


def matched(template: str, text: str, **slots: str) -> dict[str, str]:
    found = pattern(template, **slots).fullmatch(text)
    assert found, f"not in RULER's form:\n{template[:300]}\n---\n{text[:300]}...{text[-300:]}"
    return found.groupdict()


def one(task: str, tokenizer, length: int = 1000, **settings):
    return get_task(f"ruler:{task}", lengths=(length,), samples_per_length=1, **settings).samples(tokenizer)[0]


def check_common(sample, expected, fills):
    assert sample.metric == expected["metric"] and sample.max_new_tokens == expected["tokens_to_generate"]
    assert sample.meta["answer_prefix"] == expected["answer_prefix"].format(**fills)
    assert sample.question == expected["question"].format(**fills)
    assert sample.prompt.endswith(sample.question + sample.meta["answer_prefix"])  # raw: RULER's base template
    assert sample.prompt.rfind(sample.question) == len(sample.prompt) - len(sample.question + sample.meta[
        "answer_prefix"])
    assert sample.context == fills["context"] and sample.stop == "eos"


def vt_chain(context: str, value: str) -> list[str]:
    """The variables holding `value`, in the order the statements assign them."""
    holding: list[str] = []
    for line in context.split("\n"):
        if line == NOISE:
            continue
        found = re.fullmatch(r"VAR ([A-Z]+) = (?:VAR ([A-Z]+) |(\d+))", line)
        assert found, line
        if found.group(3) == value or found.group(2) in holding:
            holding.append(found.group(1))
    return holding


def cwe_top(listing: str) -> tuple[list[str], Counter]:
    entries = re.findall(r"(\d+)\. (\S+)", listing)
    assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
    assert listing == " ".join(f"{n}. {w}" for n, w in entries)
    counts = Counter(w for _, w in entries)
    return [w for w, _ in counts.most_common(10)], counts


@pytest.mark.parametrize("task", [t for t in RULER_TASKS if t.startswith("niah")])
def test_niah_prompts_follow_ruler(tokenizer, templates, task):
    expected, spec = templates[task], RULER_TASKS[task]
    sample = one(task, tokenizer)
    fills = matched(expected["user"] + expected["answer_prefix"], sample.prompt)
    check_common(sample, expected, fills)
    needle = pattern(expected["needle"], key=r"[\w-]+", value=VALUE[spec.value])
    needles = [(m["key"], m["value"]) for m in needle.finditer(sample.context)]
    asked = fills["keys"].replace(", and ", ", ").split(", ") if "keys" in fills else [fills["key"]]
    gold = [v for key in asked for k, v in needles if k == key]
    assert sorted(sample.answers) == sorted(gold) and len(gold) == spec.values * spec.queries
    if "keys" in fills:  # multiquery: the answers follow the asked keys
        assert sample.answers == gold
    lines = sample.context.split("\n")
    if expected["haystack"] == "noise":
        assert len(needles) == expected["needles"] and all(line == NOISE or needle.fullmatch(line) for line in lines)
    elif expected["haystack"] == "needle":
        assert all(needle.fullmatch(line) for line in lines) and len(lines) > 3
        assert all(re.fullmatch(SLOTS["key"] if spec.key == "words" else VALUE["uuids"], k) for k, _ in needles)
    else:
        assert len(needles) == expected["needles"]
        rest = re.sub(" +", " ", needle.sub("", sample.context)).strip()
        essays = re.sub(r"\s+", " ", load_haystack(None).text).strip()
        assert len(rest) > 500 and essays.startswith(rest)


def test_vt_prompt_follows_ruler(tokenizer, templates):
    expected = templates["vt"]
    sample = one("vt", tokenizer)
    fills = matched(expected["user"] + expected["answer_prefix"], sample.prompt)
    check_common(sample, expected, fills)
    assert sample.answers == vt_chain(sample.context, fills["value"]) and len(sample.answers) == 5
    assert all(re.fullmatch("[A-Z]{5}", name) for name in sample.answers)
    example = matched(expected["example"], fills["example"])
    assert example["answer"].split(" ") == vt_chain(example["context"], example["value"])
    assert len(tokenizer(fills["example"], add_special_tokens=False)["input_ids"]) <= 520  # RULER's 500 + renaming


@pytest.mark.parametrize("length", [1000, 4096])
def test_cwe_prompt_follows_ruler(tokenizer, templates, length):
    expected = templates["cwe"]
    sample = one("cwe", tokenizer, length)
    fills = matched(expected["user"] + expected["answer_prefix"], sample.prompt)
    check_common(sample, expected, fills)
    top, counts = cwe_top(sample.context)
    assert sorted(sample.answers) == sorted(top)
    common, rare = (6, 1) if length < 4096 else (30, 3)  # RULER's frequencies below / from 4096 tokens
    assert {counts[w] for w in top} == {common} and set(counts.values()) == {common, rare}
    example = matched(expected["example"], fills["example"])
    shot_top, shot_counts = cwe_top(example["context"])
    assert set(shot_counts.values()) == ({3, 1} if length < 4096 else {10, 3})
    assert sorted(w for _, w in re.findall(r"(\d+)\. (\S+)", example["answer"])) == sorted(shot_top)


def test_fwe_prompt_follows_ruler(tokenizer, templates):
    expected = templates["fwe"]
    sample = one("fwe", tokenizer)
    fills = matched(expected["user"] + expected["answer_prefix"], sample.prompt)
    check_common(sample, expected, fills)
    ranked = Counter(sample.context.split(" ")).most_common()
    assert ranked[0][0] == "..." and sample.answers == [w for w, _ in ranked[1:4]]
    assert all(re.fullmatch("[a-z]{6}", w) for w, _ in ranked[1:])
    assert ranked[1][1] > ranked[3][1]


def squad_file(tmp_path):
    """SQuAD v2's official layout: two articles, one unanswerable question."""
    article = lambda title, paragraphs: {"title": title, "paragraphs": paragraphs}  # noqa: E731
    para = lambda text, qas: {"context": text, "qas": qas}  # noqa: E731
    qa = lambda q, answers: {"question": q, "answers": [{"text": a} for a in answers],  # noqa: E731
                             "is_impossible": not answers}
    data = {"data": [
        article("Rivers", [para("The Loire is the longest river in France.", [qa("Longest French river?",
                                                                                  ["The Loire", "Loire"])]),
                           para("The Rhone rises in the Swiss Alps.", [qa("Where does the Rhone rise?", [])])]),
        article("Birds", [para("Puffins nest in burrows on cliffs.", [qa("Where do puffins nest?", ["burrows"])]),
                          para("Swifts sleep while flying.", [qa("What do swifts do while flying?", ["sleep"])])])]}
    (tmp_path / "squad.json").write_text(json.dumps(data))
    return tmp_path


def hotpot_rows():
    return [{"question": f"Which of {a} and {b} is older?", "answer": a,
             "context": [[a, [f"{a} was founded in 18{i}0.", " It is old."]], [b, [f"{b} was founded in 19{i}0."]]]}
            for i, (a, b) in enumerate([("Oxbridge", "Newtown"), ("Alder", "Birch"), ("Cedar", "Dunmore")])]


def test_qa_1_squad_prompt_and_documents(tokenizer, templates, tmp_path):
    folder = squad_file(tmp_path)
    samples = get_task("ruler:qa_1", lengths=(400,), samples_per_length=3, qa_data=str(folder)).samples(tokenizer)
    assert [s.answers for s in samples] == [["The Loire", "Loire"], ["burrows"], ["sleep"]]  # impossible dropped
    for sample in samples:
        fills = matched(templates["qa_1"]["user"] + templates["qa_1"]["answer_prefix"], sample.prompt)
        check_common(sample, templates["qa_1"], fills)
        docs = re.split(r"\n\n(?=Document \d+:\n)", sample.context)
        assert [d.split(":\n", 1)[0] for d in docs] == [f"Document {i + 1}" for i in range(len(docs))]
        assert len(docs) >= 4  # every paragraph fits, then they repeat
    assert "Puffins nest" in samples[1].context and samples[1].question.endswith("Where do puffins nest?")
    hub = tmp_path / "hub"  # the hub's rows: one per question, answers as {text, answer_start}
    hub.mkdir()
    rows = [{"id": str(i), "title": a["title"], "context": p["context"], "question": q["question"],
             "answers": {"text": [x["text"] for x in q["answers"]], "answer_start": [0] * len(q["answers"])}}
            for i, (a, p, q) in enumerate((a, p, q) for a in json.loads((folder / "squad.json").read_text())["data"]
                                          for p in a["paragraphs"] for q in p["qas"])]
    (hub / "squad.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    again = get_task("ruler:qa_1", lengths=(400,), samples_per_length=3, qa_data=str(hub)).samples(tokenizer)
    assert [s.to_dict() for s in again] == [s.to_dict() for s in samples]
    assert score_answers(samples[0].metric, "It is the loire.", samples[0].answers) == 1.0


def test_qa_2_hotpot_hub_rows_and_original(tokenizer, templates, tmp_path):
    original = tmp_path / "original"
    original.mkdir()
    (original / "hotpotqa.json").write_text(json.dumps(hotpot_rows()))
    hub = tmp_path / "hub"
    hub.mkdir()
    rows = [{**r, "context": {"title": [t for t, _ in r["context"]], "sentences": [s for _, s in r["context"]]}}
            for r in hotpot_rows()]
    (hub / "hotpotqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    first, second = (get_task("ruler:qa_2", lengths=(300,), samples_per_length=2, qa_data=str(f)).samples(tokenizer)
                     for f in (original, hub))
    assert [s.to_dict() for s in first] == [s.to_dict() for s in second]
    assert first[0].answers == ["Oxbridge"] and "Oxbridge\nOxbridge was founded in 1800. It is old." in first[0].context
    matched(templates["qa_2"]["user"] + templates["qa_2"]["answer_prefix"], first[0].prompt)


def test_qa_missing_data_is_one_clear_error(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(HeadscoreError, match=r"qa_1 needs SQuAD v2 dev: .* holds none of squad.json.*dev-v2.0.json"):
        get_task("ruler:qa_1", lengths=(500,), qa_data=str(tmp_path)).samples(tokenizer)
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(HeadscoreError, match=r"qa_2 data, HotpotQA dev .*hotpot_qa.*: connection refused; "
                                             r"download .*hotpotqa.json .*--qa-data"):
        get_task("ruler:qa_2", lengths=(500,)).samples(tokenizer)


def test_chat_template_opens_the_answer_with_the_prefix(tokenizer, templates):
    expected = templates["niah_single_2"]
    chat = one("niah_single_2", tokenizer, template="chat")
    before, after = apply_template(tokenizer, "\x00", "chat").split("\x00")  # the chat wrap around a user turn
    prefix = chat.meta["answer_prefix"]
    assert chat.prompt.startswith(before) and chat.prompt.endswith(after + prefix) and "assistant" in after
    fills = matched(expected["user"], chat.prompt[len(before):-len(after + prefix)])
    assert prefix == expected["answer_prefix"].format(**fills) and chat.context == fills["context"]
    assert chat.prompt[chat.prompt.rfind(chat.question):] == chat.question + after + prefix


def test_multiquery_exposes_each_query(tokenizer):
    sample = one("niah_multiquery", tokenizer, template="chat")
    split = sample.prompt.rfind(sample.question)
    queries = sample.meta["queries"]
    assert [a for q in queries for a in q["answers"]] == sample.answers and len(queries) == 4
    for query in queries:
        single = sample.prompt[:split] + query["suffix"]
        key = re.search(r"for (\S+) mentioned", query["question"]).group(1)
        assert query["question"] == f"What is the special magic number for {key} mentioned in the provided text?"
        assert single.endswith(f"<|im_start|>assistant\n The special magic number for {key} mentioned in the "
                               "provided text is")
        assert f"One of the special magic numbers for {key} is: {query['answers'][0]}." in sample.context


@pytest.mark.parametrize("task", RULER_SYNTHETIC)
def test_seeds_and_lengths(tokenizer, task):
    lengths = (1000, 2000)
    first = get_task(f"ruler:{task}", lengths=lengths, samples_per_length=2, seed=3).samples(tokenizer)
    again = get_task(f"ruler:{task}", lengths=lengths, samples_per_length=2, seed=3).samples(tokenizer)
    other = get_task(f"ruler:{task}", lengths=lengths, samples_per_length=2, seed=4).samples(tokenizer)
    assert [s.to_dict() for s in first] == [s.to_dict() for s in again]
    assert all(a.prompt != b.prompt for a, b in zip(first, other, strict=True))
    assert len({s.prompt for s in first}) == len(first)
    for s in first:
        assert s.length == len(encode_prompt(tokenizer, s.prompt)["input_ids"])
        assert s.length + s.max_new_tokens <= s.target_length  # RULER's length counts the generated tokens
        assert s.length + s.max_new_tokens > 0.75 * s.target_length  # and the haystack fills it
        assert score_answers(s.metric, " ".join(s.answers), s.answers) == 1.0


def test_too_short_length_is_one_clear_error(tokenizer):
    with pytest.raises(HeadscoreError, match="ruler:cwe at length 300 is too short"):
        one("cwe", tokenizer, 300)


def test_largest_fitting_equals_brute_force():
    for limit in (0, 1, 5, 17, 100, 1000, 4097):
        def fits(n, limit=limit):
            return n <= limit

        for low in (0, 1, 3):
            for hint in (0, 2, 50, 5000):
                if limit < low:
                    with pytest.raises(HeadscoreError):
                        largest_fitting(fits, low, hint, "x")
                else:
                    assert largest_fitting(fits, low, hint, "x") == max(n for n in range(low, 5000) if fits(n))


def test_metrics_on_hand_examples():
    answers = ["8675309", "Jenny", "blue-whale"]
    assert score_answers("string_match_all", "jenny: 8675309", answers) == pytest.approx(2 / 3)
    assert score_answers("string_match_all", "BLUE-WHALE 8675309 and jenny", answers) == 1.0
    assert score_answers("string_match_all", "867530", answers) == 0.0  # a substring of the answer is not it
    assert score_answers("string_match_part", "It is Jenny.", answers) == 1.0  # any one answer
    assert score_answers("string_match_part", "blue whale", answers) == 0.0  # no normalization beyond case
    assert score_answers("string_match_all", "anything", []) == 0.0


def test_specs_expand_and_reject():
    assert expand_specs("ruler") == [f"ruler:{t}" for t in RULER_TASKS] and len(RULER_TASKS) == 13
    assert expand_specs("ruler-synthetic") == [f"ruler:{t}" for t in RULER_SYNTHETIC] and len(RULER_SYNTHETIC) == 11
    assert expand_specs("ruler:niah_single_1,vt,niah") == ["ruler:niah_single_1", "ruler:vt", "niah"]
    assert {"lengths", "samples_per_length", "seed", "qa_data", "template"} <= set(task_settings("ruler:vt"))
    assert get_task("ruler:vt").settings()["task"] == "ruler:vt"
    with pytest.raises(HeadscoreError, match="unknown task 'ruler:vtt'"):
        get_task("ruler:vtt")
    with pytest.raises(HeadscoreError, match="unknown task 'vt'"):
        expand_specs("vt") and get_task("vt")


def test_study_and_evaluate_build_ruler_tasks():
    """evaluate, tune and study configs build tasks through `build_tasks`: RULER takes the options it defines and
    the chat template unless one is given."""
    from headscore.evaluation.evaluate import build_tasks

    built = build_tasks("ruler-synthetic", {"lengths": [4000], "depths": [0, 50], "samples_per_length": 3,
                                            "max_length": None, "seed": 5, "template": None})
    assert [t.settings()["task"] for t in built] == [f"ruler:{t}" for t in RULER_SYNTHETIC]
    assert all(t.lengths == [4000] and t.samples_per_length == 3 and t.seed == 5 and t.template == "chat"
               for t in built)


@pytest.mark.slow
def test_smollm2_evaluates_ruler(smollm2, tmp_path, no_plots):
    """`evaluate` on RULER samples with the real model: RULER's metric per row, the full cache finds the number."""
    from headscore.evaluation.evaluate import EvaluateOptions, evaluate

    model, tokenizer = smollm2
    samples = get_task("ruler:niah_single_1", lengths=(1000,), samples_per_length=1,
                       template="chat").samples(tokenizer)
    result = evaluate(model, tokenizer, samples, tmp_path, options=EvaluateOptions(methods=["full", "snapkv"],
                                                                                     budgets=[64]),
                      model_name="smollm2-135m", figures=False)
    rows = {row["method"]: row for row in result.rows}
    assert set(rows) == {"full", "snapkv"} and all(r["metric"] == "string_match_all" for r in rows.values())
    assert rows["full"]["score"] == 1.0 and samples[0].answers[0] in rows["full"]["prediction"]
    assert rows["snapkv"]["kv_ratio"] < 0.2


def test_a_sample_depends_only_on_seed_task_length_and_index(tokenizer):
    alone = get_task("ruler:fwe", lengths=(1500,), samples_per_length=2).samples(tokenizer)
    among = get_task("ruler:fwe", lengths=(1000, 1500), samples_per_length=3).samples(tokenizer)
    assert [s.to_dict() for s in alone] == [s.to_dict() for s in among[3:5]]
