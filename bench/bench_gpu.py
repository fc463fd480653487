"""The GPU cost table: random weights on the Llama-3-8B geometry, ours vs the plain alternative side by side.

    python bench/bench_gpu.py --device cuda                      # Llama-3-8B geometry, bfloat16 (an 80 GB GPU)
    python bench/bench_gpu.py --geometry tiny --device cpu       # tiny geometry: exercises every code path
    python bench/bench_gpu.py --device cuda --only prefill --prefill-lengths 1000,2000

Four parts, each printing ratios measured in one process, interleaved in ABBA order (median of --repeats):
  estimate  one decode-mode trial (capture + r2 scores over a 24-token answer span, forced tokens) vs plain
            `generate` of the same number of tokens, at --estimate-lengths (default 8k, 32k)
  prefill   prefill with headkv selection (budget 128) vs plain prefill, and the selection's own time over the
            plain prefill, at --prefill-lengths (default 1k-32k)
  decode    decode per token on the headkv@128 cache vs the full cache, at --decode-lengths (8k, 32k, 128k);
            on CUDA with both decode-attention kernels (bucketed matmuls and compiled flex_attention)
  memory    peak GPU memory during prefill above the loaded model, headkv vs full cache (the head-wise cache
            compresses each layer right after its attention, so the full KV of all layers never coexists);
            measured in the prefill part (CUDA only: '-' on CPU)
Random weights: the timings and memory depend on the geometry and the kernels, not on what the weights say.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from bench_compress import synthetic_scores
from headscore.compression.generation import _forward, decode, prefill_compressed
from headscore.compression.presses import make_press
from headscore.core.model import Geometry, resolve_dtype
from headscore.scoring.capture import attention_capture
from headscore.scoring.estimate import decode_trial

GEOMETRIES = {
    # Meta-Llama-3-8B(-Instruct): 32 layers, 32 query heads sharing 8 KV heads of 128 dims
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1000, max_position_embeddings=131072),
}
ANSWER_TOKENS = 24  # scored decoding steps per estimate trial (a typical needle answer)


def build(geometry: str, device: str, dtype: str | None) -> LlamaForCausalLM:
    config = LlamaConfig(**GEOMETRIES[geometry], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device (8B weights)
        model = LlamaForCausalLM._from_config(config, dtype=resolve_dtype(dtype, device),
                                              attn_implementation="sdpa")
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run: Callable[[], object]) -> tuple[object, float, float | None]:
    """(result, seconds, peak memory rise in MiB above what was allocated before, None on CPU) of one call."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    began = time.perf_counter()
    result = run()
    sync(device)
    seconds = time.perf_counter() - began
    rise = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    return result, seconds, rise


def abba(device: torch.device, repeats: int, first: Callable[[], object], second: Callable[[], object]
         ) -> tuple[list[tuple[object, float, float | None]], list[tuple[object, float, float | None]]]:
    """`timed` runs of `first` and `second` in ABBA order (a busy machine hurts both sides alike)."""
    a, b = [], []
    for repeat in range(repeats):
        for which in ("a", "b") if repeat % 2 == 0 else ("b", "a"):
            (a if which == "a" else b).append(timed(device, first if which == "a" else second))
    return a, b


def median(runs: list[tuple[object, float, float | None]], index: int) -> float | None:
    values = [run[index] for run in runs]
    return None if values[0] is None else statistics.median(values)


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def ratio(ours: float | None, plain: float | None) -> str:
    return "-" if ours is None or plain is None else f"{ours / plain:.3f}"


def estimate_row(model, length: int, repeats: int, device: torch.device, generator: torch.Generator) -> str:
    """One trial of `length` random tokens: plain generate vs decode-mode estimate, same number of steps."""
    vocab, layers = model.config.vocab_size, model.config.num_hidden_layers
    ids = torch.randint(100, vocab - 100, (length,), generator=generator)
    forced = torch.randint(100, vocab - 100, (ANSWER_TOKENS,), generator=generator)
    span = (length // 2, length // 2 + ANSWER_TOKENS)
    inputs = ids[None].to(device)

    def plain() -> object:
        return model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=ANSWER_TOKENS,
                              min_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=0)

    def ours() -> object:
        with attention_capture(model, layers) as capture:
            return decode_trial(model, None, ids, span, capture, "r2", ANSWER_TOKENS, forced=forced)

    with torch.no_grad():
        a, b = abba(device, repeats, plain, ours)
    t_plain, t_ours = median(a, 1), median(b, 1)
    m_plain, m_ours = median(a, 2), median(b, 2)
    return (f"{length:>8} {t_plain:>10.3f} {t_ours:>10.3f} {t_ours / t_plain:>7.3f} {mib(m_plain):>12} "
            f"{mib(m_ours):>12} {ratio(m_ours, m_plain):>6}")


