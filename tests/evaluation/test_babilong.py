"""`babilong:SOURCE`: the authors' reasoning-in-a-haystack prompts, truncation, scorer and data layouts, against a
plain re-implementation of HeadKV's `run_babilong.py` / `reason_needle` steps on small records written here."""

from __future__ import annotations

import hashlib
import json

import pytest

from headscore.core.errors import HeadscoreError
from headscore.evaluation.evaluate import build_tasks, stop_tokens
from headscore.evaluation.tasks import expand_specs, get_task, score, task_samples
from headscore.evaluation.tasks.babilong import HUB_BABILONG, compare_answers, profile

# reason_needle/prompts.py (FYYFU/HeadKV @ 0862a09): qa1's strings and their templates, as written there
QA1 = {
    "instruction": "I will give you context with the facts about positions of different persons hidden in some random "
                   "text and a question. You need to answer the question based only on the information from the "
                   "facts. If a person was in different locations, use the latest location to answer the question.",
    "examples": "<example>\nCharlie went to the hallway. Judith come back to the kitchen. Charlie travelled to "
                "balcony. Where is Charlie?\nAnswer: The most recent location of Charlie is balcony.\n</example>\n\n"
                "<example>\n"
                "Alan moved to the garage. Charlie went to the beach. Alan went to the shop. Rouse travelled to "
                "balcony. Where is Alan?\nAnswer: The most recent location of Alan is shop.\n</example>",
    "post_prompt": "Always return your answer in the following format: The most recent location of ’person’ is "
                   "’location’. Do not write anything else after that.",
}
SYSTEM_TEMPLATE = "{instruction}\n\n{examples}\n\n{post_prompt}"
USER_TEMPLATE = "<context>\n{context}\n</context>\n\nQuestion: {question}"
LABELS = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]


def their_prompt(tokenizer, record, model_max_len):
    """run_babilong.py's steps: get_formatted_input, the chat template, tokenized without special tokens; longer
    than model_max_len: decode(first half) + decode(last half) (special tokens kept)."""
    prompt = f"{SYSTEM_TEMPLATE}\n\n{USER_TEMPLATE}".format(
        instruction=QA1["instruction"], examples=QA1["examples"], post_prompt=QA1["post_prompt"],
        context=record["input"].strip(), question=record["question"]).strip()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer([prompt], add_special_tokens=False)["input_ids"][0]
    if len(ids) > model_max_len:
        half = int(model_max_len / 2)
        prompt = tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:])
    return prompt


def their_compare(target, output, question, task_labels):
    """reason_needle/metrics.py's compare_answers, as written there."""
    output = output.lower()
    output = output.split(".")[0]
    output = output.split("<context>")[0]
    output = output.split("<example>")[0]
    output = output.split("Question")[0]
    target = target.lower()
    task_labels = {label.lower() for label in task_labels}
    labels_in_question = {label for label in task_labels if label in question.lower()}
    labels_in_output = {label for label in task_labels if label in output}
    labels_in_output = labels_in_output - labels_in_question
    if "," in target and len(target) > 3:
        subtargets = target.split(",")
        if all(t in labels_in_output for t in subtargets) and len(labels_in_output) == len(subtargets):
            return True
    elif target in labels_in_output and len(labels_in_output) == 1:
        return True
    return False


def records(length):
    filler = "The sky was grey over the hills. " * (8 if length == "0k" else 40)
    return [{"input": f"  {filler}Mary went to the kitchen. {filler}John moved to the garden. ",
             "question": "Where is Mary?", "target": "kitchen"},
            {"input": f"Sandra journeyed to the office. {filler}", "question": "Where is Sandra?", "target": "office"}]


