"""The in-place growing cache layer: the entries of transformers' `DynamicLayer` at every step, without a copy of
the cache per appended token."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from headscore.core.kv_cache import RESERVE, GrowingLayer, growing_cache
from headscore.core.model import with_cache


def states(rows: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, tokens, 4, generator=generator), torch.randn(rows, 2, tokens, 5, generator=generator)


def test_growing_layer_holds_what_dynamic_layer_holds():
    """Appends, a crop, a row selection (with a repeated row), a reset: the same keys and values as a
    `DynamicLayer` after every operation; appends within the reserve write into the same buffer."""
    plain, growing = DynamicLayer(), GrowingLayer()

    def same() -> None:
        assert plain.get_seq_length() == growing.get_seq_length()
        assert torch.equal(plain.keys, growing.keys) and torch.equal(plain.values, growing.values)

    for layer in (plain, growing):
        layer.update(*states(3, 7, 0))
    same()
    buffer = growing.keys.data_ptr()
    for step in range(5):
        for layer in (plain, growing):
            out = layer.update(*states(3, 1, step + 1))
        assert torch.equal(out[0], plain.keys)
        same()
    assert growing.keys.data_ptr() == buffer  # no copy per step
    for layer in (plain, growing):
        layer.crop(-4)
        layer.update(*states(3, 2, 9))
    same()
    for layer in (plain, growing):
        layer.batch_select_indices(torch.tensor([2, 0, 0]))
        layer.update(*states(3, 1, 10))
    same()
    for layer in (plain, growing):
        layer.update(*states(3, RESERVE + 3, 11))  # past the reserve: a new buffer
    same()
    for layer in (plain, growing):
        layer.reset()
        layer.update(*states(1, 3, 12))
    same()


def test_growing_cache_decodes_like_dynamic_cache(tiny_llama):
    """A greedy decode on `growing_cache` gives bit-identical logits to one on a `DynamicCache`, through a row
    drop; its full-attention layers are `GrowingLayer`s."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    ids = torch.randint(3, 128, (3, 30), generator=torch.Generator().manual_seed(0))
    runs = []
    for cache in (DynamicCache(config=model.config), growing_cache(model.config)):
        logits, tokens = [], ids
        with torch.inference_mode():
            for step in range(8):
                if step == 4:
                    cache.batch_select_indices(torch.tensor([0, 2]))
                    tokens = tokens[[0, 2]]
                out = model(input_ids=tokens, **with_cache(model, cache), use_cache=True).logits[:, -1]
                logits.append(out)
                tokens = out.argmax(-1, keepdim=True)
        runs.append((logits, cache))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0], strict=True))
    assert all(type(layer) is GrowingLayer for layer in runs[1][1].layers)
    lazy = growing_cache()  # without a config, layers are made as they are first updated
    lazy.update(*states(1, 2, 0), 1)
    assert [type(layer) for layer in lazy.layers] == [GrowingLayer, GrowingLayer]
