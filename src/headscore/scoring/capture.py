"""Attention capture: `capture_attention_forward` (registered through transformers' `AttentionInterface`)
computes every layer's output with sdpa, exactly as the `sdpa` implementation does, and, only while the
`AttentionCapture` attached to the layer's attention module is armed, also keeps the softmax rows of the last
few queries (`attention_rows`; eager attention's probabilities, with its mask, soft-cap and sinks). Memory per
capture is O(layers × heads × rows × context); the context × context attention matrix is never materialized.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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

    `layers`: the model indices of the layers to capture (an int n: layers 0 .. n − 1). While armed, each of
    them stores the attention rows of its last `rows` queries, [b, q_heads, rows, k]; other layers (e.g. the
    sliding-window layers of a hybrid model) run plain attention.
    """

    def __init__(self, layers: int | Sequence[int]) -> None:
        self.indices = tuple(range(layers)) if isinstance(layers, int) else tuple(int(i) for i in layers)
        self.layers = len(self.indices)
        self._slot = {layer: slot for slot, layer in enumerate(self.indices)}
        self.rows = 0
        self._store: list[torch.Tensor | None] = [None] * self.layers

    @property
    def armed(self) -> bool:
        return self.rows > 0

    def arm(self, rows: int) -> None:
        """Capture the last `rows` queries of every captured layer in the next forward pass."""
        self.rows = rows
        self._store = [None] * self.layers

    def record(self, module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
               scaling: float | None, softcap: float | None = None, sinks: torch.Tensor | None = None) -> None:
        """Keep the rows of one layer's call (eager attention's probabilities: mask, `softcap`, `sinks`)."""
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise HeadscoreError(f"attention module {type(module).__name__} has no layer_idx")
        slot = self._slot.get(int(layer))
        if slot is None:
            return
        q_len, k_len = query.shape[2], key.shape[2]
        rows = min(self.rows, q_len)
        mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4:
            mask = attention_mask[..., -rows:, :k_len]
        self._store[slot] = attention_rows(query[:, :, q_len - rows:], key, scaling, mask=mask,
                                           causal_offset=k_len - rows, softcap=softcap, sinks=sinks)

    def take(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The captured rows, [layers, b, q_heads, rows, k] on `device` (default: the first layer's), and
        disarm. A layer that reported nothing means the model does not call the attention interface: an error.
        """
        store, self._store, self.rows = self._store, [None] * self.layers, 0
        missing = [self.indices[slot] for slot, rows in enumerate(store) if rows is None]
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
            raise HeadscoreError(f"the captured layers see different context lengths {sorted(lengths)} (a "
                                 "sliding-window cache); positions would not line up: this model cannot be scored")
        target = found[0].device if device is None else torch.device(device)
        return torch.stack([rows.to(target) for rows in found])


CAPTURE_ATTRIBUTE = "headscore_capture"  # set on a model's attention modules while a capture is attached


def capture_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None,
                              scaling: float | None = None, dropout: float = 0.0,
                              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa attention (`core.attention.sdpa_forward`) plus row capture while the capture attached to `module`
    (by `attention_capture`) is armed."""
    output = sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    capture = getattr(module, CAPTURE_ATTRIBUTE, None)
    if capture is not None and capture.armed:
        capture.record(module, query, key, attention_mask, scaling, kwargs.get("softcap"), kwargs.get("s_aux"))
    return output


AttentionInterface.register(CAPTURE_ATTENTION, capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


@contextmanager
def attention_capture(model: Any, layers: int | Sequence[int]) -> Iterator[AttentionCapture]:
    """The model runs the capture attention function inside the block, and the yielded capture is attached to
    its attention modules (the modules with a `layer_idx`; detached on exit); arm it to record `layers`
    (model indices, or an int n for the first n)."""
    capture = AttentionCapture(layers)
    modules = [module for module in model.modules() if getattr(module, "layer_idx", None) is not None]
    if any(getattr(module, CAPTURE_ATTRIBUTE, None) is not None for module in modules):
        raise HeadscoreError("this model already has an attention capture attached (nested captures)")
    with use_attention(model, CAPTURE_ATTENTION):
        for module in modules:
            setattr(module, CAPTURE_ATTRIBUTE, capture)
        try:
            yield capture
        finally:
            for module in modules:
                delattr(module, CAPTURE_ATTRIBUTE)
