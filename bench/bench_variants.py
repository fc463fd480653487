"""Benchmark: what soft-capping and sinks cost at prefill, side by side with plain sdpa.

    .venv/bin/python bench/bench_variants.py [--lengths 1000,4000] [--heads 9] [--kv-heads 3] [--repeats 3]

sdpa cannot express soft-capped logits (Gemma 2) or learned sinks (gpt-oss), so `core.attention.sdpa_forward`
computes them with `blocked_attention` (exact float32 math by blocks of queries, at most 2^24 logits alive).
One causal attention call of `length` queries over `length` keys, SmolLM2's head shape (head_dim 64), random
float32 states, CPU:
  sdpa        torch's scaled_dot_product_attention with the causal flag (what a plain family gets)
  softcap     blocked_attention with softcap=50 (Gemma 2's value)
  sinks       blocked_attention with one sink logit per head
  eager       the whole masked logits matrix at once, as transformers' eager attention computes it
Reported: seconds (best of --repeats, interleaved) and each over sdpa's; `max |d|` checks softcap=None,
sinks=None blocked_attention against sdpa.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1000,4000")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from headscore.core.attention import blocked_attention

    def eager(query, key, value):
        groups = query.shape[1] // key.shape[1]
        logits = query @ repeat_kv(key, groups).transpose(-1, -2) * query.shape[-1] ** -0.5
        causal = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        return probs @ repeat_kv(value, groups)

    print(f"{'tokens':>7} {'sdpa s':>8} {'softcap s':>10} {'x sdpa':>7} {'sinks s':>8} {'x sdpa':>7} "
          f"{'eager s':>8} {'x sdpa':>7} {'max |d|':>9}")
    for length in (int(v) for v in args.lengths.split(",")):
        generator = torch.Generator().manual_seed(0)
        query = torch.randn(1, args.heads, length, 64, generator=generator)
        key = torch.randn(1, args.kv_heads, length, 64, generator=generator)
        value = torch.randn(1, args.kv_heads, length, 64, generator=generator)
        sinks = torch.randn(args.heads, generator=generator)
        runs = {
            "sdpa": lambda q, k, v, s: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                      enable_gqa=True),
            "softcap": lambda q, k, v, s: blocked_attention(q, k, v, softcap=50.0),
            "sinks": lambda q, k, v, s: blocked_attention(q, k, v, sinks=s),
            "eager": lambda q, k, v, s: eager(q, k, v),
        }
        states = (query, key, value, sinks)
        best = dict.fromkeys(runs, float("inf"))
        with torch.inference_mode():
            for _ in range(args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(*states)
                    best[name] = min(best[name], time.perf_counter() - start)
            plain = blocked_attention(query, key, value).transpose(1, 2)
            error = float((plain - runs["sdpa"](*states)).abs().max())
        base = best["sdpa"]
        print(f"{length:>7} {base:>8.3f} {best['softcap']:>10.3f} {best['softcap'] / base:>7.2f} "
              f"{best['sinks']:>8.3f} {best['sinks'] / base:>7.2f} {best['eager']:>8.3f} "
              f"{best['eager'] / base:>7.2f} {error:>9.1e}")


if __name__ == "__main__":
    main()
