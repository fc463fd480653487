"""`niah`: needle-in-a-haystack over a grid of prompt lengths × needle depths, with evaluation-only needles.

The needles (needles/eval.jsonl) differ from the scoring needles: head scores never see the evaluation facts.
A response is scored by ROUGE-1 recall of the needle's answer (the key fact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from headscore.core.haystack import load_haystack
from headscore.evaluation.tasks.base import Placement, Sample, Task, place_in_haystack, register_task
from headscore.scoring.trials import load_needles, needles_dir

EVAL_NEEDLES = "eval.jsonl"


@register_task("niah")
@dataclass
class NiahTask(Task):
    """Samples for every (length, depth, needle), in that nesting order.

    `lengths`: target prompt lengths in tokens; `depths`: needle depths in % of the filler;
    `needles`: a needle JSONL file (default: needles/eval.jsonl); `num_needles`: use only the first ones.
    """

    lengths: Sequence[int] = (1000, 2000, 4000)
    depths: Sequence[float] = (0.0, 25.0, 50.0, 75.0, 100.0)
    needles: str | None = None
    num_needles: int | None = None
    haystack: str | None = None
    template: str = "raw"
    max_new_tokens: int = 32
    metric: str = "rouge1_recall"

    def samples(self, tokenizer: Any) -> list[Sample]:
        needle_list, _ = load_needles(self.needles or str(needles_dir() / EVAL_NEEDLES))
        needle_list = needle_list[: self.num_needles]
        grid = [(length, depth, needle) for length in self.lengths for depth in self.depths
                for needle in needle_list]
        placements = [Placement(length, (needle.needle,), (depth,), needle.question)
                      for length, depth, needle in grid]
        built = place_in_haystack(tokenizer, load_haystack(self.haystack).text, placements, self.template)
        return [Sample(id=f"niah-L{length}-D{depth:g}-{needle.id}", task=self.name, context=context,
                       question=needle.question, answers=[needle.answer], metric=self.metric, prompt=prompt,
                       length=tokens, template=self.template, max_new_tokens=self.max_new_tokens,
                       target_length=length, depth=float(depth), meta={"needle_id": needle.id})
                for (length, depth, needle), (context, prompt, tokens) in zip(grid, built, strict=True)]
