"""Benchmark: a prompt's suffix run on cached tokens, with and without query blocks, side by side in one run.

    .venv/bin/python bench/bench_suffix.py [--length 4000] [--cached 1,2000] [--repeats 2] [--device cpu]

A shared-prefix run prefills a prompt's last tokens on a cache that already holds its first `cached` tokens.
Such a pass gets an explicit causal mask, and plain sdpa then scores every new query against every key, the
masked half of the new tokens' own square included; a fresh prefill (no mask, sdpa's causal flag) skips it.
On SmolLM2-135M (float32, random token ids, the estimate capture function, nothing armed):
  fresh           one pass over all `--length` tokens, no cache: the reference cost of those tokens
  suffix plain    `cached` tokens first, then the rest in one pass, sdpa over all queries at once
  suffix blocks   the same pass with headscore's `sdpa_forward` taking the queries in blocks of QUERY_BLOCK
Reported: seconds of the suffix pass (best of --repeats, interleaved), the ratio of blocks over plain, and the
suffix's share of the fresh pass's time; `max |d logits|` compares the blocked pass's last logits with the
plain one's.
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

    from headscore.core import attention
    from headscore.core.attention import use_attention
    from headscore.core.model import load_model
    from headscore.scoring.capture import CAPTURE_ATTENTION

    model, _ = load_model("smollm2-135m", device=args.device, dtype="float32")
    ids = torch.randint(100, 20000, (1, args.length), generator=torch.Generator().manual_seed(0)).to(args.device)
    blocks = attention.QUERY_BLOCK

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def timed_pass(cached: int, block: int) -> tuple[float, torch.Tensor]:
        attention.QUERY_BLOCK = block
        cache = DynamicCache(config=model.config)
        if cached:
            model(input_ids=ids[:, :cached], past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync()
        began = time.perf_counter()
        logits = model(input_ids=ids[:, cached:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        sync()
        return time.perf_counter() - began, logits

    cached_counts = [int(part) for part in args.cached.split(",")]
    with use_attention(model, CAPTURE_ATTENTION):
        timed_pass(0, blocks)  # warm-up
        best: dict[tuple[int, str], float] = {}
        difference: dict[int, float] = {}
        for _ in range(args.repeats):
            best[(0, "fresh")] = min(best.get((0, "fresh"), float("inf")), timed_pass(0, blocks)[0])
            for cached in cached_counts:
                plain, plain_logits = timed_pass(cached, args.length + 1)
                blocked, blocked_logits = timed_pass(cached, blocks)
                best[(cached, "plain")] = min(best.get((cached, "plain"), float("inf")), plain)
                best[(cached, "blocks")] = min(best.get((cached, "blocks"), float("inf")), blocked)
                difference[cached] = float((plain_logits - blocked_logits).abs().max())
    attention.QUERY_BLOCK = blocks
    fresh = best[(0, "fresh")]
    print(f"SmolLM2-135M float32, device {args.device}, {args.length} tokens, query block {blocks}, "
          f"best of {args.repeats}; fresh prefill of all {args.length} tokens: {fresh:.2f} s")
    print(f"{'cached':>8}{'suffix':>8}{'plain s':>10}{'blocks s':>10}{'x time':>9}{'plain/fresh':>13}"
          f"{'blocks/fresh':>14}{'max |d logits|':>16}")
    for cached in cached_counts:
        plain, blocked = best[(cached, "plain")], best[(cached, "blocks")]
        print(f"{cached:>8}{args.length - cached:>8}{plain:>10.2f}{blocked:>10.2f}{blocked / plain:>9.3f}"
              f"{plain / fresh:>13.3f}{blocked / fresh:>14.3f}{difference[cached]:>16.1e}")


if __name__ == "__main__":
    main()
