"""Benchmark: cost of head-score capture on one long trial, and several rules from one pass, side by side.

    .venv/bin/python bench/bench_estimate.py [--length 4000] [--repeats 2] [--device cpu] [--part all]

For one needle trial of `--length` tokens on SmolLM2-135M, each approach runs in its own subprocess (so peak
memory is its own) on exactly the same tokens: N = the answer span's length, greedy tokens from `generate`.
  generate        plain `model.generate` (sdpa), N new tokens: the baseline
  estimate        headscore decode mode: sdpa prefill of prompt[:-1], N captured steps, r2 scores
  eager           the usual way: eager attention, each step with output_attentions=True, r2 scores
  teacher-forced  headscore teacher-forced mode: one sdpa pass over prompt + answer, N captured rows
Reported: wall time and process CPU time (best of --repeats, interleaved), peak memory (CPU: the process's
peak RSS, and its rise over the RSS after loading the model; CUDA: torch's peak allocated), ratios against
generate.

Part `rules` (`--rules-trials` retrieval-needle trials of `--rules-length` tokens, in one process, interleaved,
best of --repeats): the study's Head-R + Head-ER pair, i.e. the retrieval and r2 rules on the same trials, as
one two-rule run (`estimate_rules`) vs two single-rule runs (`estimate`), in teacher-forced and decode mode.
`--part capture` or `--part rules` runs one part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APPROACHES = ("generate", "estimate", "eager", "teacher-forced")


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(approach: str, trial_path: Path, tokens_path: Path, device: str) -> dict:
    import torch

    from headscore.core.model import Geometry, load_model, with_cache
    from headscore.scoring.capture import attention_capture
    from headscore.scoring.estimate import decode_trial, encode_trial, teacher_forced_trial
    from headscore.scoring.rules import r2_scores
    from headscore.scoring.trials import Trial

    trial = Trial.from_dict(json.loads(trial_path.read_text()))
    impl = "eager" if approach == "eager" else "sdpa"
    model, tokenizer = load_model("smollm2-135m", device=device, dtype="float32", attn_implementation=impl)
    ids, span = encode_trial(trial, tokenizer)
    n = span[1] - span[0]
    layers = Geometry.from_config(model.config).layers
    cuda = device.startswith("cuda")
    with torch.no_grad():  # warm-up on a short prefix
        model(ids[None, :64].to(device))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mb()
    began, cpu_began = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if approach == "generate":
            inputs = ids[None].to(device)
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            tokens = out[0, ids.shape[0]:].tolist()
            tokens_path.write_text(json.dumps(tokens))
        else:
            forced = torch.tensor(json.loads(tokens_path.read_text()))
            if approach == "estimate":
                with attention_capture(model, layers) as capture:
                    decode_trial(model, tokenizer, ids, span, capture, "r2", n, forced=forced)
            elif approach == "teacher-forced":
                with attention_capture(model, layers) as capture:
                    teacher_forced_trial(model, ids, span, capture, "r2")
            else:
                from transformers import DynamicCache

                inputs = ids.to(device)
                cache = DynamicCache(config=model.config)
                model(input_ids=inputs[None, :-1], **with_cache(model, cache), use_cache=True, logits_to_keep=1)
                token, total = inputs[None, -1:], 0.0
                for step in range(n):
                    out = model(input_ids=token, **with_cache(model, cache), use_cache=True, output_attentions=True,
                                logits_to_keep=1)
                    probs = torch.stack([a[0, :, -1] for a in out.attentions])  # [layers, heads, context]
                    total = total + r2_scores(probs[None], span, answer_tokens=n)
                    token = forced[step].view(1, 1).to(device)
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"approach": approach, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": peak,
            "rise_mb": peak - base, "tokens": int(ids.shape[0]), "steps": n}


def part_rules(trial_count: int, length: int, repeats: int, device: str) -> None:
    """One two-rule run vs two single-rule runs on the same trials (fresh folders each time)."""
    import shutil
    from dataclasses import replace

    from headscore.core.model import load_model
    from headscore.scoring.estimate import EstimateOptions, estimate, estimate_rules
    from headscore.scoring.trials import build_needle_trials

    model, tokenizer = load_model("smollm2-135m", device=device, dtype="float32")
    trials = build_needle_trials("smollm2-135m", kind="retrieval", min_length=length, max_length=length,
                                 lengths=1, depths=trial_count)[:trial_count]
    rules = ("retrieval", "r2")
    print(f"\nrules: {len(trials)} retrieval trials of ~{length} tokens, rules {' + '.join(rules)} (Head-R + "
          f"Head-ER), device {device}, best of {repeats}")
    print(f"{'mode':<16}{'two runs s':>12}{'one run s':>12}{'x time':>9}")
    for mode in ("teacher-forced", "decode"):
        options = EstimateOptions(mode=mode, f1_threshold=-1, rouge_threshold=-1)
        best = {"apart": float("inf"), "together": float("inf")}
        for _ in range(repeats):
            for case in best:
                folder = Path(tempfile.mkdtemp(prefix="bench_rules."))
                began = time.perf_counter()
                if case == "apart":
                    for rule in rules:
                        estimate(model, tokenizer, trials, folder / rule, options=replace(options, rule=rule),
                                 model_name="smollm2-135m", stop_after_failures=0)
                else:
                    estimate_rules(model, tokenizer, trials, {rule: folder / rule for rule in rules},
                                   options=options, model_name="smollm2-135m", stop_after_failures=0)
                best[case] = min(best[case], time.perf_counter() - began)
                shutil.rmtree(folder)
        print(f"{mode:<16}{best['apart']:>12.2f}{best['together']:>12.2f}{best['together'] / best['apart']:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--part", choices=("all", "capture", "rules"), default="all")
    parser.add_argument("--rules-trials", type=int, default=4)
    parser.add_argument("--rules-length", type=int, default=1000)
    parser.add_argument("--worker", choices=APPROACHES)
    parser.add_argument("--trial", type=Path)
    parser.add_argument("--tokens", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.trial, args.tokens, args.device)))
        return
    if args.part in ("all", "capture"):
        part_capture(args)
    if args.part in ("all", "rules"):
        part_rules(args.rules_trials, args.rules_length, args.repeats, args.device)


def part_capture(args: argparse.Namespace) -> None:
    """The capture part: generate, estimate, eager and teacher-forced on one long trial, in subprocesses."""
    from headscore.scoring.trials import build_needle_trials

    trial = build_needle_trials("smollm2-135m", min_length=args.length, max_length=args.length, lengths=1,
                                depths=1)[0]
    folder = Path(tempfile.mkdtemp(prefix="bench_estimate."))
    (folder / "trial.json").write_text(json.dumps(trial.to_dict()))
    runs: dict[str, list[dict]] = {approach: [] for approach in APPROACHES}
    for _ in range(args.repeats):
        for approach in APPROACHES:
            command = [sys.executable, __file__, "--worker", approach, "--trial", str(folder / "trial.json"),
                       "--tokens", str(folder / "tokens.json"), "--device", args.device]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
            runs[approach].append(json.loads(line.splitlines()[-1]))
    best = {approach: {**results[0], **{key: min(r[key] for r in results)
                                         for key in ("seconds", "cpu_seconds", "peak_mb", "rise_mb")}}
            for approach, results in runs.items()}
    base = best["generate"]
    memory = "peak allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"trial: {base['tokens']} tokens, {base['steps']} decoding steps, device {args.device}, "
          f"best of {args.repeats} (time), min of {args.repeats} (memory)")
    print(f"{'approach':<16}{'seconds':>10}{'x time':>9}{'cpu s':>9}{'x cpu':>8}{memory + ' MB':>20}{'x mem':>8}"
          f"{'rise MB':>10}{'x rise':>8}")
    for approach in APPROACHES:
        row = best[approach]
        print(f"{approach:<16}{row['seconds']:>10.2f}{row['seconds'] / base['seconds']:>9.3f}"
              f"{row['cpu_seconds']:>9.2f}{row['cpu_seconds'] / base['cpu_seconds']:>8.3f}"
              f"{row['peak_mb']:>20.0f}{row['peak_mb'] / base['peak_mb']:>8.3f}{row['rise_mb']:>10.0f}"
              f"{row['rise_mb'] / max(base['rise_mb'], 1e-9):>8.3f}")


if __name__ == "__main__":
    main()
