"""Prefix sharing: prompts that begin with the same tokens (needle trials and tasks cut from one haystack) reuse
one KV cache of their common beginning instead of prefilling it again.

- `plan_prefixes(sequences)` decides, from the token ids alone, how many leading tokens of each prompt come
  from the shared cache (its *shared length*: the longest common prefix with any other prompt of the set,
  capped) and the order to run them in (by shared prefix, shorter first, so the cache only grows along one
  haystack and each shared token is prefilled once);
- `PrefixCache.reuse(ids, shared)` hands out a `DynamicCache` holding `ids[:shared]`: it crops its cache to
  the tokens the new prompt has in common with the cached ids (compared token by token: prompts from another
  haystack, template or tokenizer share nothing), prefills the missing part in chunks, and after the caller has
  run the prompt's suffix on it, crops it back to `shared` (the prefix entries are never modified: a layer's
  keys and values of earlier positions do not depend on later tokens);
- a prompt's suffix runs in one pass on the cache; its caller passes `core.attention.CAUSAL_SUFFIX`, so its
  attention (`headscore.core.attention.sdpa_forward`) computes none of the masked half of the suffix's own
  causal square (`causal_suffix_attention`, `bench/bench_suffix.py`).

Deterministic: a prefix is prefilled in passes that end at multiples of `chunk` and where it meets another
planned prefix (where the two part, or where the other ends inside it; `pass_ends`), and the cache is only
cropped back to such an end, so every cached position is computed by the same forward pass whatever ran
before; with shared lengths planned over a whole trial file, a trial's result does not depend on which other
trials a run (a shard, `--limit`, a resumed run) holds. The ends are those of each prefix's own path: a
haystack's insertion points do not split the passes of a prefix that parted from it earlier.

Memory: the cache is one full KV of the longest shared length in use (at most the longest prompt minus its
suffix, or `max_tokens`); a prompt's suffix runs on that same cache, so a run holds no more KV than running the
longest prompt alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from headscore.core.attention import CAUSAL_SUFFIX
from headscore.core.errors import HeadscoreError
from headscore.core.model import cache_config, input_device, with_cache

CHUNK = 1024  # tokens per prefill pass of a shared prefix (bounds activation memory like a plain prefill)


@dataclass(frozen=True)
class PrefixOptions:
    """Prefix sharing settings: `enabled`; `max_tokens` caps the cached prefix (None: the longest shared
    length of the set); `chunk`: tokens per prefill pass of the prefix."""

    enabled: bool = True
    max_tokens: int | None = None
    chunk: int = CHUNK

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise HeadscoreError("--prefix-max-tokens must be at least 1")
        if self.chunk < 1:
            raise HeadscoreError("the prefix chunk size must be at least 1")

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "max_tokens": self.max_tokens}

    def for_model(self, model: Any) -> PrefixOptions:
        """These options, turned off for a model whose cache cannot be cropped back to a prefix (sliding-window
        or recurrent layers: such models run every prompt whole)."""
        return self if not self.enabled or croppable(model) else replace(self, enabled=False)


def croppable(model: Any) -> bool:
    """Whether every layer of the model's `DynamicCache` is plain full attention (can be cropped to a prefix)."""
    layers: list[Any] = DynamicCache(config=cache_config(model.config)).layers
    return all(layer.is_croppable and not layer.is_sliding for layer in layers)


@dataclass(frozen=True)
class PrefixPlan:
    """`order`: positions into the planned sequences, in the order to run them; `shared[i]`: leading tokens of
    sequence `i` taken from the prefix cache (0: none); `prefixes`: the distinct shared prefixes (1-D ids, in
    run order), which fix where the prefix prefill's passes end (`pass_ends`)."""

    order: list[int]
    shared: list[int]
    prefixes: list[torch.Tensor]


def common_prefix_length(first: torch.Tensor, second: torch.Tensor) -> int:
    """Number of leading positions where two 1-D id tensors agree."""
    return int(prefix_lengths(first.cpu(), second.cpu()[None])[0])


def prefix_lengths(prefix: torch.Tensor, planned: torch.Tensor) -> torch.Tensor:
    """Common prefix length of 1-D `prefix` with each row of `planned` [n, width] (`stack_prefixes`): [n]."""
    width = min(prefix.shape[0], planned.shape[1])
    return (planned[:, :width] == prefix[None, :width]).int().cumprod(1).sum(1)


def stack_prefixes(prefixes: Sequence[torch.Tensor]) -> torch.Tensor:
    """1-D id tensors as one [n, longest] matrix, padded with -1 (no token id): `pass_ends`'s `planned`."""
    if not prefixes:
        return torch.empty(0, 0, dtype=torch.long)
    return pad_sequence([prefix.cpu() for prefix in prefixes], batch_first=True, padding_value=-1)


