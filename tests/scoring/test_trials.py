"""build-needles: trial construction, exact answer spans, determinism and bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from headscore.core.errors import HeadscoreError
from headscore.core.haystack import Haystack, load_haystack
from headscore.core.prompts import answer_token_span, encode_prompt, insertion_point
from headscore.scoring.trials import (
    Trial,
    build_needle_trials,
    context_lengths,
    depth_percents,
    load_needles,
    read_trials,
    trials_fingerprint,
    write_trials,
)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A real `python -m headscore` (the entry point, a fresh interpreter): the in-process runs use `headscore_cli`."""
    return subprocess.run([sys.executable, "-m", "headscore", *args], cwd=cwd, capture_output=True, text=True)


# SHA-256 over each official needle's needle, question and answer (else real_needle) strings, NUL-separated,
# in file order: HeadKV Important_Head/haystack_for_detect_r2/needles.jsonl and Retrieval_Head
# haystack_for_detect/needles.jsonl (tests/data/derive_reference.py prints them; see tests/data/README.md).
OFFICIAL_NEEDLES = {
    "reasoning": ("headkv/needles_retrieval_reasoning.jsonl",
                  "c2cf88e02bdb584f0d67f731e3ca07501d66f7b20a5f8822bc99e57ec43542f5"),
    "retrieval": ("retrieval_head/needles.jsonl", "bec35744130b6092d822837d4f704c807c18572d875ac8457f4a2a632483d6ea"),
}


def needle_digest(needles) -> str:
    digest = hashlib.sha256()
    for needle in needles:
        for text in (needle.needle, needle.question, needle.answer):
            digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


@pytest.mark.parametrize("kind", sorted(OFFICIAL_NEEDLES))
def test_needle_files_match_the_official_strings(kind):
    ours, _ = load_needles(kind)
    assert needle_digest(ours) == OFFICIAL_NEEDLES[kind][1]
    reasoning, _ = load_needles("reasoning")
    assert "evening.  John is 12" in reasoning[1].needle  # the official double space is kept


@pytest.mark.parametrize("kind", sorted(OFFICIAL_NEEDLES))
def test_needle_files_equal_the_authors_files(reference_dir, kind):
    """Extra, where the authors' files exist: field by field, and the stored digest is theirs."""
    official = reference_dir / OFFICIAL_NEEDLES[kind][0]
    theirs = [json.loads(line) for line in official.read_text().splitlines() if line.strip()]
    ours, _ = load_needles(kind)
    assert [n.needle for n in ours] == [t["needle"] for t in theirs]
    assert [n.question for n in ours] == [t["question"] for t in theirs]
    assert [n.answer for n in ours] == [t.get("answer", t["real_needle"]) for t in theirs]


def test_lengths_and_depths_follow_the_paper():
    assert context_lengths(1000, None, 5, 8192) == [1000, 2748, 4496, 6244, 7992]
    assert context_lengths(1000, None, 5, 32768)[-1] == 8000
    assert depth_percents(10)[0] == 0 and depth_percents(10)[-1] == 100 and len(depth_percents(10)) == 10
    with pytest.raises(HeadscoreError, match="above the model's context"):
        context_lengths(1000, 9000, 5, 8192)


def test_insertion_point_is_a_sentence_boundary():
    text = "One. Two three. Four five six."
    assert insertion_point(text, 12) == len("One.")
    assert insertion_point(text, 2) == 0
    assert insertion_point(text, len(text)) == len(text)


def test_answer_token_span_from_offsets():
    offsets = [(0, 0), (0, 3), (3, 7), (7, 12), (12, 13)]  # a special token first
    assert answer_token_span(offsets, 3, 12) == (2, 4)
    assert answer_token_span(offsets, 4, 13) == (2, 5)


@pytest.mark.parametrize("kind,template", [("reasoning", "raw"), ("retrieval", "chat")])
def test_every_answer_span_decodes_to_the_answer(tokenizer, kind, template):
    trials = build_needle_trials("smollm2-135m", kind=kind, min_length=300, max_length=900, lengths=3,
                                 depths=4, template=template)
    needles, _ = load_needles(kind)
    assert len(trials) == 3 * 4 * len(needles)
    assert len({t.id for t in trials}) == len(trials)
    for trial in trials:
        ids = encode_prompt(tokenizer, trial.prompt, trial.template)["input_ids"]
        start, end = trial.answer_span
        assert tokenizer.decode(ids[start:end]).strip().lower() == trial.answer.lower()
        assert len(ids) == trial.length
        assert abs(trial.length - trial.target_length) <= 3
        chars = trial.answer_chars
        assert trial.prompt[chars[0]:chars[1]].lower() == trial.answer.lower()


