"""Benchmark of `headscore compress`: headkv at budget 128 vs the full cache, side by side in one run.

For each context length: KV bytes of the head-wise cache relative to the full cache (and to the share
Σ budgets / full entries that the budgets promise), per-token decode time relative to full, and prefill
time with selection relative to plain prefill. Measurements are interleaved in ABBA order (plain, selection,
selection, plain, ...) and the median is taken, so a busy machine hurts both sides alike.

    .venv/bin/python bench/bench_compress.py                      # SmolLM2, 1k 2k 4k 8k, CPU
    .venv/bin/python bench/bench_compress.py --lengths 1000 --repeats 3
    python bench/bench_compress.py --config-dir DIR --device cuda  # random weights of a config (GPU runs)

Targets (issue 5): KV bytes <= 1.05 x the budgets' share; selection overhead <= 5 % of prefill.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache


def load(args):
    from headscore.core.assets import quiet_transformers
    from headscore.core.model import load_model

    quiet_transformers()
    if not args.config_dir:
        model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
        return model
    from transformers import AutoConfig, AutoModelForCausalLM

    from headscore.core.model import resolve_dtype

    config = AutoConfig.from_pretrained(args.config_dir)
    torch.manual_seed(0)
    with torch.device(args.device):  # initialize on the device (large configs)
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(args.dtype, args.device),
                                                 attn_implementation="sdpa")
    return model.eval()


def synthetic_scores(geometry, seed: int = 0):
    """Skewed per-head scores (a few strong heads), the shape real head scores have."""
    from headscore.scoring.head_scores import HeadScores

    generator = torch.Generator().manual_seed(seed)
    strength = torch.rand(geometry.layers, geometry.query_heads, generator=generator) ** 4
    return HeadScores.from_tensor(strength[None] * torch.rand(5, 1, 1, generator=generator))


def main() -> None:
    from headscore.compression.generation import _forward, decode, prefill_compressed
    from headscore.compression.presses import make_press
    from headscore.core.model import Geometry, input_device
    from headscore.scoring.head_scores import read_head_scores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--config-dir", default=None, help="build random weights from this config instead")
    parser.add_argument("--lengths", default="1000,2000,4000,8000")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--beta", type=float, default=1.01)
    parser.add_argument("--scores", default=None, help="head-score file [default: synthetic skewed scores]")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved prefills per length")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load(args)
    geometry = Geometry.from_config(model.config)
    scores = read_head_scores(args.scores) if args.scores else synthetic_scores(geometry)
    press = make_press("headkv", geometry, budget=args.budget, beta=args.beta, scores=scores)
    device = input_device(model)
    warm = torch.randint(100, 1000, (1, 64), device=device)
    _forward(model, warm, DynamicCache(config=model.config))
    prefill_compressed(model, warm, press)
    print(f"model={args.model if not args.config_dir else args.config_dir} device={args.device} "
          f"dtype={next(model.parameters()).dtype} threads={torch.get_num_threads()} budget={args.budget} "
          f"beta={args.beta} scores={args.scores or 'synthetic'} repeats={args.repeats} "
          f"decode_tokens={args.decode_tokens}", flush=True)
    header = (f"{'context':>8} {'kv_bytes':>8} {'share':>7} {'bytes/share':>11} {'+index':>7} "
              f"{'decode_full_ms':>14} {'decode_hkv_ms':>13} {'decode_ratio':>12} {'prefill_s':>9} "
              f"{'select_s':>8} {'overhead':>8} {'selection_s':>11} {'sel/prefill':>11}")
    print(header, flush=True)
    generator = torch.Generator().manual_seed(0)
    for length in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(100, model.config.vocab_size - 100, (1, length), generator=generator).to(device)
        plain, select, selection = [], [], []
        for repeat in range(args.repeats):
            for which in ("plain", "select") if repeat % 2 == 0 else ("select", "plain"):  # ABBA order
                if which == "plain":
                    full_cache = DynamicCache(config=model.config)
                    logits_full, seconds = _forward(model, ids, full_cache)
                    plain.append(seconds)
                else:
                    cache, logits, seconds = prefill_compressed(model, ids, press)
                    select.append(seconds)
                    selection.append(cache.selection_seconds)
        # the same number of tokens on both caches (no EOS stop); the median step of each
        _, steps_full = decode(model, full_cache, logits_full, args.decode_tokens + 1)
        _, steps_hkv = decode(model, cache, logits, args.decode_tokens + 1)
        generated = cache.layers[0].generated
        full_bytes = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in full_cache.layers)
        share_entries = press.budgets_for(geometry).total_entries + geometry.layers * geometry.kv_heads * generated
        share = share_entries / (geometry.layers * geometry.kv_heads * (length + generated))
        ratio = cache.kv_bytes() / full_bytes
        with_index = (cache.kv_bytes() + cache.index_bytes()) / full_bytes
        d_full, d_hkv = statistics.median(steps_full), statistics.median(steps_hkv)
        p_plain, p_select = statistics.median(plain), statistics.median(select)
        print(f"{length:>8} {ratio:>8.4f} {share:>7.4f} {ratio / share:>11.3f} {with_index / share:>7.3f} "
              f"{d_full * 1e3:>14.1f} {d_hkv * 1e3:>13.1f} {d_hkv / d_full:>12.3f} {p_plain:>9.2f} "
              f"{p_select:>8.2f} {p_select / p_plain - 1:>+8.1%} {statistics.median(selection):>11.3f} "
              f"{statistics.median(selection) / p_plain:>11.1%}", flush=True)
        del full_cache, cache
    print(f"(kv_bytes = compressed / full KV bytes; share = Σ(budget + window) + generated over full entries; "
          f"+index adds the head index; overhead = prefill with selection / plain prefill − 1; "
          f"selection_s = time inside window scoring + selection, sel/prefill = selection_s / plain prefill; "
          f"{time.strftime('%Y-%m-%d %H:%M')})")


if __name__ == "__main__":
    main()
