"""Load a causal LM and its tokenizer; describe its attention geometry."""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from headscore.core.assets import DEFAULT_MODEL, quiet_transformers, resolve_model
from headscore.core.errors import HeadscoreError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Geometry:
    """Attention geometry: `layers` × `query_heads` query heads sharing `kv_heads` KV heads per layer."""

    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    max_context: int | None = None

    @property
    def grid(self) -> tuple[int, int, int]:
        """(layers, query heads, KV heads): what budgets and head scores must match."""
        return self.layers, self.query_heads, self.kv_heads

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.query_heads // self.kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Any) -> Geometry:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        query_heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or query_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // query_heads
        return cls(
            layers=config.num_hidden_layers,
            query_heads=query_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            max_context=getattr(config, "max_position_embeddings", None),
        )


def resolve_device(device: str | None = "auto") -> str:
    """`auto` (or None): `cuda` when a CUDA device is available, else `cpu`; any other name is returned as is
    (torch checks it when the model moves there)."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """`auto` (None) is float32 on CPU and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    device = resolve_device(device)
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise HeadscoreError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def load_tokenizer(model: str = DEFAULT_MODEL):

    quiet_transformers()

    source = resolve_model(model)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise HeadscoreError(f"cannot load tokenizer for model '{model}': {first_line(error)}") from error


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    device_map: str | None = None,
    attn_implementation: str = "sdpa",
):
    """Load `(model, tokenizer)` in eval mode. `model` is an alias, folder, .gguf file or hub id.

    `device` `auto`: CUDA when available, else CPU (`resolve_device`). `device_map="auto"` spreads a large
    model over the available devices (accelerate).
    """

    quiet_transformers()
    device = resolve_device(device)
    source = resolve_model(model)
    tokenizer = load_tokenizer(model)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, device), "attn_implementation": attn_implementation}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise HeadscoreError(f"cannot load model '{model}': {first_line(error)}") from error
    if not device_map:
        lm = lm.to(device)
    lm.eval()
    return lm, tokenizer


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the input ids go (the embedding's device, also under a device map)."""
    return model.get_input_embeddings().weight.device


def eos_ids(model: Any, tokenizer: Any = None) -> set[int]:
    """End-of-sequence ids of the model's generation config and the tokenizer."""
    found: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            found.add(source)
        elif isinstance(source, (list, tuple)):
            found.update(int(s) for s in source)
    return found


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_geometry(model: str = DEFAULT_MODEL) -> Geometry:
    """Geometry from the model's config alone (no weights loaded)."""

    quiet_transformers()
    try:
        return Geometry.from_config(AutoConfig.from_pretrained(resolve_model(model)))
    except (OSError, ValueError) as error:
        raise HeadscoreError(f"cannot load config of model '{model}': {first_line(error)}") from error


def cache_argument(model: Any) -> str:
    """The name under which `model`'s forward and `generate` take a KV cache: `cache` from transformers 5.23 on
    (where `past_key_values` is deprecated, its removal announced for 5.40), `past_key_values` before."""
    return _cache_argument(type(model))


@functools.cache
def _cache_argument(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """`{cache_argument(model): cache}`: pass a cache to `model(...)` or `model.generate(...)` on any
    transformers 5.x (`model(input_ids=ids, **with_cache(model, cache), use_cache=True)`)."""
    return {cache_argument(model): cache}
