"""Load a causal LM and its tokenizer; describe its attention geometry."""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import get_layer_types_and_kwargs

from headscore.core.assets import DEFAULT_MODEL, quiet_transformers, resolve_model
from headscore.core.errors import HeadscoreError
from headscore.core.families import FULL_ATTENTION, UNSUPPORTED_FAMILIES, UNSUPPORTED_REASON, WINDOWED_ATTENTION

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def text_config(config: Any) -> Any:
    """The decoder's config (a multimodal config's text part; the config itself otherwise)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def transformers_layer_types(text: Any) -> list[str]:
    """Each decoder layer's attention kind as transformers' caches infer it (`layer_types`, else from
    `sliding_window` / `attention_chunk_size`), without any check."""
    try:
        return list(get_layer_types_and_kwargs(text)[0])
    except (AttributeError, TypeError):
        return [FULL_ATTENTION] * text.num_hidden_layers


def all_sliding(config: Any) -> int | None:
    """The window of a model whose every layer is sliding-window attention (Mistral-7B-v0.1: 4096), else None.

    headscore runs such a model as full attention, which it is for a sequence that fits the window
    (`Geometry.check_fits` refuses longer ones): its caches are plain full-attention caches (`cache_config`)."""
    text = text_config(config)
    types = transformers_layer_types(text)
    window = getattr(text, "sliding_window", None)
    return int(window) if types and window and all(kind == "sliding_attention" for kind in types) else None


def cache_config(config: Any) -> Any:
    """The config to build a model's caches from: `config`, or None (every layer a plain full-attention layer)
    for a model whose every layer is sliding (`all_sliding`)."""
    return None if config is None or all_sliding(config) else config


def attention_layer_types(config: Any) -> list[str]:
    """Each decoder layer's attention kind (transformers' `layer_types`, inferred as its caches do), after
    checking the family is supported: an unsupported one (multi-head latent attention, linear-attention,
    state-space, recurrent or convolution layers) raises one HeadscoreError naming the family and the reason."""
    text = text_config(config)
    family = getattr(text, "model_type", None) or type(text).__name__
    kind = UNSUPPORTED_FAMILIES.get(family)
    if kind is None and getattr(text, "kv_lora_rank", None):
        kind = "multi-head latent attention"
    types = transformers_layer_types(text)
    other = sorted({t for t in types if t != FULL_ATTENTION and t not in WINDOWED_ATTENTION})
    if kind is None and other:
        kind = "linear-attention layers" if "linear_attention" in other else None
        if kind is None:
            raise HeadscoreError(f"model family '{family}' is not supported: its {', '.join(other)} layers keep "
                                 "no per-head token cache that headscore can select from")
    if kind is not None:
        raise HeadscoreError(f"model family '{family}' is not supported: {kind} ({UNSUPPORTED_REASON[kind]})")
    return types


@dataclass(frozen=True)
class Geometry:
    """Attention geometry: `layers` × `query_heads` query heads sharing `kv_heads` KV heads per layer.

    `layers` counts the layers headscore scores and compresses: the full-attention ones. In a hybrid model
    (sliding-window and full layers) `compressed_layers` lists their indices in the model (budgets and head
    scores row `i` is model layer `compressed_layers[i]`); None: every layer is full attention.
    `sliding_window`: set when every layer is sliding (`all_sliding`): headscore runs the model as full attention
    (every layer compressed), for sequences of at most that many tokens (`check_fits`).
    """

    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    max_context: int | None = None
    compressed_layers: tuple[int, ...] | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.compressed_layers is not None:
            object.__setattr__(self, "compressed_layers", tuple(int(i) for i in self.compressed_layers))

    @property
    def model_layers(self) -> tuple[int, ...]:
        """The model indices of the compressed layers (0 .. layers − 1 when every layer is full attention)."""
        return tuple(range(self.layers)) if self.compressed_layers is None else self.compressed_layers

    @property
    def grid(self) -> tuple[int, int, int]:
        """(layers, query heads, KV heads): what budgets and head scores must match."""
        return self.layers, self.query_heads, self.kv_heads

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.query_heads // self.kv_heads

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        if self.compressed_layers is None:
            del found["compressed_layers"]
        else:
            found["compressed_layers"] = list(self.compressed_layers)
        if self.sliding_window is None:
            del found["sliding_window"]
        return found

    @classmethod
    def from_dict(cls, data: Any) -> Geometry:
        """The inverse of `to_dict` (a missing `head_dim` reads as 0); KeyError, TypeError or ValueError on a
        malformed dict, for the caller to name its file."""
        return cls(layers=int(data["layers"]), query_heads=int(data["query_heads"]), kv_heads=int(data["kv_heads"]),
                   head_dim=int(data.get("head_dim") or 0), max_context=data.get("max_context"),
                   compressed_layers=data.get("compressed_layers"), sliding_window=data.get("sliding_window"))

    def describe(self, kv_heads: bool = True) -> str:
        """'30 layers × 9 query heads / 3 KV heads' (without the KV heads: `kv_heads=False`)."""
        text = f"{self.layers} layers × {self.query_heads} query heads"
        return text + (f" / {self.kv_heads} KV heads" if kv_heads else "")

    def check_fits(self, tokens: int, what: str = "the prompt and the new tokens") -> None:
        """A model whose every layer is sliding is full attention only for sequences within its window: `tokens`
        (the prompt and every token generated after it) beyond `sliding_window` is one HeadscoreError."""
        if self.sliding_window is not None and tokens > self.sliding_window:
            raise HeadscoreError(f"{what} ({tokens} tokens) exceed the model's sliding window of "
                                 f"{self.sliding_window} tokens (every layer attends within it; headscore scores "
                                 "and compresses it as full attention only within the window)")

    def check_matches(self, model: Geometry, what: str, *, kv_heads: bool = True) -> None:
        """The one geometry-mismatch error: `what` (budgets, head scores, ...) was made for this geometry and is
        used on a model of geometry `model`. `kv_heads=False` compares layers × query heads only (head scores
        know no KV heads)."""
        size = 3 if kv_heads else 2
        if self.grid[:size] != model.grid[:size]:
            raise HeadscoreError(f"{what} are for {self.describe(kv_heads)}, but the model has "
                                 f"{model.describe(kv_heads)}")

    @classmethod
    def from_config(cls, config: Any) -> Geometry:
        """The geometry of a model's config; an unsupported family or a model without any full-attention layer
        is a HeadscoreError (see `attention_layer_types`)."""
        types = attention_layer_types(config)
        sliding = all_sliding(config)
        config = text_config(config)
        full = tuple(i for i, kind in enumerate(types) if kind == FULL_ATTENTION or sliding)
        if not full:
            raise HeadscoreError(f"model family '{getattr(config, 'model_type', '?')}' has no full-attention "
                                 f"layer (its layers are {', '.join(sorted(set(types)))}): headscore scores and "
                                 "compresses full-attention layers only")
        query_heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or query_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // query_heads
        return cls(
            layers=len(full),
            query_heads=query_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            max_context=getattr(config, "max_position_embeddings", None),
            compressed_layers=None if len(full) == len(types) else full,
            sliding_window=sliding,
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


def split_revision(model: str) -> tuple[str, dict[str, str]]:
    """`org/name@REVISION` -> (`org/name`, {"revision": REVISION}): a hub model pinned to a commit, branch or
    tag (the authors pin Mistral-7B-Instruct-v0.2 to dca6e4b). An existing path is never split."""
    name, at, revision = model.rpartition("@")
    if not at or not name or not revision or Path(model).expanduser().exists():
        return model, {}
    return name, {"revision": revision}


def load_tokenizer(model: str = DEFAULT_MODEL):

    quiet_transformers()

    name, pin = split_revision(model)
    source = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(source, **pin)
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
    """Load `(model, tokenizer)` in eval mode. `model` is an alias, folder, .gguf file or hub id (`id@REVISION`
    pins a revision, `split_revision`).

    `device` `auto`: CUDA when available, else CPU (`resolve_device`). `device_map="auto"` spreads a large
    model over the available devices (accelerate).
    """

    quiet_transformers()
    device = resolve_device(device)
    name, pin = split_revision(model)
    source = resolve_model(name)
    config = read_config(model, source)
    Geometry.from_config(config)  # an unsupported family fails here, before any weights load
    tokenizer = load_tokenizer(model)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, device),
                              "attn_implementation": loadable_attention(config, attn_implementation), **pin}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        lm: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise HeadscoreError(f"cannot load model '{model}': {first_line(error)}") from error
    if not device_map:
        lm = lm.to(device)
    lm.eval()
    return lm, tokenizer


def input_device(model: Any) -> torch.device:
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
    return check_config(model, resolve_model(split_revision(model)[0]))


def read_config(model: str, source: Any) -> Any:
    """The config of `source` (what `resolve_model` gave for `model`); no weights are read."""
    try:
        _, pin = split_revision(model)
        return AutoConfig.from_pretrained(source, **pin)
    except (OSError, ValueError) as error:
        raise HeadscoreError(f"cannot load config of model '{model}': {first_line(error)}") from error


def check_config(model: str, source: Any) -> Geometry:
    """Check from the config alone that headscore can run the family: its Geometry."""
    return Geometry.from_config(read_config(model, source))


def loadable_attention(config: Any, attn_implementation: str) -> str:
    """`attn_implementation`, except `sdpa` for a family transformers runs without it (Gemma 2's soft-capped
    logits, gpt-oss's sinks): `eager` then. headscore's own attention functions (`core.attention`) replace
    either during its passes and compute those terms exactly."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if attn_implementation != "sdpa":
        return attn_implementation
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return attn_implementation
    return attn_implementation if getattr(model_class, "_supports_sdpa", True) else "eager"


def cache_argument(model: Any) -> str:
    """The name under which `model`'s forward and `generate` take a KV cache: `cache` from transformers 5.23 on
    (where `past_key_values` is deprecated, its removal announced for 5.40), `past_key_values` before."""
    return _cache_argument(type(model))  # type: ignore[arg-type]  # classes are hashable


@functools.cache
def _cache_argument(model_type: Any) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """`{cache_argument(model): cache}`: pass a cache to `model(...)` or `model.generate(...)` on any
    transformers 5.x (`model(input_ids=ids, **with_cache(model, cache), use_cache=True)`)."""
    return {cache_argument(model): cache}
