"""Attention capture: `capture_attention_forward` (registered through transformers' `AttentionInterface`)
computes every layer's output with sdpa, exactly as the `sdpa` implementation does, and, only while an
`AttentionCapture` is armed, also keeps the softmax rows of the last few queries (`attention_rows`). Memory per
capture is O(layers × heads × rows × context); the context × context attention matrix is never materialized.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headscore.core.attention import attention_rows, sdpa_forward, use_attention
from headscore.core.errors import HeadscoreError

CAPTURE_ATTENTION = "headscore_capture"


class AttentionCapture:
    """Rows captured in one forward pass: arm it with `arm(rows)`, run the model, read them with `take()`.

    While armed, every layer stores the attention rows of its last `rows` queries, [b, q_heads, rows, k].
    """

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.rows = 0
        self._store: list[torch.Tensor | None] = [None] * layers

    @property
    def armed(self) -> bool:
        return self.rows > 0

    def arm(self, rows: int) -> None:
        """Capture the last `rows` queries of every layer in the next forward pass."""
        self.rows = rows
        self._store = [None] * self.layers

    def record(self, module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
               scaling: float | None) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer is None or not 0 <= layer < self.layers:
            raise HeadscoreError(f"attention module {type(module).__name__} has no usable layer_idx "
                                 f"({layer!r})")
        q_len, k_len = query.shape[2], key.shape[2]
        rows = min(self.rows, q_len)
        mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4:
            mask = attention_mask[..., -rows:, :k_len]
        self._store[layer] = attention_rows(query[:, :, q_len - rows:], key, scaling, mask=mask,
                                            causal_offset=k_len - rows)

    def take(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The captured rows, [layers, b, q_heads, rows, k] on `device` (default: layer 0's), and disarm.

        A layer that reported nothing means the model does not call the attention interface: an error.
        """
        store, self._store, self.rows = self._store, [None] * self.layers, 0
        missing = [layer for layer, rows in enumerate(store) if rows is None]
        if missing:
            if len(missing) == self.layers:
                raise HeadscoreError("the model's attention does not go through transformers' "
                                     "AttentionInterface (no layer called the registered capture function); "
                                     "this model type cannot be scored")
            raise HeadscoreError(f"layers {missing[:8]} did not call the registered attention function "
                                 "(not standard attention layers); this model type cannot be scored")
        found = [rows for rows in store if rows is not None]  # every layer's, checked above
        lengths = {rows.shape[-1] for rows in found}
        if len(lengths) > 1:
            raise HeadscoreError(f"layers see different context lengths {sorted(lengths)} (a sliding-window "
                                 "or hybrid cache); positions would not line up: this model cannot be scored")
        target = found[0].device if device is None else torch.device(device)
        return torch.stack([rows.to(target) for rows in found])


_ACTIVE: list[AttentionCapture] = []


def capture_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None,
                              scaling: float | None = None, dropout: float = 0.0,
                              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa attention (`core.attention.sdpa_forward`) plus row capture while a capture is armed."""
    output = sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if _ACTIVE and _ACTIVE[-1].armed:
        _ACTIVE[-1].record(module, query, key, attention_mask, scaling)
    return output


AttentionInterface.register(CAPTURE_ATTENTION, capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


@contextmanager
def attention_capture(model: Any, layers: int) -> Iterator[AttentionCapture]:
    """The model runs the capture attention function inside the block; arm the yielded capture to record."""
    capture = AttentionCapture(layers)
    with use_attention(model, CAPTURE_ATTENTION):
        _ACTIVE.append(capture)
        try:
            yield capture
        finally:
            _ACTIVE.remove(capture)
