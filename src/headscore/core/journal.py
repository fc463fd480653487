"""Append-only JSONL journals: long runs write one line per finished unit and resume from it.

Line 1 holds `{"header": {...}}` (what the run is); every later line is one finished record. A trailing partial
line (a write cut off by a kill) is dropped on reading, so a rerun continues where the last one stopped.

`run_journaled` is the loop around a journal that estimate and evaluate share: one process appends to
`OUT/journal.jsonl`; under a launcher each rank appends to its own `OUT/ranks/rank-K/journal.jsonl`, and at the
end rank 0 writes every record into `OUT/journal.jsonl` and removes `OUT/ranks/`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from headscore.core.distributed import ranks
from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_open

K = TypeVar("K", bound=Hashable)  # a journal key (a trial index, a sample id)

JOURNAL = "journal.jsonl"
RANKS_DIR = "ranks"


def read_journal(path: Path, repair: bool = True) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, records) of a journal; a trailing partial line (an interrupted write) is cut off the file, or
    only skipped with `repair=False` (reading a journal another process is appending to)."""
    if not path.is_file():
        return None, []
    raw = path.read_bytes()
    good = raw.rfind(b"\n") + 1
    lines = raw[:good].decode("utf-8").splitlines()
    if good < len(raw) and repair:
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
    check_header(path, found, header)
    return records


def check_header(path: Path, found: dict[str, Any], header: dict[str, Any]) -> None:
    """A journal written for another run (other options, model or inputs) is an error naming the differences."""
    differing = sorted(key for key in set(found) | set(header) if found.get(key) != header.get(key))
    if differing:
        details = "; ".join(f"{key}: {found.get(key)!r} there, {header.get(key)!r} now" for key in differing)
        raise HeadscoreError(f"{path.parent} holds another run ({details}); use another --out folder")


def write_journal(path: Path, header: dict[str, Any], records: Sequence[dict[str, Any]]) -> None:
    """Write a whole journal (header line, then one line per record) atomically."""
    with atomic_open(path) as handle:
        for entry in [{"header": header}, *records]:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _journals(out_dir: Path) -> list[Path]:
    """The run's journals: the main one, then every rank's (also those of ranks an earlier run had)."""
    return [out_dir / JOURNAL, *sorted((out_dir / RANKS_DIR).glob(f"rank-*/{JOURNAL}"))]


def _collect(out_dir: Path, header: dict[str, Any], field: str, repair: bool = True
             ) -> dict[Any, dict[str, Any]]:
    """Every finished record of the run in `out_dir` (main and rank journals), by `record[field]`.

    `repair=False` reads while other ranks append (their partial last lines are skipped, not cut).
    """
    header = json.loads(json.dumps(header))
    records: dict[Any, dict[str, Any]] = {}
    for path in _journals(out_dir):
        found, entries = read_journal(path, repair)
        if found is None:
            continue
        check_header(path, found, header)
        for entry in entries:
            records.setdefault(entry[field], entry)
    return records


def run_journaled(out_dir: Path, header: dict[str, Any], keys: Sequence[K], field: str,
                  work: Callable[[K], dict[str, Any]],
                  progress: Callable[[int, int, dict[str, Any] | None], None] | None = None,
                  check: Callable[[dict[K, dict[str, Any]]], None] | None = None, *,
                  work_batch: Callable[[list[K]], list[dict[str, Any]]] | None = None, batch: int = 1
                  ) -> dict[K, dict[str, Any]] | None:
    """Run `work(key)` for every key not yet in the run's journals; returns every record by key.

    `work` returns a JSON-able record with `record[field] == key`; each is journaled as soon as it finishes.
    Under a launcher the unfinished keys are split over the ranks (`Ranks.part`) and only rank 0 gets the
    records back (None on the others), once every rank is done and the main journal holds them all, in `keys`
    order. `progress(done, total, record)` reports this process's work: once at the start (record None), then
    after every key; `done` counts the keys finished before this run. `check(records)` sees every record
    finished so far (all ranks') at the start and after each of this process's keys, and may raise to stop
    the run (the journals keep what was done). With `work_batch`, the unfinished keys run `batch` at a time
    (in order) through `work_batch(keys)` (one record per key, in order), journaled one by one after it returns.
    The one-run case of `run_journaled_together`.
    """
    chunk_work = None if work_batch is None else lambda chunk, whiches: [[r] for r in work_batch(chunk)]
    found = run_journaled_together([(Path(out_dir), header, check)], keys, field,
                                   lambda key, which: [work(key)], progress, batch=batch, work_batch=chunk_work)
    if found is None:
        return None
    assert isinstance(found[0], dict)  # one run: its error was raised
    return found[0]