def test_needle_goes_in_at_the_requested_depth(tokenizer):
    trials = build_needle_trials("smollm2-135m", min_length=600, max_length=600, lengths=1, depths=5)
    for trial in trials:
        fraction = trial.answer_span[0] / trial.length
        if trial.depth == 0:
            assert trial.answer_span[0] <= 2
        else:  # at or a sentence before the requested depth (of the context part of the prompt)
            assert fraction <= trial.depth / 100 + 0.02
            assert fraction >= trial.depth / 100 - 0.2


def test_default_build_writes_100_trials_and_is_byte_identical(tmp_path, headscore_cli):
    """Once through a fresh interpreter (the entry point, its own hash seed) and once in this process: the same
    file, and the same report (the in-process runner other CLI tests use gives what the entry point gives)."""
    results = []
    for folder, run in (("a", run_cli), ("b", headscore_cli)):
        (tmp_path / folder).mkdir()
        result = run("build-needles", "--out", "trials.jsonl", cwd=tmp_path / folder)
        assert result.returncode == 0, result.stderr
        results.append(result)
    first, second = tmp_path / "a" / "trials.jsonl", tmp_path / "b" / "trials.jsonl"
    assert first.read_bytes() == second.read_bytes()
    assert (results[0].stdout, results[0].stderr) == (results[1].stdout, results[1].stderr)
    trials = read_trials(first)
    assert len(trials) == 100
    assert sorted({t.target_length for t in trials}) == [1000, 2748, 4496, 6244, 7992]
    assert {t.tokenizer for t in trials} == {"smollm2-135m"}
    assert "100 trials" in result.stdout


def test_trial_records_keep_the_file_bytes(tmp_path):
    built = build_needle_trials("smollm2-135m", min_length=200, max_length=260, lengths=2, depths=2)
    path = tmp_path / "trials.jsonl"
    write_trials(path, built)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert list(json.loads(lines[0])) == ["id", "kind", "needle_id", "target_length", "length", "depth", "template",
                                          "question", "answer", "answer_span", "answer_chars", "tokenizer",
                                          "tokenizer_fingerprint", "haystack_fingerprint", "needles_fingerprint",
                                          "prompt"]
    trials = read_trials(path)
    assert trials == built and all(isinstance(t, Trial) for t in trials)
    assert [json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in trials] == lines
    write_trials(tmp_path / "again.jsonl", trials)
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()
    # a hand-made line: only the required keys, in another order, plus a key of its own
    record = {"prompt": "Context. Question?", "id": "x", "answer": "Context", "answer_span": [0, 1],
              "template": "raw", "tokenizer_fingerprint": "f", "source": {"by": "hand"}}
    trial = Trial.from_dict(record)
    assert (trial.answer_span, trial.length, trial.extra) == ((0, 1), None, {"source": {"by": "hand"}})
    assert trial.to_dict() == record
    assert trials_fingerprint([trial]) == trials_fingerprint([Trial.from_dict(json.loads(json.dumps(record)))])


def test_haystack_sources(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("Second file.")
    (folder / "a.txt").write_text("First file. ")
    assert load_haystack(str(folder)).text == "First file. Second file."
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "alpha."}\n{"text": "beta."}\n')
    assert load_haystack(str(jsonl)).text == "alpha.\n\nbeta."
    assert len(load_haystack(None).text) > 100_000
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(HeadscoreError, match="no string field 'text'"):
        load_haystack(str(bad))
    assert Haystack("x", "abc").fingerprint != Haystack("x", "abd").fingerprint


def test_short_haystack_is_repeated(tokenizer):
    from headscore.core.prompts import HaystackTokens

    hay = HaystackTokens(tokenizer, "A short sentence. Another one.", 200)
    assert len(hay.ends) > 200
    assert hay.prefix(5) == hay.text[: hay.ends[4]]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "./no/such/model"], "unknown model"),
        (["--haystack", "/nonexistent/folder"], "unknown haystack"),
        (["--haystack", "EMPTY"], "is empty"),
        (["--max-length", "9000"], "above the model's context"),
        (["--min-length", "50", "--max-length", "60", "--lengths", "2"], "too short to hold needle"),
        (["--needles", "BADNEEDLES"], "not valid JSON"),
        (["--needles", "NOANSWER"], "answer does not occur"),
        (["--kind", "sideways"], "unknown needle kind"),
    ],
)
def test_bad_input_gets_one_line_and_no_file(tmp_path, args, message, headscore_cli):
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "bad.jsonl").write_text('{"needle": "x", \n')
    (tmp_path / "noanswer.jsonl").write_text('{"needle": "A fact.", "question": "Q?", "answer": "other"}\n')
    substitutions = {"EMPTY": str(tmp_path / "empty.txt"), "BADNEEDLES": str(tmp_path / "bad.jsonl"),
                     "NOANSWER": str(tmp_path / "noanswer.jsonl")}
    out = tmp_path / "trials.jsonl"
    result = headscore_cli("build-needles", "--out", str(out), *[substitutions.get(a, a) for a in args], cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("headscore: error:") and message in lines[0], result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trials")]