def plan_prefixes(sequences: Sequence[torch.Tensor], *, min_suffix: int = 1,
                  max_tokens: int | None = None) -> PrefixPlan:
    """Shared lengths and run order for 1-D token id tensors.

    A sequence's shared length is its longest common prefix with any other sequence (the neighbours in
    lexicographic order of the ids), capped so that at least `min_suffix` of its tokens remain to run and at
    `max_tokens`. The order sorts by the shared prefix's ids (a prefix before its extensions: along one
    haystack, shallower insertion points first), then by the whole ids and position: a depth-first walk of the
    prefix tree, so every shared token is prefilled once.
    """
    lists = [seq.tolist() for seq in sequences]
    lexicographic = sorted(range(len(lists)), key=lambda i: (lists[i], i))
    neighbours = [common_prefix_length(sequences[a], sequences[b])
                  for a, b in zip(lexicographic, lexicographic[1:], strict=False)]
    longest = [0] * len(lists)
    for rank, position in enumerate(lexicographic):
        before = neighbours[rank - 1] if rank > 0 else 0
        after = neighbours[rank] if rank < len(neighbours) else 0
        longest[position] = max(before, after)
    cap = max_tokens if max_tokens is not None else max((len(ids) for ids in lists), default=0)
    shared = [max(0, min(longest[i], len(lists[i]) - min_suffix, cap)) for i in range(len(lists))]
    order = sorted(range(len(lists)), key=lambda i: (lists[i][:shared[i]], lists[i], i))
    distinct = {tuple(lists[i][:shared[i]]): i for i in order if shared[i]}
    return PrefixPlan(order=order, shared=shared,
                      prefixes=[sequences[i][:shared[i]].cpu() for i in distinct.values()])


def pass_ends(prefix: torch.Tensor, planned: torch.Tensor, chunk: int = CHUNK) -> list[int]:
    """Where the passes that prefill 1-D `prefix` end, ascending, the last at its length: every multiple of
    `chunk`, and every point where `prefix` meets a planned prefix (`planned` [n, width], `stack_prefixes`): where
    the two part, or where the planned one ends inside it.

    The ends below a position depend only on the ids up to it, so two prefixes that agree on their first k
    tokens prefill them in the same passes, and a cache can be cropped to any point where two planned
    prefixes part without recomputing a token (and gets bit-identical entries whatever ran before)."""
    length = prefix.shape[0]
    return sorted({*prefix_lengths(prefix, planned).tolist(), *range(chunk, length, chunk), length} - {0})


@torch.no_grad()
def extend_cache(model: Any, cache: DynamicCache, ids: torch.Tensor, start: int, ends: Sequence[int]) -> None:
    """Run `ids[start:]` (1-D ids) on `cache`, which holds `ids[:start]`, in passes ending at each of `ends`
    (strictly ascending) after `start`, the last pass at the end of `ids`."""
    device = input_device(model)
    position, stop = start, ids.shape[0]
    for end in [*(end for end in ends if start < end < stop), stop] if start < stop else []:
        model(input_ids=ids[None, position:end].to(device), **with_cache(model, cache), use_cache=True,
              logits_to_keep=1, **(CAUSAL_SUFFIX if position > 0 else {}))
        position = end


class PrefixCache:
    """One `DynamicCache` of the last shared prefix used, handed out by `reuse` (batch size 1).

    `prefixes`: the plan's shared prefixes (`PrefixPlan.prefixes`); a prefix is prefilled in passes that end
    where it meets them and at multiples of `chunk` (`pass_ends`), and the cache is only ever cropped to such
    an end, so no shared token is computed twice and the cached entries do not depend on what ran before.
    `prefilled` and `reused` count the prefix tokens computed and taken from the cache.
    """

    def __init__(self, model: Any, prefixes: Sequence[torch.Tensor] = (), chunk: int = CHUNK) -> None:
        self.model = model
        self.chunk = chunk
        self.planned = stack_prefixes(prefixes)
        self.cache: DynamicCache | None = None
        self.ids = torch.empty(0, dtype=torch.long)
        self.prefilled = 0
        self.reused = 0

    def _drop(self) -> None:
        self.cache, self.ids = None, torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def _prepare(self, ids: torch.Tensor) -> DynamicCache:
        """The cache cropped to what it shares with `ids` (at a pass end), then extended to all of `ids`."""
        ends = pass_ends(ids, self.planned, self.chunk)
        common = common_prefix_length(self.ids, ids)
        keep = max((end for end in ends if end <= common), default=0)
        if self.cache is None or keep == 0:
            if not croppable(self.model):
                raise HeadscoreError("prefix sharing needs full-attention cache layers; this model has "
                                     "sliding-window or recurrent layers")
            self.cache, keep = DynamicCache(config=cache_config(self.model.config)), 0
        else:
            self.cache.crop(keep - self.cache.get_seq_length())
        extend_cache(self.model, self.cache, ids, keep, ends)
        self.ids = ids.clone()
        self.prefilled += ids.shape[0] - keep
        self.reused += keep
        return self.cache

    @contextmanager
    def reuse(self, ids: torch.Tensor, shared: int) -> Iterator[tuple[DynamicCache | None, int]]:
        """`(cache, shared)`: a cache holding `ids[:shared]` (1-D ids), on which the caller runs `ids[shared:]`.

        `shared == 0` yields `(None, 0)`: run the whole prompt as usual. On exit the cache is cropped back to
        the prefix (on an exception it is dropped). Run the prefix with the same attention implementation as
        the suffix (sdpa-equivalent functions only).
        """
        if shared <= 0:
            yield None, 0
            return
        try:
            cache = self._prepare(ids[:shared].cpu())
            yield cache, shared
        except BaseException:
            self._drop()
            raise
        extra = cache.get_seq_length() - shared
        if extra > 0:
            cache.crop(-extra)


def shared_prefix(prefixes: PrefixCache | None, ids: torch.Tensor, shared: int
                  ) -> AbstractContextManager[tuple[DynamicCache | None, int]]:
    """`prefixes.reuse(ids, shared)`, or `(None, 0)` (no sharing) when `prefixes` is None."""
    return prefixes.reuse(ids, shared) if prefixes is not None else nullcontext((None, 0))
