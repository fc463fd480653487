"""Derive the committed fixtures in tests/data/ from the authors' files (see tests/data/README.md).

    python tests/data/derive_reference.py PATH/TO/reference

PATH/TO/reference holds headkv/*_heads.json, headkv/needles_retrieval_reasoning.jsonl and
retrieval_head/needles.jsonl. Writes tests/data/headkv/<same name> (each head's per-trial list reduced to its
mean, a one-element list of a float64, same HeadKV format), tests/data/headkv/summary.json (geometry, trials
per head, zeros, the largest per-trial value, the SHA-256 of the full file) and prints the SHA-256 digests of
the official needle strings that tests/scoring/test_trials.py stores.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEEDLE_FILES = ("headkv/needles_retrieval_reasoning.jsonl", "retrieval_head/needles.jsonl")


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
    for name in NEEDLE_FILES:
        records = [json.loads(line) for line in (reference / name).read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        print(f"{name}: {needle_digest(records)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