def run_journaled_together(runs: Sequence[tuple[Path, dict[str, Any], Callable[[dict[K, dict[str, Any]]], None]
                                                | None]], keys: Sequence[K], field: str,
                           work: Callable[[K, list[int]], list[dict[str, Any]]],
                           progress: Callable[[int, int, dict[str, Any] | None], None] | None = None, *,
                           batch: int = 1,
                           work_batch: Callable[[list[K], list[list[int]]], list[list[dict[str, Any]]]] | None
                           = None) -> list[dict[K, dict[str, Any]] | Exception] | None:
    """`run_journaled` for several runs over the same keys, each with its own folder, header and `check`:
    `work(key, which)` gets the positions of the runs (ascending) that lack `key` and returns their records,
    in that order (one unit of work serves them all); each run's journal ends as if it had run alone. With
    `work_batch`, the unfinished keys go `batch` at a time to `work_batch(keys, whiches)` (each key's records,
    as `work` returns them), journaled key by key after it returns.

    A run whose `check` raises stops (its journals keep what was done) and the others go on; when every run
    has stopped, the first error is raised again. Returns (rank 0; None on the other ranks) each run's records
    by key, or the error that stopped it. `progress` counts keys: a key is done when every run has it.
    """

    where = ranks()
    owns = [out_dir / RANKS_DIR / f"rank-{where.rank}" / JOURNAL if where.distributed else out_dir / JOURNAL
            for out_dir, _, _ in runs]
    for own, (_, header, _) in zip(owns, runs, strict=True):
        open_journal(own, header)  # creates this process's journal, drops a partial last line, checks the header
    where.barrier()  # every journal is whole before any rank reads the others
    dones = [_collect(out_dir, header, field) for out_dir, header, _ in runs]
    where.barrier()  # ... and read by every rank before any rank appends
    todo = where.part([key for key in keys if any(key not in done for done in dones)])
    before = sum(all(key in done for done in dones) for key in keys)
    errors: list[Exception | None] = [None] * len(runs)

    def checked(position: int) -> None:
        out_dir, header, check = runs[position]
        if check is None or errors[position] is not None:
            return
        done = dones[position]
        try:
            check({**_collect(out_dir, header, field, repair=False), **done} if where.distributed else done)
        except Exception as error:  # this run stops; the others go on
            errors[position] = error

    def stop_if_all_stopped() -> None:
        if all(error is not None for error in errors):
            raise next(error for error in errors if error is not None)

    for position in range(len(runs)):
        checked(position)
    stop_if_all_stopped()
    if progress:
        progress(before, before + len(todo), None)
    size = batch if work_batch is not None else 1
    count = 0
    for begin in range(0, len(todo), size):
        chunk = todo[begin:begin + size]
        whiches = [[position for position, done in enumerate(dones) if key not in done and errors[position] is None]
                   for key in chunk]
        if work_batch is not None:
            pending = [(key, which) for key, which in zip(chunk, whiches, strict=True) if which]
            results = dict(zip([key for key, _ in pending],
                               work_batch([key for key, _ in pending], [which for _, which in pending])
                               if pending else [], strict=True))
        for key, which in zip(chunk, whiches, strict=True):
            count += 1
            if not which:
                continue
            records = results[key] if work_batch is not None else work(key, which)
            for position, record in zip(which, records, strict=True):
                append_journal(owns[position], record)
                dones[position][key] = record
            if progress:
                progress(before + count, before + len(todo), records[0])
            for position in which:
                checked(position)
            stop_if_all_stopped()
    where.barrier()
    if not where.is_main:
        return None
    order = {key: rank for rank, key in enumerate(keys)}
    found: list[dict[K, dict[str, Any]] | Exception] = []
    for (out_dir, header, _), done, error in zip(runs, dones, errors, strict=True):
        if error is None and (out_dir / RANKS_DIR).is_dir():
            done = _collect(out_dir, header, field)
            records = sorted(done.values(), key=lambda r: order.get(r[field], len(order)))
            write_journal(out_dir / JOURNAL, json.loads(json.dumps(header)), records)
            shutil.rmtree(out_dir / RANKS_DIR)
        found.append(done if error is None else error)
    return found
