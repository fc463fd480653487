"""Derive the committed fixtures in tests/data/ from the authors' files (see tests/data/README.md).

    python tests/data/derive_reference.py PATH/TO/reference

PATH/TO/reference holds headkv/*_heads.json, headkv/needles_retrieval_reasoning.jsonl,
retrieval_head/needles.jsonl and the haystack folders headkv/haystack_for_detect_r2/part{0,1}/ and
retrieval_head/haystack_for_detect/part{1,2,3}/. Writes tests/data/headkv/<same name> (each head's per-trial
list reduced to its mean, a one-element list of a float64, same HeadKV format), tests/data/headkv/summary.json
(geometry, trials per head, zeros, the largest per-trial value, the SHA-256 of the full file), the first
`HAYSTACK_BYTES` bytes of every haystack file under tests/data/haystacks/ (same folder layout) with
tests/data/haystacks/summary.json (each full file's size and SHA-256), and prints the SHA-256 digests of the
official needle strings that tests/scoring/test_trials.py stores.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEEDLE_FILES = ("headkv/needles_retrieval_reasoning.jsonl", "retrieval_head/needles.jsonl")
HAYSTACK_DIRS = ("headkv/haystack_for_detect_r2", "retrieval_head/haystack_for_detect")
HAYSTACK_BYTES = 6000  # ASCII JSON text: the cut never splits a character


def needle_digest(records: list[dict]) -> str:
    """SHA-256 over every needle's needle, question and answer (answer, else real_needle) strings, in order."""
    digest = hashlib.sha256()
    for record in records:
        for text in (record["needle"], record["question"], record.get("answer", record["real_needle"])):
            digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def main(reference: Path) -> None:
    summary = {}
    for path in sorted((reference / "headkv").glob("*_heads.json")):
        raw = path.read_bytes()
        scores = json.loads(raw)
        means = {key: [sum(values) / len(values)] if values else [] for key, values in scores.items()}
        (HERE / "headkv" / path.name).write_text(json.dumps(means), encoding="utf-8")
        keys = [tuple(int(part) for part in key.split("-")) for key in scores]
        summary[path.name] = {
            "layers": max(layer for layer, _ in keys) + 1,
            "heads": max(head for _, head in keys) + 1,
            "trials_per_head": sorted({len(values) for values in scores.values()}),
            "zeros": sum(value == 0 for values in scores.values() for value in values),
            "max": max(max(values) for values in scores.values() if values),
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
    (HERE / "headkv" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    haystacks = {}
    for folder in HAYSTACK_DIRS:
        for path in sorted((reference / folder).glob("part*/*.txt")):
            raw = path.read_bytes()
            name = str(path.relative_to(reference))
            target = HERE / "haystacks" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(raw[:HAYSTACK_BYTES])
            haystacks[name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                               "fixture_bytes": HAYSTACK_BYTES}
    (HERE / "haystacks" / "summary.json").write_text(json.dumps(haystacks, indent=2) + "\n", encoding="utf-8")
    for name in NEEDLE_FILES:
        records = [json.loads(line) for line in (reference / name).read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        print(f"{name}: {needle_digest(records)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
