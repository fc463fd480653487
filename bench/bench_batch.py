"""Benchmark: the batched head-wise cache, side by side in one run.

    .venv/bin/python bench/bench_batch.py                  # (a)-(e) on SmolLM2 / random tensors, CPU
    .venv/bin/python bench/bench_batch.py --parts c        # the attention alone (no model)
    .venv/bin/python bench/bench_batch.py --parts d        # evaluate --batch-size 4 vs 1
    .venv/bin/python bench/bench_batch.py --parts e        # ablate: shared prefill, in-place decode cache
    .venv/bin/python bench/bench_batch.py --parts f        # a row leaving the batch: remapped vs re-planned

(a) `evaluate` on SmolLM2, NIAH at `--length` tokens (`--depths`, default 0, 50, 100), the default study's
    methods × budgets (full, snapkv, pyramidkv, ada-snapkv, headkv-r, headkv-r2 × 32, 64, 128, 256; synthetic
    skewed head scores): a sample's compressed conditions decoded as one batch vs `--decode-batch 1`. Each run
    in its own process: wall time, peak RSS, and peak RSS above the loaded model; predictions compared.
(b) One decode step of SmolLM2 on a head-wise cache of 1, 4, 16 rows (one 2k prompt, snapkv / headkv rows at
    budgets 32-256), median over steps, relative to one row.
(c) Decode attention alone on one Llama-3-8B-geometry layer (32 query heads, 8 KV heads, head dim 128, random
    float32 tensors, one query token, 16 generated tokens): head-wise at mean budgets 128 / 512 / 2048 per KV
    head, uniform (snapkv-like: view buckets) and head-level (headkv-like: ragged, gathered buckets), and the
    previous formulation (every query head against all heads' entries, foreign ones masked), vs the full cache
    at 8k and 32k (the faster of sdpa with `enable_gqa` and a grouped matmul-softmax-matmul). Median of
    `--repeats` interleaved calls.
(d) `evaluate --batch-size 4` vs 1 on SmolLM2, short prompts (NIAH at `--short-lengths`, default 500 and 1000
    tokens, depths 25 and 75: four samples), full, snapkv, pyramidkv, headkv-r2 × 64, 128: four samples
    prefilled together (left padded) and all their rows decoded as one batch vs one sample at a time. Each run
    in its own process (batch 1 first): wall time, peak RSS; predictions compared.
(e) Head ablation on SmolLM2, one NIAH prompt of `--ablate-length` tokens (default 1000), the default study's 17
    conditions (baseline; top, random × 2 seeds, lowest at k = 1, 4, 16, 64; synthetic skewed head scores, or
    `--ablate-scores FILE`, e.g. the default study's results/smollm2-135m/scores-r2/head_scores.json):
    the prefill shared where the conditions' masks agree (`HeadAblation.prefill`) vs the prompt prefilled
    once per row in one batch, then `--steps` decode steps of the 17 rows on the in-place cache
    (`core.kv_cache.growing_cache`) vs transformers' `DynamicCache`; times and whether logits and caches are
    bit-identical.
(f) A row leaving the batch (issue 32): a 32-layer cache of 32 heads (head dim 64, float32) and `--rows` rows
    (default 20) of head-level budgets (synthetic skewed head scores, mean budgets 32-256 per head, as headkv rows
    at the default study's budgets), 16 generated tokens: `batch_select_indices` of every layer dropping one row,
    now (nothing moved, the plan remapped by `select_plan`) and before (the entries gathered into new storage,
    `plan_segments`' dynamic program run again),
    as a share of one decode step's attention over the 32 layers; then that step on the rows left, remapped plan
    vs a fresh plan. Median of `--repeats` interleaved runs.
Goals (issue 20): (a) <= 0.35x time, <= 1.2x memory; (b) 16 rows <= 3x one row; (c) at 2048 <= 0.3x of the
full cache at 8k. Issue 32: (f) a row leaving <= 5 % of a decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ["full", "snapkv", "pyramidkv", "ada-snapkv", "headkv-r", "headkv-r2"]
BUDGETS = [32, 64, 128, 256]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_scores(geometry, seed: int):
    """Skewed per-head scores (a few strong heads), the shape real head scores have."""
    from headscore.scoring.head_scores import HeadScores

    generator = torch.Generator().manual_seed(seed)
    strength = torch.rand(geometry.layers, geometry.query_heads, generator=generator) ** 4
    return HeadScores.from_tensor(strength[None] * torch.rand(5, 1, 1, generator=generator))


def child_evaluate(args) -> None:
    """(a) in this process: one evaluate run; prints a JSON line."""
    from headscore.core.model import Geometry, load_model
    from headscore.evaluation.evaluate import EvaluateOptions, evaluate
    from headscore.evaluation.tasks import get_task
    from headscore.scoring.head_scores import write_head_scores

    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    geometry = Geometry.from_config(model.config)
    out = Path(args.out)
    scores = {}
    for seed, kind in enumerate(("r", "r2")):  # score names: headkv-r, headkv-r2
        scores[kind] = str(out / f"{kind}.json")
        write_head_scores(scores[kind], synthetic_scores(geometry, seed))
    depths = [float(d) for d in args.depths.split(",")]
    samples = get_task("niah", lengths=[args.length], depths=depths, num_needles=1,
                       template="chat").samples(tokenizer)
    options = EvaluateOptions(methods=METHODS, budgets=BUDGETS, scores=scores)
    loaded = peak_rss_mib()
    began = time.perf_counter()
    batch = None if args.decode_batch == 0 else args.decode_batch
    result = evaluate(model, tokenizer, samples, out / "run", options=options, model_name="smollm2-135m",
                      figures=False, decode_batch=batch)
    seconds = time.perf_counter() - began
    print(json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib(), "loaded_mib": loaded,
                      "rows": len(result.rows), "predictions": [r["prediction"] for r in result.rows]}))


def part_a(args) -> None:
    runs = {}
    for batch in (1, 0):  # 0: all of a sample's compressed conditions together
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, __file__, "--child-evaluate", "--decode-batch", str(batch), "--out", folder,
                       "--length", str(args.length), "--depths", args.depths]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, check=False)
            if done.returncode:
                sys.exit(done.stderr)
            runs[batch] = json.loads(done.stdout.strip().splitlines()[-1])
    one, batched = runs[1], runs[0]
    same = one["predictions"] == batched["predictions"]
    above = (batched["peak_mib"] - batched["loaded_mib"], one["peak_mib"] - one["loaded_mib"])
    samples = len(args.depths.split(","))
    print(f"(a) evaluate, SmolLM2 float32, NIAH {args.length} tokens, depths {args.depths}, "
          f"{one['rows'] // samples} conditions per sample")
    print(f"{'':>24}{'seconds':>10}{'peak MiB':>10}{'above model MiB':>17}")
    print(f"{'--decode-batch 1':>24}{one['seconds']:>10.1f}{one['peak_mib']:>10.0f}{above[1]:>17.0f}")
    print(f"{'batched (default)':>24}{batched['seconds']:>10.1f}{batched['peak_mib']:>10.0f}{above[0]:>17.0f}")
    print(f"{'ratio batched / 1':>24}{batched['seconds'] / one['seconds']:>10.3f}"
          f"{batched['peak_mib'] / one['peak_mib']:>10.3f}{above[0] / max(above[1], 1):>17.3f}"
          f"   predictions identical: {same}", flush=True)


SHORT_METHODS = ["full", "snapkv", "pyramidkv", "headkv-r2"]
SHORT_BUDGETS = [64, 128]


def child_batch(args) -> None:
    """(d) in this process: one evaluate run at `--batch-size`; prints a JSON line."""
    from headscore.core.model import Geometry, load_model
    from headscore.evaluation.evaluate import EvaluateOptions, evaluate
    from headscore.evaluation.tasks import get_task
    from headscore.scoring.head_scores import write_head_scores

    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    geometry = Geometry.from_config(model.config)
    out = Path(args.out)
    scores = {"r2": str(out / "r2.json")}
    write_head_scores(scores["r2"], synthetic_scores(geometry, 1))
    lengths = [int(n) for n in args.short_lengths.split(",")]
    samples = get_task("niah", lengths=lengths, depths=[25, 75], num_needles=1, template="chat").samples(tokenizer)
    options = EvaluateOptions(methods=SHORT_METHODS, budgets=SHORT_BUDGETS, scores=scores)
    began = time.perf_counter()
    result = evaluate(model, tokenizer, samples, out / "run", options=options, model_name="smollm2-135m",
                      figures=False, batch_size=args.batch_size)
    seconds = time.perf_counter() - began
    print(json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib(), "samples": len(samples),
                      "rows": len(result.rows), "predictions": [r["prediction"] for r in result.rows],
                      "lengths": sorted({r["length"] for r in result.rows})}))


def part_d(args) -> None:
    runs = {}
    for size in (1, 4):
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, __file__, "--child-batch", "--batch-size", str(size), "--out", folder,
                       "--short-lengths", args.short_lengths]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, check=False)
            if done.returncode:
                sys.exit(done.stderr)
            runs[size] = json.loads(done.stdout.strip().splitlines()[-1])
    one, four = runs[1], runs[4]
    agree = sum(a == b for a, b in zip(one["predictions"], four["predictions"], strict=True))
    print(f"(d) evaluate --batch-size 4 vs 1, SmolLM2 float32, {one['samples']} NIAH samples of "
          f"{one['lengths']} tokens, {one['rows'] // one['samples']} conditions each")
    print(f"{'':>24}{'seconds':>10}{'peak MiB':>10}")
    for name, run in (("--batch-size 1", one), ("--batch-size 4", four)):
        print(f"{name:>24}{run['seconds']:>10.1f}{run['peak_mib']:>10.0f}")
    print(f"{'ratio 4 / 1':>24}{four['seconds'] / one['seconds']:>10.3f}{four['peak_mib'] / one['peak_mib']:>10.3f}"
          f"   predictions agreeing: {agree}/{len(one['predictions'])}", flush=True)


def part_b(args) -> None:
    from headscore.compression.generation import compress_state, prefill
    from headscore.compression.presses import make_press
    from headscore.core.model import Geometry, load_model, with_cache

    model, _ = load_model("smollm2-135m", dtype="float32")
    geometry = Geometry.from_config(model.config)
    scores = synthetic_scores(geometry, 0)
    ids = torch.randint(100, 20000, (1, 2000), generator=torch.Generator().manual_seed(0))
    state = prefill(model, ids, window=8)
    kinds = [make_press(method, geometry, budget=budget, scores=scores if method == "headkv" else None)
             for method in ("snapkv", "headkv") for budget in BUDGETS]
    print(f"(b) one decode step, SmolLM2 float32, a 2000-token prompt, rows of snapkv/headkv at {BUDGETS}")
    print(f"{'rows':>6}{'ms/step':>10}{'x one row':>11}{'ms/row':>9}")
    times = {}
    from headscore.compression.attention import HEADWISE_ATTENTION
    from headscore.core.attention import use_attention

    for rows in (1, 4, 16):
        cache = compress_state(state, [kinds[i % len(kinds)] for i in range(rows)])
        token = torch.full((rows, 1), int(state.logits.argmax()))
        steps = []
        with torch.inference_mode(), use_attention(model, HEADWISE_ATTENTION):
            for _ in range(args.steps + 2):
                began = time.perf_counter()
                model(input_ids=token, **with_cache(model, cache), use_cache=True)
                steps.append(time.perf_counter() - began)
        times[rows] = statistics.median(steps[2:])
        print(f"{rows:>6}{times[rows] * 1e3:>10.1f}{times[rows] / times[1]:>11.2f}"
              f"{times[rows] * 1e3 / rows:>9.1f}", flush=True)


def masked_attention(query, keys, values, head, heads, tail_keys, tail_values, scale):
    """The previous decode attention: every query head against all entries, foreign heads masked."""
    q_heads, q_len, dim = query.shape
    kv_heads, t_len = tail_keys.shape[0], tail_keys.shape[1]
    flat = query.reshape(q_heads * q_len, dim)
    prompt = torch.matmul(flat, keys.t()).view(q_heads, q_len, -1).mul_(scale)
    owner = torch.arange(q_heads) // (q_heads // heads)
    prompt = prompt.masked_fill_((head[None, :] != owner[:, None])[:, None, :], float("-inf"))
    grouped = flat.view(kv_heads, (q_heads // kv_heads) * q_len, dim)
    tail = torch.matmul(grouped, tail_keys.transpose(1, 2)).view(q_heads, q_len, t_len).mul_(scale)
    probs = torch.softmax(torch.cat([prompt, tail], dim=-1), dim=-1)
    total = keys.shape[0]
    out = torch.matmul(probs[..., :total].reshape(q_heads * q_len, total), values).view(q_heads, q_len, dim)
    tail_probs = probs[..., total:].reshape(kv_heads, (q_heads // kv_heads) * q_len, t_len)
    return out + torch.matmul(tail_probs, tail_values).view(q_heads, q_len, dim)


def part_c(args) -> None:
    from headscore.compression.attention import HeadwiseEntries, headwise_attention, plan_segments

    q_heads, kv_heads, dim, generated = 32, 8, 128, 16
    generator = torch.Generator().manual_seed(0)
    scale = dim**-0.5
    query = torch.randn(1, q_heads, 1, dim, generator=generator)
    tail_keys, tail_values = (torch.randn(1, kv_heads, generated, dim, generator=generator) for _ in range(2))
    cases = {}
    for length in (8192, 32768):
        keys, values = (torch.randn(1, kv_heads, length + generated, dim, generator=generator) for _ in range(2))
        cases[f"full cache {length // 1024}k (sdpa)"] = lambda k=keys, v=values: (
            torch.nn.functional.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=True))
        cases[f"full cache {length // 1024}k (matmul)"] = lambda k=keys, v=values: torch.matmul(torch.softmax(
            torch.matmul(query.view(1, kv_heads, q_heads // kv_heads, dim), k.transpose(-1, -2)) * scale, -1), v)
    skew = torch.rand(kv_heads, generator=generator) ** 3 + 0.05
    for budget in (128, 512, 2048):
        for shape in ("uniform", "head-level"):
            if shape == "uniform":
                kept = torch.full((1, kv_heads), budget)
            else:  # same mean, spread over heads as head scores spread them (at least 8 per head)
                kept = (skew / skew.sum() * budget * kv_heads).round().long().clamp(min=8)[None]
            total = int(kept.sum())
            keys, values = torch.randn(total, dim, generator=generator), torch.randn(total, dim, generator=generator)
            entries = HeadwiseEntries(keys, values, plan_segments(kept), kv_heads, tail_keys, tail_values)
            cases[f"head-wise {budget} {shape}"] = lambda e=entries: headwise_attention(query, e, scale)
            if shape == "head-level":
                head = torch.repeat_interleave(torch.arange(kv_heads), kept[0])
                cases[f"previous (masked) {budget} {shape}"] = lambda k=keys, v=values, h=head: masked_attention(
                    query[0], k, v, h, kv_heads, tail_keys[0], tail_values[0], scale)
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for call in cases.values():
            call()  # warm-up
        for _ in range(args.repeats):
            for name, call in cases.items():  # interleaved: a busy machine slows every case alike
                began = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - began)
    median = {name: statistics.median(values) for name, values in times.items()}
    # the reference: the faster of the two dense formulations of the full cache
    full8k = min(median["full cache 8k (sdpa)"], median["full cache 8k (matmul)"])
    full32k = min(median["full cache 32k (sdpa)"], median["full cache 32k (matmul)"])
    print(f"(c) decode attention, one Llama-3-8B-geometry layer (32/8 heads, dim 128), float32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'':>34}{'ms':>9}{'x full 8k':>11}{'x full 32k':>12}")
    for name, seconds in median.items():
        print(f"{name:>34}{seconds * 1e3:>9.3f}{seconds / full8k:>11.3f}{seconds / full32k:>12.3f}", flush=True)


def part_e(args) -> None:
    from transformers import DynamicCache

    from headscore.core.kv_cache import growing_cache
    from headscore.core.model import Geometry, load_model, with_cache
    from headscore.evaluation.ablate import HeadAblation, ablation_mask, plan_conditions

    model, _ = load_model("smollm2-135m", dtype="float32", attn_implementation="sdpa")
    geometry = Geometry.from_config(model.config)
    from headscore.scoring.head_scores import read_head_scores

    scores = (read_head_scores(args.ablate_scores, geometry.layers, geometry.query_heads) if args.ablate_scores
              else synthetic_scores(geometry, 0))
    importance = scores.importance()
    plan = plan_conditions(importance, [1, 4, 16, 64], [0, 1])
    masks = torch.stack([ablation_mask(c.heads, geometry.layers, geometry.query_heads) for c in plan])
    rows = masks.shape[0]
    ids = torch.randint(100, 20000, (1, args.ablate_length), generator=torch.Generator().manual_seed(0))
    print(f"(e) head ablation, SmolLM2 float32, one {args.ablate_length}-token prompt, {rows} conditions, "
          f"{args.ablate_scores or 'synthetic scores'}")
    with torch.inference_mode(), HeadAblation(model, masks) as ablation:
        began = time.perf_counter()
        plain = DynamicCache(config=model.config)
        want = model(input_ids=ids.expand(rows, -1), **with_cache(model, plain), use_cache=True,
                     logits_to_keep=1).logits[:, -1]
        per_row = time.perf_counter() - began
        began = time.perf_counter()
        shared = growing_cache(model.config)
        got = ablation.prefill(model, ids, shared)
        together = time.perf_counter() - began
        same = torch.equal(got, want) and all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                                              for a, b in zip(plain.layers, shared.layers, strict=True))
        print(f"  prefill: prompt per row {per_row:.1f} s, shared {together:.1f} s: {together / per_row:.3f}x; "
              f"bit-identical: {same}", flush=True)
        token = want.argmax(-1, keepdim=True)
        step_times: dict[str, list[float]] = {"DynamicCache": [], "growing": []}
        outputs: dict[str, list[torch.Tensor]] = {"DynamicCache": [], "growing": []}
        for _ in range(args.steps):
            for name, cache in (("DynamicCache", plain), ("growing", shared)):  # interleaved
                began = time.perf_counter()
                logits = model(input_ids=token, **with_cache(model, cache), use_cache=True).logits[:, -1]
                step_times[name].append(time.perf_counter() - began)
                outputs[name].append(logits)
            token = outputs["DynamicCache"][-1].argmax(-1, keepdim=True)
        median = {name: statistics.median(times[1:]) for name, times in step_times.items()}
        same = all(torch.equal(a, b) for a, b in zip(*outputs.values(), strict=True))
        print(f"  decode step, {rows} rows: DynamicCache {median['DynamicCache'] * 1e3:.0f} ms, in place "
              f"{median['growing'] * 1e3:.0f} ms: {median['growing'] / median['DynamicCache']:.3f}x; "
              f"bit-identical logits: {same}", flush=True)


def skewed_layers(layers: int, heads: int, rows: int, dim: int, generated: int, seed: int = 0) -> list:
    """(f): compressed layers of `rows` headkv-like rows (budgets 32, 64, 128, 256 in turn, spread over heads by
    skewed scores, at least 8 per head plus a window of 8) with `generated` tail tokens."""
    from headscore.compression.cache import HeadwiseLayer

    generator = torch.Generator().manual_seed(seed)
    strength = torch.rand(layers, heads, generator=generator) ** 4 + 1e-3
    share = strength / strength.sum(-1, keepdim=True)
    built = []
    for layer in range(layers):
        budgets = torch.tensor([BUDGETS[row % len(BUDGETS)] for row in range(rows)])
        kept = ((share[layer][None] * (budgets[:, None] - 8) * heads).floor().long() + 8 + 8)  # floor + window
        total = int(kept.sum())
        keys, values = (torch.randn(total, dim, generator=generator) for _ in range(2))
        tail = torch.randn(rows, heads, generated, dim, generator=generator)
        built.append(HeadwiseLayer(keys, values, kept, 4000, [4000] * rows, tail, tail.clone()))
    return built


def previous_select(layer, indices: torch.Tensor) -> None:
    """(f) before: the previous `HeadwiseLayer.batch_select_indices`, step by step: the kept entries of the rows
    gathered into new storage, the tails indexed, `plan_segments`' dynamic program run again."""
    from headscore.compression.attention import plan_segments

    totals = layer.kept.sum(dim=1)
    starts = totals.cumsum(0) - totals
    counts = totals[indices]
    shift = torch.repeat_interleave(starts[indices] - (counts.cumsum(0) - counts), counts)
    entries = torch.arange(int(counts.sum())) + shift
    layer.keys, layer.values = layer.keys[entries], layer.values[entries]
    layer.kept = layer.kept[indices]
    layer.row_starts = torch.cat([torch.zeros(1, dtype=torch.long), layer.kept.sum(dim=1).cumsum(0)[:-1]])
    layer.lengths = [layer.lengths[i] for i in indices.tolist()]
    layer.tail_keys, layer.tail_values = layer.tail_keys[indices], layer.tail_values[indices]
    layer.buckets = plan_segments(layer.kept, layer.keys.device)
    layer.flex_masks = {}