def part_estimate(model, lengths, repeats, device) -> None:
    print(f"\n[estimate] one decode-mode trial ({ANSWER_TOKENS} scored steps) vs plain generate "
          f"({ANSWER_TOKENS} new tokens); peak memory above the model")
    print(f"{'context':>8} {'generate_s':>10} {'estimate_s':>10} {'x time':>7} {'generate_MiB':>12} "
          f"{'estimate_MiB':>12} {'x mem':>6}", flush=True)
    generator = torch.Generator().manual_seed(1)
    for length in lengths:
        print(estimate_row(model, length, repeats, device, generator), flush=True)


def prefill_row(model, press, length: int, repeats: int, device: torch.device, generator: torch.Generator) -> str:
    """Plain prefill vs prefill with selection on `length` random tokens: time, selection time, peak memory."""
    ids = torch.randint(100, model.config.vocab_size - 100, (1, length), generator=generator).to(device)
    a, b = abba(device, repeats, lambda: _forward(model, ids, DynamicCache(config=model.config)),
                lambda: prefill_compressed(model, ids, press))
    t_plain, t_ours = median(a, 1), median(b, 1)
    chosen = statistics.median(run[0][0].selection_seconds for run in b)
    m_plain, m_ours = median(a, 2), median(b, 2)
    return (f"{length:>8} {t_plain:>8.3f} {t_ours:>8.3f} {t_ours / t_plain - 1:>+8.1%} {chosen:>11.4f} "
            f"{chosen / t_plain:>11.1%} {mib(m_plain):>9} {mib(m_ours):>10} {ratio(m_ours, m_plain):>6}")


def part_prefill(model, press, lengths, repeats, device) -> None:
    print("\n[prefill] headkv selection vs plain prefill; peak memory during prefill above the model")
    print(f"{'context':>8} {'plain_s':>8} {'select_s':>8} {'overhead':>8} {'selection_s':>11} {'sel/prefill':>11} "
          f"{'full_MiB':>9} {'headkv_MiB':>10} {'x mem':>6}", flush=True)
    generator = torch.Generator().manual_seed(2)
    for length in lengths:
        print(prefill_row(model, press, length, repeats, device, generator), flush=True)


def part_decode(model, press, lengths, tokens, device) -> None:
    """Per-token decode on the full cache and on the headkv cache, with each prompt-part kernel of the decode
    attention (`HEADSCORE_DECODE_KERNEL`: the bucketed matmuls, and on CUDA the compiled flex_attention)."""
    kernels = ("buckets", "flex") if device.type == "cuda" else ("buckets",)
    print(f"\n[decode] per token, median of {tokens} steps: headkv@128 cache ({', '.join(kernels)} kernel) vs "
          "full cache")
    print(f"{'context':>8} {'full_ms':>8}" + "".join(f" {k + '_ms':>10} {'ratio':>6}" for k in kernels), flush=True)
    generator = torch.Generator().manual_seed(3)
    for length in lengths:
        ids = torch.randint(100, model.config.vocab_size - 100, (1, length), generator=generator).to(device)
        cache = DynamicCache(config=model.config)
        logits, _ = _forward(model, ids, cache)
        _, steps_full = decode(model, cache, logits, tokens + 1)
        del cache
        full = statistics.median(steps_full)
        line = f"{length:>8} {full * 1e3:>8.2f}"
        for kernel in kernels:
            os.environ["HEADSCORE_DECODE_KERNEL"] = kernel
            cache, logits, _ = prefill_compressed(model, ids, press)
            decode(model, cache, logits, 3)  # warm-up (flex compiles here)
            cache, logits, _ = prefill_compressed(model, ids, press)
            _, steps = decode(model, cache, logits, tokens + 1)
            del cache
            ours = statistics.median(steps)
            line += f" {ours * 1e3:>10.2f} {ours / full:>6.3f}"
        os.environ.pop("HEADSCORE_DECODE_KERNEL")
        print(line, flush=True)


def numbers(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=GEOMETRIES, default="llama3-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="[default: bfloat16 on CUDA, float32 on CPU]")
    parser.add_argument("--only", default="estimate,prefill,decode", help="parts to run, comma-separated")
    parser.add_argument("--estimate-lengths", default="8000,32000")
    parser.add_argument("--prefill-lengths", default="1000,2000,4000,8000,16000,32000")
    parser.add_argument("--decode-lengths", default="8000,32000,128000")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    model = build(args.geometry, args.device, args.dtype)
    geometry = Geometry.from_config(model.config)
    press = make_press("headkv", geometry, budget=args.budget, beta=1.01, scores=synthetic_scores(geometry))
    device = torch.device(args.device)
    warm = torch.randint(100, 1000, (1, 64), device=device)
    _forward(model, warm, DynamicCache(config=model.config))
    prefill_compressed(model, warm, press)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"geometry={args.geometry} device={args.device} ({name}) dtype={model.dtype} budget={args.budget} "
          f"repeats={args.repeats} torch={torch.__version__} {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    parts = args.only.split(",")
    if "estimate" in parts:
        part_estimate(model, numbers(args.estimate_lengths), args.repeats, device)
    if "prefill" in parts:
        part_prefill(model, press, numbers(args.prefill_lengths), args.repeats, device)
    if "decode" in parts:
        part_decode(model, press, numbers(args.decode_lengths), args.decode_tokens, device)


if __name__ == "__main__":
    main()
