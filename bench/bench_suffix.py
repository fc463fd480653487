"""Benchmark: a prompt's suffix run on cached tokens, transformers' sdpa against headscore's, side by side.

    .venv/bin/python bench/bench_suffix.py [--length 4000] [--cached 1,2000] [--repeats 2] [--device cpu]

A shared-prefix run prefills a prompt's last tokens on a cache that already holds its first `cached` tokens.
Such a pass gets an explicit causal mask, and plain sdpa then scores every new query against every key, the
masked half of the new tokens' own square included; a fresh prefill (no mask, sdpa's causal flag) skips it.
On SmolLM2-135M (float32, random token ids):
  fresh           one pass over all `--length` tokens, no cache: the reference cost of those tokens
  plain           `cached` tokens first, then the rest in one pass, transformers' `sdpa` attention
  headscore       the same pass with the estimate capture function (`core.attention.sdpa_forward`, nothing
                  armed) and the caller's `CAUSAL_SUFFIX` flag: the suffix attends in two unmasked calls
                  (`causal_suffix_attention`); transformers' sdpa ignores the flag
Reported: seconds of the suffix pass (best of --repeats, interleaved), the ratio headscore / plain, each over
the fresh pass's time; `max |d logits|` compares the two passes' last logits.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--cached", default="1,2000", help="cached tokens before the suffix, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    from transformers import DynamicCache

    from headscore.core.attention import CAUSAL_SUFFIX, use_attention
    from headscore.core.model import load_model, with_cache
    from headscore.scoring.capture import CAPTURE_ATTENTION

    model, _ = load_model("smollm2-135m", device=args.device, dtype="float32")
    ids = torch.randint(100, 20000, (1, args.length), generator=torch.Generator().manual_seed(0)).to(args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def timed_pass(cached: int, implementation: str) -> tuple[float, torch.Tensor]:
        with use_attention(model, implementation):
            cache = DynamicCache(config=model.config)
            if cached:
                model(input_ids=ids[:, :cached], **with_cache(model, cache), use_cache=True, logits_to_keep=1)
            sync()
            began = time.perf_counter()
            logits = model(input_ids=ids[:, cached:], **with_cache(model, cache), use_cache=True,
                           logits_to_keep=1, **(CAUSAL_SUFFIX if cached else {})).logits
            sync()
        return time.perf_counter() - began, logits

    cached_counts = [int(part) for part in args.cached.split(",")]
    timed_pass(0, "sdpa")  # warm-up
    best: dict[tuple[int, str], float] = {}
    difference: dict[int, float] = {}
    for _ in range(args.repeats):
        best[(0, "fresh")] = min(best.get((0, "fresh"), float("inf")), timed_pass(0, "sdpa")[0])
        for cached in cached_counts:
            plain, plain_logits = timed_pass(cached, "sdpa")
            ours, our_logits = timed_pass(cached, CAPTURE_ATTENTION)
            best[(cached, "plain")] = min(best.get((cached, "plain"), float("inf")), plain)
            best[(cached, "headscore")] = min(best.get((cached, "headscore"), float("inf")), ours)
            difference[cached] = float((plain_logits - our_logits).abs().max())
    fresh = best[(0, "fresh")]
    print(f"SmolLM2-135M float32, device {args.device}, {args.length} tokens, best of {args.repeats}; "
          f"fresh prefill of all {args.length} tokens: {fresh:.2f} s")
    print(f"{'cached':>8}{'suffix':>8}{'plain s':>10}{'headscore s':>13}{'x time':>9}{'plain/fresh':>13}"
          f"{'headscore/fresh':>17}{'max |d logits|':>16}")
    for cached in cached_counts:
        plain, ours = best[(cached, "plain")], best[(cached, "headscore")]
        print(f"{cached:>8}{args.length - cached:>8}{plain:>10.2f}{ours:>13.2f}{ours / plain:>9.3f}"
              f"{plain / fresh:>13.3f}{ours / fresh:>17.3f}{difference[cached]:>16.1e}")


if __name__ == "__main__":
    main()
