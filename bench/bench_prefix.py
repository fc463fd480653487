"""Benchmark: estimate with and without the shared prefix cache, side by side in one run.

    .venv/bin/python bench/bench_prefix.py [--min-length 1000] [--max-length 2000] [--lengths 2] [--default-set]
        [--modes decode,teacher-forced] [--repeats 1] [--device cpu] [--threads N]

A subset of the default trial set with all 10 depths (`build-needles` defaults but `--lengths` lengths in
[min, max]; both reasoning needles) on SmolLM2-135M, float32. Each (mode, prefix cache on/off) run is its own
process (so peak memory is its own) running `estimate` over all trials into a fresh folder; runs are
interleaved over `--repeats`. Reported per mode: wall and CPU time, peak memory (CPU: the process's peak RSS and
its rise over the RSS after loading the model; CUDA: torch's peak allocated), the ratios of the prefix cache
run over the plain one, the share of prompt tokens taken from the prefix cache, and the largest score
difference between the two runs (must be <= 1e-5). On a shared CPU, `--threads 1` makes the CPU time a measure
of the work done (no spinning threads waiting for a preempted partner).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_estimate import rss_mb


def worker(mode: str, cache: bool, trials_path: Path, out: Path, device: str, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from headscore.core.model import load_model
    from headscore.core.prefix_cache import PrefixOptions
    from headscore.scoring.estimate import EstimateOptions, estimate
    from headscore.scoring.trials import read_trials

    trials = read_trials(trials_path)
    model, tokenizer = load_model("smollm2-135m", device=device, dtype="float32")
    cuda = device.startswith("cuda")
    with torch.no_grad():  # warm-up
        model(torch.arange(64, device=device)[None])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mb()
    began, cpu_began = time.perf_counter(), time.process_time()
    options = EstimateOptions(mode=mode, f1_threshold=-1, rouge_threshold=-1)  # count every trial
    result = estimate(model, tokenizer, trials, out, options=options, model_name="smollm2-135m",
                      prefix=PrefixOptions(enabled=cache))
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    timing = result.metadata["timing"]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": peak, "rise_mb": peak - base,
            "reused": timing["prompt_tokens_from_prefix_cache"], "tokens": timing["prompt_tokens"]}


def journal_scores(folder: Path) -> dict[int, list]:
    lines = (folder / "journal.jsonl").read_text().splitlines()[1:]
    return {entry["index"]: entry["scores"] for entry in map(json.loads, lines)}


def largest_difference(first: Path, second: Path) -> float:
    import torch

    a, b = journal_scores(first), journal_scores(second)
    return max(float((torch.tensor(a[i]) - torch.tensor(b[i])).abs().max()) for i in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-length", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=2000)
    parser.add_argument("--lengths", type=int, default=2)
    parser.add_argument("--default-set", action="store_true",
                        help="build-needles' default 100 trials (5 lengths 1000 to 7992 tokens for SmolLM2)")
    parser.add_argument("--modes", default="decode,teacher-forced")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads per run [default: torch's]")
    parser.add_argument("--worker", choices=["decode", "teacher-forced"])
    parser.add_argument("--cache", choices=["on", "off"])
    parser.add_argument("--trials", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.cache == "on", args.trials, args.out, args.device, args.threads)))
        return

    from headscore.scoring.trials import build_needle_trials, write_trials

    if args.default_set:
        args.min_length, args.max_length, args.lengths = 1000, None, 5
    trials = build_needle_trials("smollm2-135m", min_length=args.min_length, max_length=args.max_length,
                                 lengths=args.lengths, depths=10)
    folder = Path(tempfile.mkdtemp(prefix="bench_prefix."))
    write_trials(folder / "trials.jsonl", trials)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs: dict[tuple[str, str], list[dict]] = {(m, c): [] for m in modes for c in ("off", "on")}
    for repeat in range(args.repeats):
        for mode, cache in runs:
            out = folder / f"{mode}-{cache}-{repeat}"
            command = [sys.executable, __file__, "--worker", mode, "--cache", cache, "--trials",
                       str(folder / "trials.jsonl"), "--out", str(out), "--device", args.device,
                       *(["--threads", str(args.threads)] if args.threads else [])]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
            runs[(mode, cache)].append({**json.loads(line.splitlines()[-1]), "out": out})
    memory = "peak allocated" if args.device.startswith("cuda") else "peak RSS"
    lengths = sorted({t.length for t in trials})
    print(f"{len(trials)} trials ({args.lengths} lengths {lengths[0]}-{lengths[-1]} tokens x 10 depths x 2 "
          f"needles), SmolLM2-135M float32, device {args.device}, threads {args.threads or 'default'}, "
          f"best of {args.repeats} (time), "
          f"min of {args.repeats} (memory)")
    print(f"{'mode':<16}{'prefix cache':>13}{'seconds':>10}{'x time':>9}{'cpu s':>9}{'x cpu':>8}"
          f"{memory + ' MB':>20}{'x mem':>8}{'rise MB':>10}{'x rise':>8}{'reused':>9}{'max |d score|':>15}")
    for mode in modes:
        best = {cache: {key: min(r[key] for r in runs[(mode, cache)])
                        for key in ("seconds", "cpu_seconds", "peak_mb", "rise_mb")} for cache in ("off", "on")}
        difference = max(largest_difference(on["out"], off["out"])
                         for on, off in zip(runs[(mode, "on")], runs[(mode, "off")], strict=True))
        for cache in ("off", "on"):
            row, base, first = best[cache], best["off"], runs[(mode, cache)][0]
            print(f"{mode:<16}{cache:>13}{row['seconds']:>10.1f}{row['seconds'] / base['seconds']:>9.3f}"
                  f"{row['cpu_seconds']:>9.1f}{row['cpu_seconds'] / base['cpu_seconds']:>8.3f}"
                  f"{row['peak_mb']:>20.0f}{row['peak_mb'] / base['peak_mb']:>8.3f}{row['rise_mb']:>10.0f}"
                  f"{row['rise_mb'] / max(base['rise_mb'], 1e-9):>8.3f}{first['reused'] / first['tokens']:>9.1%}"
                  f"{difference if cache == 'on' else 0.0:>15.1e}")


if __name__ == "__main__":
    main()