@pytest.fixture(scope="module")
def jsonl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("babilong")
    for length in ("0k", "1k", "2k", "4k", "8k"):
        (folder / length).mkdir()
        for task in ("qa1", "qa2"):
            (folder / length / f"{task}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records(length)), encoding="utf-8")
    return folder


def test_profile_holds_their_strings():
    data = profile()
    assert data["template"] == f"{SYSTEM_TEMPLATE}\n\n{USER_TEMPLATE}"
    assert {k: data["tasks"]["qa1"][k] for k in QA1} == QA1 and data["tasks"]["qa1"]["labels"] == LABELS
    # sha256 of qa1..qa5's instruction, examples and post_prompt joined by NUL, from their prompts.py
    parts = [data["tasks"][qa][k] for qa in ("qa1", "qa2", "qa3", "qa4", "qa5")
             for k in ("instruction", "examples", "post_prompt")]
    assert hashlib.sha256("\0".join(parts).encode()).hexdigest() == (
        "a1c27d8c0561eb4f1e5cf4bffe430f5d6eec033a76d2fbab313e99ddeaac8375")
    assert data["tasks"]["qa5"]["labels"] == ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"]


@pytest.mark.parametrize("max_length", [None, 150])
def test_prompts_are_theirs(tokenizer, jsonl_folder, max_length):
    task = get_task(f"babilong:{jsonl_folder}", tasks=["qa1"], max_length=max_length)
    samples = task_samples(task, tokenizer)
    assert [s.meta["split"] for s in samples] == ["0k", "0k", "1k", "1k", "2k", "2k", "4k", "4k", "8k", "8k"]
    for sample, record in zip(samples, [r for length in ("0k", "1k", "2k", "4k", "8k") for r in records(length)],
                              strict=True):
        assert sample.prompt == their_prompt(tokenizer, record, max_length or 10**9), sample.id
        ids = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
        assert sample.length == len(ids)
        assert (sample.template, sample.stop, sample.max_new_tokens, sample.min_new_tokens) == ("chat", "eos", 15, 1)
    if max_length:
        assert max(s.length for s in samples) <= max_length + 2  # retokenized halves may differ by a token
        assert any(len(tokenizer(their_prompt(tokenizer, r, 10**9), add_special_tokens=False)["input_ids"])
                   > max_length for r in records("8k"))  # the truncation ran
    eos, line_end = stop_tokens(samples[0], tokenizer, {1, 2}, {3})
    assert eos == {tokenizer.eos_token_id} and not line_end  # eos_token_id=[tokenizer.eos_token_id]


def test_scorer_is_theirs_on_hand_examples(tokenizer, jsonl_folder):
    cases = [
        ("kitchen", "The most recent location of Mary is kitchen.", "Where is Mary?", True),
        ("kitchen", "The most recent location of Mary is kitchen. Before that, the garden.", "Where is Mary?", True),
        ("kitchen", "Mary is in the kitchen or the garden", "Where is Mary?", False),  # two labels
        ("kitchen", "Kitchen", "Is the kitchen north of the garden?", False),  # labels in the question never count
        ("garden", "garden", "Is the kitchen north of the garden?", False),
        ("apple,milk", "apple and milk", "What is Daniel carrying?", True),  # several targets: all and only them
        ("apple,milk", "apple", "What is Daniel carrying?", False),
    ]
    labels5 = ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"]
    for target, output, question, by_hand in cases:
        labels = labels5 if "," in target else LABELS
        assert compare_answers(target, output, question, labels) == their_compare(target, output, question,
                                                                                   labels) == by_hand, output
    sample = task_samples(get_task(f"babilong:{jsonl_folder}", tasks=["qa1"], splits=["0k"]), tokenizer)[0]
    assert score(sample, " The most recent location of Mary is kitchen.") == 1.0
    assert score(sample, "garden") == 0.0


def test_saved_dataset_layout_and_lengths_by_truncation(tokenizer, jsonl_folder, tmp_path):
    """Their folder (`datasets.save_to_disk` per length, the tasks as splits) gives the same samples as JSONL; the
    lengths run to 8k below a 10000-token truncation (Llama-3's 7950) and to 32k above (Mistral's 31500)."""
    import datasets

    for length in ("0k", "1k", "2k", "4k", "8k"):
        datasets.DatasetDict({task: datasets.Dataset.from_list(records(length)) for task in ("qa1", "qa2")}
                             ).save_to_disk(str(tmp_path / length))
    saved = task_samples(get_task(f"babilong:{tmp_path}", tasks=["qa2"], max_length=7950), tokenizer)
    jsonl = task_samples(get_task(f"babilong:{jsonl_folder}", tasks=["qa2"], max_length=7950), tokenizer)
    assert [s.to_dict() for s in saved] == [s.to_dict() for s in jsonl] and len(saved) == 10
    with pytest.raises(HeadscoreError, match=r"has no 16k/qa2.jsonl nor a saved dataset"):
        task_samples(get_task(f"babilong:{tmp_path}", tasks=["qa2"], max_length=31500), tokenizer)


def test_specs_settings_and_errors(tmp_path):
    assert expand_specs("babilong") == [f"babilong:{HUB_BABILONG}"]
    assert HUB_BABILONG.endswith("@ee0d588794c7ac098062ee0d247c733d62e94fe2")  # their dataset_info.json's
    built = build_tasks(f"babilong:{tmp_path}", {"max_length": 7950, "lengths": [1000], "template": "raw"})
    assert built[0].max_length == 7950  # the study's evaluate.max_length reaches it; lengths/template do not apply
    with pytest.raises(HeadscoreError, match="unknown task 'qa6'"):
        get_task(f"babilong:{tmp_path}", tasks=["qa6"])
    with pytest.raises(HeadscoreError, match="folder not found"):
        task_samples(get_task("babilong:./missing-folder"), None)


def test_hub_failure_is_one_line(monkeypatch):
    """Without the hub (or the dataset), one error line naming the source, its config and split, and the local
    alternative."""
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'RMT-team/babilong' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(HeadscoreError) as error:
        task_samples(get_task(f"babilong:{HUB_BABILONG}", tasks=["qa1"], splits=["1k"]), None)
    assert str(error.value) == (f"cannot load BABILong '{HUB_BABILONG}' (config 1k, split qa1): Couldn't reach "
                                "'RMT-team/babilong' on the Hub (LocalEntryNotFoundError); a folder of "
                                "<length>/<qaN>.jsonl files works too (see docs/tasks.md)")
