"""Append-only JSONL journals: long runs write one line per finished unit and resume from it.

Line 1 holds `{"header": {...}}` (what the run is); every later line is one finished record. A trailing partial
line (a write cut off by a kill) is dropped on reading, so a rerun continues where the last one stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from headscore.core.errors import HeadscoreError


def read_journal(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, records) of a journal; a trailing partial line (an interrupted write) is cut off the file."""
    if not path.is_file():
        return None, []
    raw = path.read_bytes()
    good = raw.rfind(b"\n") + 1
    lines = raw[:good].decode("utf-8").splitlines()
    if good < len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(good)
    entries = []
    for number, line in enumerate(lines, start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise HeadscoreError(f"journal {path} line {number} is corrupt ({error.msg}); delete the folder "
                                 "to start over") from error
    if not entries or "header" not in entries[0]:
        raise HeadscoreError(f"journal {path} has no header line; delete it to start over")
    return entries[0]["header"], entries[1:]


def append_journal(path: Path, entry: dict[str, Any]) -> None:
    """Append one line and force it to disk before the next unit of work starts."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def open_journal(path: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    """Records in the journal at `path` (created with `header` if absent); another run's journal is an error."""
    header = json.loads(json.dumps(header))  # tuples become lists, as they read back
    found, records = read_journal(path)
    if found is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        append_journal(path, {"header": header})
        return []
    differing = sorted(key for key in set(found) | set(header) if found.get(key) != header.get(key))
    if differing:
        details = "; ".join(f"{key}: {found.get(key)!r} there, {header.get(key)!r} now" for key in differing)
        raise HeadscoreError(f"{path.parent} holds another run ({details}); use another --out folder")
    return records
