"""Synthetic long-context tasks generated locally with a fixed seed (in the spirit of RULER).

- `multikey`: several "access code" facts with different keys; ask for one key's code.
- `multivalue`: one key with several codes; ask for all of them.
- `vartrack`: a chain of variable assignments (VAR A = 12345, VAR B = VAR A, ...) next to a distractor chain;
  ask for every variable that holds the value.
- `twohop`: two people with ages and favourite instruments; ask for the instrument of the older (or younger).

The facts are placed at seeded random depths in haystack filler. Scoring: containment of the answer
(`contains`), or the fraction of answers contained (`contains_all`) where several are expected.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from headscore.core.haystack import load_haystack
from headscore.evaluation.tasks.base import Placement, Sample, Task, place_in_haystack, register_task

ADJECTIVES = ("amber", "brisk", "copper", "dusky", "elder", "frosty", "gilded", "hollow", "ivory", "jagged",
              "lunar", "mossy", "nimble", "opal", "quiet", "rustic", "scarlet", "tidal", "velvet", "woolly")
NOUNS = ("falcon", "harbor", "lantern", "meadow", "orchard", "pebble", "quarry", "raven", "saddle", "thimble",
         "valley", "walrus", "anchor", "beacon", "cobalt", "dune", "ember", "fjord", "glacier", "heron")
FIRST_NAMES = ("Priya", "Tomas", "Ingrid", "Kwame", "Lucia", "Oskar", "Amara", "Declan", "Yuki", "Farid",
               "Noemi", "Bruno", "Selma", "Idris", "Mirela", "Rafael")
LAST_NAMES = ("Ramos", "Weller", "Okafor", "Lindqvist", "Moreau", "Castell", "Haddad", "Novak", "Brennan",
              "Sato", "Petrov", "Quayle")
INSTRUMENTS = ("cello", "banjo", "oboe", "harp", "accordion", "trombone", "ukulele", "bassoon", "marimba",
               "sitar", "clarinet", "mandolin")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Puzzle:
    """Facts to hide (in reading order), the question, the gold answers, and task-specific details."""

    texts: tuple[str, ...]
    question: str
    answers: tuple[str, ...]
    meta: dict[str, Any]


@dataclass
class SyntheticTask(Task):
    """`samples_per_length` seeded puzzles at each target prompt length (tokens), facts in haystack filler."""

    metric: ClassVar[str] = "contains"
    lengths: Sequence[int] = (1000, 2000, 4000)
    samples_per_length: int = 4
    seed: int = 42
    haystack: str | None = None
    template: str = "raw"
    max_new_tokens: int = 48

    def puzzle(self, rng: random.Random) -> Puzzle:
        raise NotImplementedError

    def samples(self, tokenizer: Any) -> list[Sample]:
        items = []
        for length in self.lengths:
            for index in range(self.samples_per_length):
                rng = random.Random(f"{self.seed}-{self.name}-{length}-{index}")  # str seeds are stable
                puzzle = self.puzzle(rng)
                depths = tuple(sorted(round(rng.uniform(0, 100), 1) for _ in puzzle.texts))
                items.append((length, index, puzzle, depths))
        placements = [Placement(length, puzzle.texts, depths, puzzle.question)
                      for length, _, puzzle, depths in items]
        built = place_in_haystack(tokenizer, load_haystack(self.haystack).text, placements, self.template)
        return [Sample(id=f"{self.name}-L{length}-S{index}", task=self.name, context=context,
                       question=puzzle.question, answers=list(puzzle.answers), metric=self.metric,
                       prompt=prompt, length=tokens, template=self.template,
                       max_new_tokens=self.max_new_tokens, target_length=length,
                       meta={**puzzle.meta, "depths": list(depths)})
                for (length, index, puzzle, depths), (context, prompt, tokens)
                in zip(items, built, strict=True)]


def distinct_keys(rng: random.Random, count: int) -> list[str]:
    return [f"{a} {n}" for a, n in zip(rng.sample(ADJECTIVES, count), rng.sample(NOUNS, count), strict=True)]


def distinct_codes(rng: random.Random, count: int) -> list[str]:
    return [str(code) for code in rng.sample(range(1_000_000, 10_000_000), count)]


@register_task("multikey", group="synthetic")
@dataclass
class MultiKeyTask(SyntheticTask):
    """`keys` facts "The access code for the <key> vault is <code>."; the question asks for one key."""

    keys: int = 4

    def puzzle(self, rng: random.Random) -> Puzzle:
        keys, codes = distinct_keys(rng, self.keys), distinct_codes(rng, self.keys)
        target = rng.randrange(self.keys)
        texts = tuple(f"The access code for the {k} vault is {c}." for k, c in zip(keys, codes, strict=True))
        return Puzzle(texts, f"What is the access code for the {keys[target]} vault?", (codes[target],),
                      {"key": keys[target], "distractors": [c for i, c in enumerate(codes) if i != target]})


@register_task("multivalue", group="synthetic")
@dataclass
class MultiValueTask(SyntheticTask):
    """`values` facts "One access code for the <key> vault is <code>." for one key; asks for all of them."""

    metric: ClassVar[str] = "contains_all"
    values: int = 4
    max_new_tokens: int = 64

    def puzzle(self, rng: random.Random) -> Puzzle:
        key, codes = distinct_keys(rng, 1)[0], distinct_codes(rng, self.values)
        texts = tuple(f"One access code for the {key} vault is {c}." for c in codes)
        return Puzzle(texts, f"What are all the access codes for the {key} vault? List every one of them.",
                      tuple(codes), {"key": key})


@register_task("vartrack", group="synthetic")
@dataclass
class VariableTrackingTask(SyntheticTask):
    """A chain of `hops` + 1 variables holding one value, interleaved with a 3-variable distractor chain."""

    metric: ClassVar[str] = "contains_all"
    hops: int = 4
    max_new_tokens: int = 48

    def puzzle(self, rng: random.Random) -> Puzzle:
        names: list[str] = []
        while len(names) < self.hops + 4:
            name = "".join(rng.choices(LETTERS, k=5))
            if name not in names:
                names.append(name)
        chain, distractor = names[: self.hops + 1], names[self.hops + 1:]
        value, other = (str(v) for v in rng.sample(range(10_000, 100_000), 2))

        def statements(variables: list[str], start: str) -> list[str]:
            links = [f"VAR {b} = VAR {a}." for a, b in zip(variables[:-1], variables[1:], strict=True)]
            return [f"VAR {variables[0]} = {start}.", *links]

        first, second = statements(chain, value), statements(distractor, other)
        order = [0] * len(first) + [1] * len(second)
        rng.shuffle(order)
        streams = [iter(first), iter(second)]
        texts = tuple(next(streams[which]) for which in order)  # each chain keeps its own order
        question = f"Which variables are assigned the value {value}, directly or through other variables? " \
                   "List all of them."
        return Puzzle(texts, question, tuple(chain), {"value": value, "distractors": distractor})


@register_task("twohop", group="synthetic")
@dataclass
class TwoHopTask(SyntheticTask):
    """Two people with ages and favourite instruments; ask for the instrument of the older or the younger."""


    def puzzle(self, rng: random.Random) -> Puzzle:
        firsts, lasts = rng.sample(FIRST_NAMES, 2), rng.sample(LAST_NAMES, 2)
        people = [f"{f} {last}" for f, last in zip(firsts, lasts, strict=True)]
        ages = rng.sample(range(19, 80), 2)
        instruments = rng.sample(INSTRUMENTS, 2)
        sentences = [f"{p}'s favourite instrument is the {i}."
                     for p, i in zip(people, instruments, strict=True)]
        sentences += [f"{p} is {a} years old." for p, a in zip(people, ages, strict=True)]
        rng.shuffle(sentences)
        older = rng.random() < 0.5
        pick = ages.index(max(ages) if older else min(ages))
        which = "older" if older else "younger"
        question = f"What is the favourite instrument of the {which} one between {people[0]} and {people[1]}?"
        return Puzzle((" ".join(sentences),), question, (instruments[pick],),
                      {"people": people, "ages": ages, "asked": which, "distractor": instruments[1 - pick]})
