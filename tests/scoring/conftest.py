"""Fixtures of the estimate tests: real needle trials and a tiny model over SmolLM2's vocabulary."""

import pytest
import torch

VOCAB = 49152  # SmolLM2's tokenizer, so the tiny model can run real trials


@pytest.fixture(scope="module")
def trials():
    from headscore.scoring.trials import build_needle_trials

    return build_needle_trials("smollm2-135m", min_length=150, max_length=200, lengths=2, depths=2)


@pytest.fixture
def tiny(tiny_llama):
    """A tiny llama over SmolLM2's vocabulary with sharpened attention (so top-N choices are not near-ties)."""

    def make(attn_implementation: str = "sdpa"):
        model = tiny_llama(layers=2, heads=4, kv_heads=2, vocab=VOCAB, seed=7,
                           attn_implementation=attn_implementation)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(6.0)
        return model

    return make
