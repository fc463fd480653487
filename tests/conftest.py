"""Shared fixtures: tiny randomly initialised models built in the test, and the real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"  # committed fixtures derived from the authors' files
# The authors' full files: ../shared/reference beside the clone, or $HEADSCORE_REFERENCE. A user's clone never
# has them; tests that take `reference_dir` are extras, deselected (not skipped) when the folder is absent.
REFERENCE = Path(os.environ.get("HEADSCORE_REFERENCE") or Path(__file__).resolve().parents[2] / "shared"
                 / "reference")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data: the fixtures derived from the authors' files (provenance in tests/data/README.md)."""
    return DATA


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The authors' full files (only tests that run where the folder exists ever get this)."""
    return REFERENCE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the authors' full files, the extra checks against them are deselected: nothing skips."""
    if REFERENCE.is_dir():
        return
    extras = [item for item in items if "reference_dir" in getattr(item, "fixturenames", ())]
    if extras:
        config.hook.pytest_deselected(items=extras)
        items[:] = [item for item in items if item not in extras]


@pytest.fixture
def tiny_llama():
    """Factory for a tiny random LlamaForCausalLM (GQA 4 query heads / 2 KV heads by default), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8, vocab: int = 128,
             seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=4 * heads * head_dim,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             head_dim=head_dim, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0, attn_implementation=attn_implementation, **overrides)
        return LlamaForCausalLM(config).eval()

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real default model and tokenizer (converted from the GGUF once, then cached)."""
    from headscore.core.model import load_model

    return load_model("smollm2-135m")
