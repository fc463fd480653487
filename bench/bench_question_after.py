"""Benchmark: one compressed context serving several questions (the question after the compressed context) vs
one prefill of context + question per question, side by side in one run.

    .venv/bin/python bench/bench_question_after.py                  # SmolLM2, 4k tokens, 8 questions, CPU
    .venv/bin/python bench/bench_question_after.py --length 1000 --questions 4

The context: the Paul Graham essays (`core.haystack`) cut to `--length` SmolLM2 tokens, with `--questions`
facts ("The special magic number for CITY is NUMBER.") spread through it; question i asks for city i's number
after the context. "after": the context alone prefilled and compressed once (`prefill_compressed`, snapkv at
`--budget` entries per head), then each question asked on it (`answer_after`: a fork of the compressed
cache, the question prefilled, greedy decode), and also all questions at once as rows of one call;
"in-prompt": each question's context + question prefilled and compressed, then decoded (`prefill_compressed`,
`decode`). Each question's two runs are interleaved, and the one compression of "after" is timed three times
among them (median), so a busy machine slows both alike. Reported: wall times,
their ratio (goal, issue 30: <= 0.25x at 4k tokens with 8 questions), numbers found by each protocol, and a
check that the first answer of "after" equals the first question prefilled and decoded on a freshly built
compressed cache of the context (no fork).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Dakar", "Montreal", "Bergen", "Cusco",
          "Tbilisi", "Perth", "Accra", "Lyon", "Hanoi", "Tucson"]


def build(tokenizer, length: int, questions: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor], list[str]]:
    """Context ids `[1, ~length]` with `questions` facts at evenly spaced depths, each question's ids (1-D, the
    question and answer prefix that follow the context) and its number."""
    from headscore.core.haystack import load_haystack

    rng = random.Random(seed)
    numbers = [str(rng.randrange(1000000, 9999999)) for _ in range(questions)]
    facts = [f" The special magic number for {CITIES[i]} is {numbers[i]}. " for i in range(questions)]
    hay = tokenizer(load_haystack().text, add_special_tokens=False)["input_ids"]
    room = length - 40 - sum(len(tokenizer(f, add_special_tokens=False)["input_ids"]) for f in facts)
    pieces = [tokenizer.decode(hay[i * room // questions:(i + 1) * room // questions]) for i in range(questions)]
    text = "Read the text and remember the special magic numbers in it.\n\n"
    text += "".join(piece + fact for piece, fact in zip(pieces, facts, strict=True))
    context = torch.tensor([tokenizer(text)["input_ids"]])
    asks = [torch.tensor(tokenizer(f"\n\nQuestion: What is the special magic number for {CITIES[i]}?\nAnswer: The "
                                   f"special magic number for {CITIES[i]} is", add_special_tokens=False)["input_ids"])
            for i in range(questions)]
    return context, asks, numbers


def main() -> None:
    from headscore.compression.generation import (
        _forward,
        answer_after,
        decode,
        decode_rows,
        prefill_compressed,
    )
    from headscore.compression.presses import make_press
    from headscore.core.assets import quiet_transformers
    from headscore.core.decoding import StopRule
    from headscore.core.model import Geometry, eos_ids, load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4000, help="context tokens")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--budget", type=int, default=256, help="snapkv entries per head")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_transformers()
    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    geometry = Geometry.from_config(model.config)
    press = make_press("snapkv", geometry, budget=args.budget)
    context, asks, numbers = build(tokenizer, args.length, args.questions, args.seed)
    eos = eos_ids(model, tokenizer)
    rule = StopRule(args.new_tokens, frozenset(eos))
    print(f"bench_question_after {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; SmolLM2 float32, a {context.shape[1]}-token context, "
          f"{len(asks)} questions, snapkv at {args.budget} per head, up to {args.new_tokens} new tokens", flush=True)

    decode(model, *prefill_compressed(model, context[:, :64], press)[:2], 2)  # warm-up, not timed
    after, in_prompt, answers_after, answers_in_prompt, compressions = [], [], [], [], []
    for index, ask in enumerate(asks):  # interleaved: each question asked both ways in turn
        if index in (0, len(asks) // 2, len(asks) - 1):  # the one compression, timed thrice (median) among them
            began = time.perf_counter()
            cache, _, _ = prefill_compressed(model, context, press)
            compressions.append(time.perf_counter() - began)
        tokens, seconds = answer_after(model, cache, [ask], rule)
        after.append(seconds)
        answers_after.append(tokens[0])
        began = time.perf_counter()
        whole, logits, _ = prefill_compressed(model, torch.cat([context, ask[None]], dim=1), press)
        answers_in_prompt.append(decode(model, whole, logits, args.new_tokens, eos)[0])
        in_prompt.append(time.perf_counter() - began)
        del whole
    compress_once = statistics.median(compressions)
    rows, rows_seconds = answer_after(model, cache, asks, rule)
    fresh, _, _ = prefill_compressed(model, context, press)
    logits, _ = _forward(model, asks[0][None], fresh)
    first = decode_rows(model, fresh, logits, [rule])[0][0]

    def found(answers: list[list[int]]) -> int:
        return sum(number in tokenizer.decode(tokens) for tokens, number in zip(answers, numbers, strict=True))

    total_after, total_in_prompt = compress_once + sum(after), sum(in_prompt)
    print(f"  after: compress the context once {compress_once:.1f} s (median of {len(compressions)}) + "
          f"{len(asks)} questions {sum(after):.1f} s = {total_after:.1f} s; numbers found "
          f"{found(answers_after)}/{len(asks)}")
    print(f"  after, the {len(asks)} questions as rows of one call: {compress_once:.1f} + {rows_seconds:.1f} s = "
          f"{compress_once + rows_seconds:.1f} s; the same tokens as one at a time: {rows == answers_after}")
    print(f"  in-prompt: {len(asks)} prefills of context + question, each compressed, and decode: "
          f"{total_in_prompt:.1f} s; numbers found {found(answers_in_prompt)}/{len(asks)}")
    print(f"  ratio after / in-prompt: {total_after / total_in_prompt:.3f}x (as rows: "
          f"{(compress_once + rows_seconds) / total_in_prompt:.3f}x); first answer equals the question prefilled "
          f"on a fresh compressed cache: {first == answers_after[0]}", flush=True)


if __name__ == "__main__":
    main()