def part_f(args) -> None:
    from headscore.compression.attention import headwise_attention

    layers, heads, dim = 32, 32, 64
    built = skewed_layers(layers, heads, args.rows, dim, 16)
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(args.rows, heads, 1, dim, generator=generator)
    token = torch.randn(args.rows, heads, 1, dim, generator=generator)
    leaving = torch.tensor([r for r in range(args.rows) if r != args.rows // 2])  # one row leaves

    def step(stack, q, t) -> float:  # the tails grow by one token a step (16 generated, then a few more)
        began = time.perf_counter()
        for layer in stack:
            entries, _ = layer.update(t, t)
            headwise_attention(q, entries)
        return time.perf_counter() - began

    def leave(stack, before: bool) -> tuple[float, list]:
        forks = [layer.fork() for layer in stack]  # the same cache every time (a fork shares the entries)
        began = time.perf_counter()
        for layer in forks:
            if before:
                previous_select(layer, leaving)
            else:
                layer.batch_select_indices(leaving)
        return time.perf_counter() - began, forks

    times: dict[str, list[float]] = {"step": [], "now": [], "before": [], "step now": [], "step before": []}
    with torch.inference_mode():
        step(built, query, token)  # warm-up
        for _ in range(args.repeats):
            times["step"].append(step(built, query, token))
            seconds, remapped = leave(built, before=False)
            times["now"].append(seconds)
            seconds, replanned = leave(built, before=True)
            times["before"].append(seconds)
            times["step now"].append(step(remapped, query[leaving], token[leaving]))
            times["step before"].append(step(replanned, query[leaving], token[leaving]))
            del remapped, replanned
    median = {name: statistics.median(values) for name, values in times.items()}
    buckets = sum(len(layer.buckets) for layer in built)
    print(f"(f) a row leaving, {layers} layers × {heads} heads (dim {dim}, float32), {args.rows} rows of head-level "
          f"budgets ({buckets} buckets), {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  decode step (the attention of {layers} layers, {args.rows} rows): {median['step'] * 1e3:.1f} ms")
    for name, label in (("before", "before: gathered, re-planned"), ("now", "now: remapped (select_plan)")):
        print(f"  a row leaves, {label:>28}: {median[name] * 1e3:8.1f} ms = {median[name] / median['step']:6.1%} "
              f"of a step ({median[name] / layers * 1e3:.2f} ms per layer)")
    print(f"  the next step on {args.rows - 1} rows: remapped plan {median['step now'] * 1e3:.1f} ms, fresh plan "
          f"{median['step before'] * 1e3:.1f} ms: {median['step now'] / median['step before']:.3f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="abcdef", help="which of (a) to (f) to run")
    parser.add_argument("--length", type=int, default=2000, help="(a): NIAH context length")
    parser.add_argument("--depths", default="0,50,100", help="(a): NIAH needle depths (%%), comma-separated")
    parser.add_argument("--steps", type=int, default=10, help="(b), (e): timed decode steps per case")
    parser.add_argument("--repeats", type=int, default=30, help="(c), (f): timed calls per case")
    parser.add_argument("--short-lengths", default="500,1000", help="(d): NIAH context lengths, comma-separated")
    parser.add_argument("--ablate-length", type=int, default=1000, help="(e): prompt tokens")
    parser.add_argument("--ablate-scores", default=None, help="(e): head-score file (default: synthetic scores)")
    parser.add_argument("--rows", type=int, default=20, help="(f): rows of the cache")
    parser.add_argument("--child-evaluate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--decode-batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from headscore.core.assets import quiet_transformers

    quiet_transformers()
    if args.child_evaluate:
        child_evaluate(args)
        return
    if args.child_batch:
        child_batch(args)
        return
    print(f"bench_batch {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)
    for part, run in (("c", part_c), ("f", part_f), ("b", part_b), ("a", part_a), ("d", part_d), ("e", part_e)):
        if part in args.parts:
            run(args)


if __name__ == "__main__":
    main()
