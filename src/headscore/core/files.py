"""Atomic file output, fingerprints and run metadata shared by every stage."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from headscore import __version__
from headscore.core.errors import HeadscoreError


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds.

    A crash or an exception leaves `path` untouched and no partial file behind.
    """
    path = Path(path)
    if path.is_dir():
        raise HeadscoreError(f"cannot write {path}: it is a folder; give a file path")
    if path.parent.exists() and not path.parent.is_dir():
        raise HeadscoreError(f"cannot write {path}: {path.parent} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON value in a file; a missing, empty or malformed file is a HeadscoreError naming `what`."""

    path = Path(path)
    if not path.is_file():
        raise HeadscoreError(f"{what} not found: {path}")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise HeadscoreError(f"{what} {path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise HeadscoreError(f"{what} {path} is not valid JSON: {error.msg}") from error


def read_jsonl(path: str | os.PathLike, what: str) -> list[tuple[int, Any]]:
    """`(line number, parsed value)` of every non-blank line of a JSONL file; a malformed line is a
    HeadscoreError naming `what`, the file and the line."""

    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise HeadscoreError(f"{what} {path} line {number} is not valid JSON: {error.msg}") from error
    return records


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Deterministic JSON (sorted keys only where the caller sorted them), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def fingerprint_bytes(*parts: bytes | str) -> str:
    """Short, stable sha256 fingerprint of the given parts (16 hex digits)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def fingerprint_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of the software that produced an output, for metadata files."""
    # lazy: every command imports this module, and `headscore --help` must not wait for torch/transformers
    import torch
    import transformers

    return {
        "headscore": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def hardware() -> dict[str, Any]:
    """The machine the study ran on, for the report."""
    import torch  # lazy, as in `versions`

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info
