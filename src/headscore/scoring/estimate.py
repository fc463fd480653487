"""`estimate`: run the model over needle trials, capture attention rows, score every head; resume; merge.

Per trial (decode mode, as the official HeadKV code): prefill `prompt[:-1]` with sdpa, then feed the last
prompt token and decode greedily; every step's query (first: the last prompt token) is scored against the
answer span. r2 decoding stops at a newline, at EOS, or once A tokens were generated (A: the answer's token
count, `tokenizer(answer, add_special_tokens=False)`; never more than `max_new_tokens`, default 50), as
`retrieval_head_detection_r2.py` does; retrieval decoding stops at a newline, EOS or N tokens (the span).
Teacher-forced mode: one forward pass over `prompt + answer[:-1]` (answer = the span's own tokens); the N
queries that predict the N answer tokens are scored (they play the decoding steps of the r2 rule, with the
same A), each over every position it sees, with the gold answer token as "the token just generated".
The score rules themselves (with their sources) are in `scoring.rules`.
Only full-attention layers are scored (`Geometry.compressed_layers` for a hybrid model; `SLIDING_NOTE` says why),
and `metadata.json` records them under `scored_layers`.

Results go to a JSONL journal in the output folder, one line per finished trial, and the final files are
rebuilt from the journal, so an interrupted run continues where it stopped. In decode mode a run stops early
(`stop_after_failures`, default 5) when its first K trials all fail the success check: the model does not
answer these prompts, and the error names the fixes.
Under torchrun / accelerate launch the selected trials are split over the ranks, each with its own journal,
and rank 0 writes the same files one process would (`core.journal.run_journaled`).
Trials that begin with the same tokens (one haystack) share the prefill of their common beginning
(`headscore.core.prefix_cache`): they run in prefix-sharing order and each runs only its suffix on the cached
prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import DynamicCache

from headscore.core.attention import CAUSAL_SUFFIX
from headscore.core.decoding import EveryRule, StopRule, greedy_decode, newline_token_ids
from headscore.core.distributed import contiguous_part, rank_device, ranks
from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_open, versions, write_json
from headscore.core.journal import JOURNAL, read_journal, run_journaled_together, write_journal
from headscore.core.kv_cache import growing_cache
from headscore.core.metrics import qa_f1, rouge1_recall, rouge1_recall_stemmed
from headscore.core.model import Geometry, eos_ids, input_device, load_model, with_cache
from headscore.core.plots import head_heatmap
from headscore.core.prefix_cache import PrefixCache, PrefixOptions, plan_prefixes, shared_prefix
from headscore.core.prompts import encode_prompt, tokenizer_fingerprint
from headscore.scoring.capture import attention_capture
from headscore.scoring.head_scores import HeadScores, normalized_importance, write_head_scores
from headscore.scoring.rules import R2_WEIGHTS, get_rule, r2_weight_scale
from headscore.scoring.trials import Trial, read_trials, trials_fingerprint

MODES = ("decode", "teacher-forced")
SCORES_FILE = "head_scores.json"
TABLE_FILE = "trials.csv"
METADATA_FILE = "metadata.json"
HEATMAP_FILE = "heatmap.png"
TABLE_COLUMNS = ("index", "id", "length", "depth", "needle", "response", "success", "f1", "rouge1_recall",
                 "counted", "steps", "nan")
STOP_AFTER_FAILURES = 5
STOP_RULES = ("newline", "official")
ROUGE_VARIANTS = ("plain", "stemmed")
# Why a hybrid model's sliding-window layers are not scored: their attention cannot reach a needle further back
# than the window (a long-context needle is outside it), and headscore never compresses them (they keep
# transformers' own bounded cache), so a score there would drive no budget. Only full-attention layers are
# scored; the score file holds those rows only.
SLIDING_NOTE = ("sliding-window layers are not scored: a needle beyond the window is out of their reach, and "
                "their cache is never compressed (transformers' own bounded cache)")
MODE_NOTES = {
    "decode": "greedy decoding; steps scored from the last prompt token on; only successful trials counted",
    "teacher-forced": "one pass over prompt + gold answer tokens; the queries predicting each answer token "
                      "are scored; every trial counted (no success filter)",
}


@dataclass(frozen=True)
class EstimateOptions:
    """How heads are scored: `rule`, a registered score rule (`scoring.rules.RULES`); `max_new_tokens` caps
    decoding (also capped by the rule's decode length). Thresholds: the rule's success check.

    `stop_rule` (decode mode; `stop_criteria`): "newline" (headscore: any token whose text holds a newline,
    or EOS) or "official" (the authors' test of `<0x0A>` or id 144; r2 also at `config.eos_token_id`;
    retrieval never at EOS and not capped by the span, as Retrieval_Head). `rouge`: the retrieval success
    metric, "plain" (`metrics.rouge1_recall`) or "stemmed" (`rouge_score` with the Porter stemmer, as
    Retrieval_Head). `r2_weight` (rule r2 only): "released" 10 · weight / (N · A) per hit, the formula of the
    released score files, or "head" weight / N, the repository head's (`rules.r2_weight_scale`).
    """

    rule: str = "r2"
    mode: str = "decode"
    f1_threshold: float = 0.5
    rouge_threshold: float = 0.5
    max_new_tokens: int = 50
    stop_rule: str = "newline"
    rouge: str = "plain"
    r2_weight: str = "released"

    def __post_init__(self) -> None:
        get_rule(self.rule)
        if self.mode not in MODES:
            raise HeadscoreError(f"unknown mode '{self.mode}': use one of {', '.join(MODES)}")
        if self.max_new_tokens < 1:
            raise HeadscoreError("--max-new-tokens must be at least 1")
        if self.stop_rule not in STOP_RULES:
            raise HeadscoreError(f"unknown stop rule '{self.stop_rule}': use one of {', '.join(STOP_RULES)}")
        if self.rouge not in ROUGE_VARIANTS:
            raise HeadscoreError(f"unknown rouge '{self.rouge}': use one of {', '.join(ROUGE_VARIANTS)}")
        if self.r2_weight not in R2_WEIGHTS:
            raise HeadscoreError(f"unknown r2 weight '{self.r2_weight}': use one of {', '.join(R2_WEIGHTS)}")

    def success(self, f1: float, rouge: float) -> bool:
        """The rule's success check (r2: QA F1 > f1_threshold; retrieval: ROUGE-1 recall > rouge_threshold)."""
        return get_rule(self.rule).succeeded(f1, rouge, self.f1_threshold, self.rouge_threshold)


def official_newline_ids(tokenizer: Any) -> frozenset[int]:
    """The authors' newline test, `step_token == '<0x0A>' or inp.item() == 144`, as ids of this vocabulary:
    SentencePiece's byte token for a newline where the vocabulary has one, and id 144 whatever it is (on a
    byte-level vocabulary such as Llama-3's no newline token matches)."""
    newline = tokenizer.get_vocab().get("<0x0A>")
    return frozenset({144} | ({newline} if newline is not None else set()))


def stop_criteria(model: Any, tokenizer: Any, options: EstimateOptions, answer_tokens: int,
                  span_tokens: int) -> StopRule:
    """The stop rule of `options` for one trial (A = `answer_tokens`, N = `span_tokens`): "newline" is
    `estimate_stop_rule` capped at the rule's decode length; "official" the authors' ids alone (no text test)."""
    if options.stop_rule == "official":
        if get_rule(options.rule).decode_length == "span":  # retrieval (Retrieval_Head): 50 steps, newline only
            return StopRule(options.max_new_tokens, official_newline_ids(tokenizer))
        eos = getattr(model.config, "eos_token_id", None)  # compared with `==`: a list never matches
        return StopRule(min(answer_tokens, options.max_new_tokens),
                        official_newline_ids(tokenizer) | ({eos} if isinstance(eos, int) else set()))
    length = get_rule(options.rule).decode_steps(answer_tokens, span_tokens)
    return estimate_stop_rule(model, tokenizer, min(length, options.max_new_tokens))


def trial_tokens(model: Any, tokenizer: Any, trial: Trial, prompt_ids: torch.Tensor, span: tuple[int, int],
                 options: EstimateOptions) -> int:
    """The longest sequence a trial's pass runs: the prompt and the forced answer (teacher-forced), or the
    prompt and the longest decode its stop rule allows (decode)."""
    if options.mode == "teacher-forced":
        return prompt_ids.shape[0] + span[1] - span[0] - 1
    stop = stop_criteria(model, tokenizer, options, answer_token_count(tokenizer, trial.answer), span[1] - span[0])
    return prompt_ids.shape[0] + stop.max_new_tokens


@dataclass
class EstimateResult:
    """What a run produced: counts, the ten best heads `(layer, head, share)`, warnings for the summary."""

    out_dir: Path
    run: int
    counted: int
    total: int
    top_heads: list[tuple[int, int, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- trial selection and checks


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' (0 <= i < n) -> (i, n); None -> (0, 1), the whole set."""
    if not text:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise HeadscoreError(f"--shard '{text}' is not 'i/n' (e.g. 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise HeadscoreError(f"--shard '{text}': need 0 <= i < n")
    return index, count


def select_trials(count: int, shard: tuple[int, int], limit: int | None,
                  order: Sequence[int] | None = None) -> list[int]:
    """Trial indices one run handles, ascending: shard i/n is the i-th of n contiguous ranges of `order` (the
    prefix-sharing order of all trials, `plan_prefixes(...).order`, so each shard's trials share prefixes;
    default: file order; `core.distributed.contiguous_part`, as ranks split work), then its first `limit`."""
    if limit is not None and limit < 1:
        raise HeadscoreError("--limit must be at least 1")
    chosen = sorted(contiguous_part(list(range(count)) if order is None else list(order), *shard))
    return chosen[:limit] if limit is not None else chosen


def check_tokenizer(trials: Sequence[Trial], tokenizer: Any) -> None:
    """Trials built for another tokenizer are an error (their answer spans would point at wrong tokens)."""

    expected = tokenizer_fingerprint(tokenizer)
    found = sorted({t.tokenizer_fingerprint for t in trials})
    if found != [expected]:
        raise HeadscoreError(f"the trials were built for another tokenizer (fingerprint {', '.join(found)}; "
                             f"this model's is {expected}); rebuild them with build-needles --model <model>")


def encode_trial(trial: Trial, tokenizer: Any) -> tuple[torch.Tensor, tuple[int, int]]:
    """Prompt ids [prompt] and the answer span, checked against the trial file."""

    ids = encode_prompt(tokenizer, trial.prompt, trial.template)["input_ids"]
    if trial.length is not None and len(ids) != trial.length:
        raise HeadscoreError(f"trial {trial.id}: the prompt tokenizes to {len(ids)} tokens, the trial "
                             f"file says {trial.length} (built for another tokenizer?)")
    start, end = (int(v) for v in trial.answer_span)
    if not 0 <= start < end < len(ids):
        raise HeadscoreError(f"trial {trial.id}: answer span [{start}, {end}) is not inside the "
                             f"{len(ids)}-token prompt")
    return torch.tensor(ids, dtype=torch.long), (start, end)


# ---------------------------------------------------------------- one trial


def check_context(probs: torch.Tensor, expected: int) -> None:
    """The captured rows must cover every position (a sliding-window cache drops some: positions shift)."""
    if probs.shape[-1] != expected:
        raise HeadscoreError(f"the attention saw {probs.shape[-1]} positions, not the {expected} of the "
                             "context (a sliding-window cache?); positions would not line up with the span")


def answer_token_count(tokenizer: Any, answer: str) -> int:
    """A of the r2 rule: the answer's token count without special tokens (as the official code counts it)."""
    return len(tokenizer(answer, add_special_tokens=False)["input_ids"])


def estimate_stop_rule(model: Any, tokenizer: Any, max_new_tokens: int) -> StopRule:
    """Where a decode-mode trial ends: an EOS token (the model's and the tokenizer's), any token whose text holds
    a newline (a leading one too), or `max_new_tokens` tokens."""
    return StopRule(max_new_tokens, frozenset(eos_ids(model, tokenizer)), newline_token_ids(tokenizer),
                    skip_leading_line_ends=False)


TrialScores = tuple[torch.Tensor, list[int], bool]  # (scores [layers, heads], generated ids, non-finite attention)


class ScoredSteps:
    """Scores each decode step's captured attention for several rules at once (`greedy_decode`'s hooks): rule
    `name` adds every step up to and including the one its stop rule ends on (each rule's steps are a prefix of
    one greedy decode: the tokens do not depend on when a rule stops)."""

    def __init__(self, capture: Any, prompt_ids: torch.Tensor, span: tuple[int, int], answer_tokens: int,
                 stops: dict[str, StopRule]) -> None:
        self.capture, self.prompt_ids, self.span, self.answer_tokens = capture, prompt_ids, span, answer_tokens
        self.stops = stops
        self.scores = {name: get_rule(name).score for name in stops}
        device = prompt_ids.device
        self.totals = {name: torch.zeros((), device=device) for name in stops}
        self.bad = {name: torch.zeros((), dtype=torch.bool, device=device) for name in stops}
        self.lengths: dict[str, int] = {}  # rule -> steps, once it stopped
        self.generated: list[int] = []

    def arm(self) -> None:
        self.capture.arm(1)

    def picked(self, step: int, rows: list[int], tokens: list[int]) -> None:
        """Score step `step` (its attention was captured in the forward that gave `tokens[0]`)."""
        device = self.prompt_ids.device
        probs = self.capture.take(device)[:, 0, :, 0]  # [layers, heads, context]
        check_context(probs, self.prompt_ids.shape[0] + step)
        chosen = torch.tensor(tokens[:1], device=device)
        self.generated.append(tokens[0])
        finite = torch.isfinite(probs).all()
        for name, stop in self.stops.items():
            if name in self.lengths:
                continue
            self.totals[name] = self.totals[name] + self.scores[name](probs[None], self.span, chosen,
                                                                     self.prompt_ids,
                                                                     answer_tokens=self.answer_tokens)
            self.bad[name] = self.bad[name] | ~finite
            if stop.finished(self.generated):
                self.lengths[name] = len(self.generated)

    def results(self) -> dict[str, TrialScores]:
        return {name: (self.totals[name], self.generated[:self.lengths.get(name, len(self.generated))],
                       bool(self.bad[name])) for name in self.stops}


@torch.no_grad()
def decode_rules(model: Any, prompt_ids: torch.Tensor, span: tuple[int, int], capture: Any,
                 stops: dict[str, StopRule], forced: torch.Tensor | None = None, answer_tokens: int | None = None,
                 cache: DynamicCache | None = None, start: int = 0) -> dict[str, TrialScores]:
    """Decode mode for several score rules in one decode: prefill `prompt[:-1]` (capture off), then greedy
    steps with capture on, on the one decode loop (`core.decoding.greedy_decode`, with the capture's attention).

    `stops`: each rule's `StopRule`; rule `name` gets (scores [layers, heads] summed over its steps, its
    generated ids, any non-finite attention in its steps); its steps end on its stop rule, that step still
    scored (rules that ban different tokens, `StopRule.picks_like`, cannot share: an error). `forced` [steps]
    replaces the greedy choices (a given continuation; only its length and the rules' `max_new_tokens` end
    it). `answer_tokens`: A of the r2 rule (default: the span's N). `cache`: one already holding
    `prompt[:start]` (a shared prefix, `start` < prompt length); only `prompt[start:-1]` is prefilled on it.
    """
    answer_tokens = answer_tokens or span[1] - span[0]
    device = input_device(model)
    prompt_ids = prompt_ids.to(device)
    if forced is not None:
        stops = {name: StopRule(min(stop.max_new_tokens, len(forced))) for name, stop in stops.items()}
    every = EveryRule.of(list(stops.values()))
    if cache is None:
        cache, start = growing_cache(model.config), 0
    if start < prompt_ids.shape[0] - 1:
        after_cached = CAUSAL_SUFFIX if start > 0 else {}  # the pass right after the shared prefix's tokens
        model(input_ids=prompt_ids[None, start:-1], **with_cache(model, cache), use_cache=True, logits_to_keep=1,
              **after_cached)
    steps = ScoredSteps(capture, prompt_ids, span, answer_tokens, stops)
    steps.arm()  # the first scored step: the last prompt token
    logits = model(input_ids=prompt_ids[None, -1:], **with_cache(model, cache), use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    greedy_decode(model, cache, logits, [every], forced=None if forced is None else forced[None],
                  before_forward=steps.arm, on_pick=steps.picked)
    return steps.results()


def decode_trial(model: Any, tokenizer: Any, prompt_ids: torch.Tensor, span: tuple[int, int], capture: Any,
                 rule: str, max_new_tokens: int, forced: torch.Tensor | None = None,
                 answer_tokens: int | None = None, cache: DynamicCache | None = None, start: int = 0,
                 stop: StopRule | None = None) -> TrialScores:
    """Decode mode for one rule (`decode_rules`): (scores [layers, heads] summed over steps, generated ids, any
    non-finite attention). Ends on `stop` (that step is still scored); by default `estimate_stop_rule`: a
    newline or EOS token, or `max_new_tokens`. `forced` [steps] replaces the greedy choices (only its length
    and `max_new_tokens` end it). `stop`: the stop rule (`stop_criteria`; its `max_new_tokens` replaces
    `max_new_tokens`).
    """
    if stop is None:
        stop = StopRule(max_new_tokens) if forced is not None else estimate_stop_rule(model, tokenizer,
                                                                                      max_new_tokens)
    return decode_rules(model, prompt_ids, span, capture, {rule: stop}, forced, answer_tokens, cache,
                        start)[rule]


@torch.no_grad()
def teacher_forced_rules(model: Any, prompt_ids: torch.Tensor, span: tuple[int, int], capture: Any,
                         rules: Sequence[str], answer_tokens: int | None = None, cache: DynamicCache | None = None,
                         prefix: int = 0) -> dict[str, TrialScores]:
    """Teacher-forced mode for several rules on one pass over `prompt + answer[:-1]`, answer =
    `prompt[start:end]` (N tokens): per rule (scores [layers, heads], greedy predictions at the scored
    positions [N], any non-finite attention).

    The scored queries are the N positions `P-1 .. P+N-2` that predict the answer tokens; each row covers
    every position the query sees; `answer_tokens` is A of the r2 rule (default: N).
    Memory: O(layers × heads × N × context). `cache`: one already holding `prompt[:prefix]` (a shared prefix,
    `prefix` < prompt length); the pass then runs from `prefix` on it.
    """
    device = input_device(model)
    prompt_ids = prompt_ids.to(device)
    start, end = span
    answer = prompt_ids[start:end]
    inputs = torch.cat([prompt_ids, answer[:-1]])[None]
    Geometry.from_config(model.config).check_fits(inputs.shape[1])  # an all-sliding model: within its window
    capture.arm(end - start)
    if cache is None:
        logits = model(input_ids=inputs, use_cache=False, logits_to_keep=end - start).logits
    else:
        logits = model(input_ids=inputs[:, prefix:], **with_cache(model, cache), use_cache=True,
                       logits_to_keep=end - start, **(CAUSAL_SUFFIX if prefix > 0 else {})).logits
    probs = capture.take(device)[:, 0].permute(2, 0, 1, 3)  # [N, layers, heads, context]
    check_context(probs, inputs.shape[1])
    predicted = logits[0].argmax(-1).tolist()
    bad = not bool(torch.isfinite(probs).all())
    return {rule: (get_rule(rule).score(probs, span, answer, prompt_ids, answer_tokens=answer_tokens or end - start),
                   predicted, bad) for rule in rules}


def teacher_forced_trial(model: Any, prompt_ids: torch.Tensor, span: tuple[int, int], capture: Any,
                         rule: str, answer_tokens: int | None = None, cache: DynamicCache | None = None,
                         prefix: int = 0) -> TrialScores:
    """Teacher-forced mode for one rule (`teacher_forced_rules`): (scores [layers, heads], greedy predictions at
    the N scored positions, any non-finite attention)."""
    return teacher_forced_rules(model, prompt_ids, span, capture, [rule], answer_tokens, cache, prefix)[rule]


def score_trial(model: Any, tokenizer: Any, trial: Trial, index: int, options: EstimateOptions,
                capture: Any, prefixes: PrefixCache | None = None, shared: int = 0,
                encoded: tuple[torch.Tensor, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Run one trial; returns its journal record (scores: [layers][heads] floats, None if not counted).

    With `prefixes`, the trial's first `shared` tokens come from the shared prefix cache. `encoded`: the
    trial's `encode_trial` result, if already computed. The one-rule case of `score_trial_rules`."""
    return score_trial_rules(model, tokenizer, trial, index, [options], capture, prefixes, shared, encoded)[0]


def score_trial_rules(model: Any, tokenizer: Any, trial: Trial, index: int, options: Sequence[EstimateOptions],
                      capture: Any, prefixes: PrefixCache | None = None, shared: int = 0,
                      encoded: tuple[torch.Tensor, tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """Run one trial once for several runs' options (one rule each, one mode for all): each run's journal
    record, in order, each what `score_trial` gives for that run alone (timing aside: `seconds` is the
    shared pass's). Decode mode shares one decode among the rules that pick alike (`StopRule.picks_like`;
    every estimate stop rule does), the others decode one after another."""
    began = time.perf_counter()
    prompt_ids, span = encoded or encode_trial(trial, tokenizer)
    answer_tokens = answer_token_count(tokenizer, trial.answer)
    modes = {option.mode for option in options}
    if len(modes) != 1 or len({option.rule for option in options}) != len(options):
        raise HeadscoreError("one trial pass scores distinct rules in one mode")
    found: dict[str, TrialScores] = {}
    with shared_prefix(prefixes, prompt_ids, shared) as (cache, start):
        if options[0].mode == "teacher-forced":
            found = teacher_forced_rules(model, prompt_ids, span, capture, [option.rule for option in options],
                                         answer_tokens, cache, start)
        else:
            stops = {option.rule: stop_criteria(model, tokenizer, option, answer_tokens, span[1] - span[0])
                     for option in options}
            for group in decode_groups(stops):
                if found and cache is not None:
                    cache.crop(start)  # back to the shared prefix for the next decode
                found.update(decode_rules(model, prompt_ids, span, capture, group, answer_tokens=answer_tokens,
                                          cache=cache, start=start))
    seconds = round(time.perf_counter() - began, 3)
    records = []
    for option in options:
        scores, generated, bad = found[option.rule]
        if option.rule == "r2":
            scores = scores * r2_weight_scale(option.r2_weight, answer_tokens)
        response = tokenizer.decode(generated, skip_special_tokens=True).strip()
        recall = rouge1_recall_stemmed if option.rouge == "stemmed" else rouge1_recall
        f1, rouge = qa_f1(response, trial.answer), recall(response, trial.answer)
        success = option.success(f1, rouge)
        bad = bad or not bool(torch.isfinite(scores).all())
        counted = not bad and (success or option.mode == "teacher-forced")
        records.append({
            "index": index, "id": trial.id, "length": int(prompt_ids.shape[0]), "depth": trial.depth,
            "needle": trial.needle_id or "", "response": response, "success": success, "f1": f1,
            "rouge1_recall": rouge, "counted": counted, "steps": len(generated), "nan": bad,
            "answer_tokens": answer_tokens, "span_tokens": span[1] - span[0],
            "scores": scores.double().cpu().tolist() if counted else None,
            "seconds": seconds, "cached_tokens": start,
        })
    return records


def decode_groups(stops: dict[str, StopRule]) -> list[dict[str, StopRule]]:
    """The rules (by name) that can share one decode: those whose stop rules pick alike, in order."""
    groups: list[dict[str, StopRule]] = []
    for name, stop in stops.items():
        group = next((group for group in groups if next(iter(group.values())).picks_like(stop)), None)
        if group is None:
            groups.append({name: stop})
        else:
            group[name] = stop
    return groups


# ---------------------------------------------------------------- outputs


def scored_layers(config: Any, geometry: Geometry) -> dict[str, Any]:
    """Which model layers were scored (the score file's row `i` is model layer `indices[i]`) and why."""
    found: dict[str, Any] = {"indices": list(geometry.model_layers), "kind": "full_attention"}
    if geometry.compressed_layers is not None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        found["excluded"] = [i for i in range(text.num_hidden_layers) if i not in geometry.compressed_layers]
        found["excluded_note"] = SLIDING_NOTE
    return found



def build_outputs(out_dir: Path, header: dict[str, Any], records: Sequence[dict[str, Any]],
                  extra: dict[str, Any]) -> EstimateResult:
    """Rebuild head_scores.json, trials.csv, metadata.json and heatmap.png from the journal's records."""

    records = sorted(records, key=lambda r: r["index"])
    geometry = Geometry.from_dict(header["geometry"])
    counted = [r for r in records if r["counted"]]
    if counted:
        scores = HeadScores.from_tensor(torch.tensor([r["scores"] for r in counted], dtype=torch.float64))
    else:
        scores = HeadScores(layers=geometry.layers, heads=geometry.query_heads)
    write_head_scores(out_dir / SCORES_FILE, scores)
    table = pd.DataFrame([{column: r[column] for column in TABLE_COLUMNS} for r in records],
                         columns=list(TABLE_COLUMNS))
    with atomic_open(out_dir / TABLE_FILE) as handle:
        table.to_csv(handle, index=False, lineterminator="\n")

    warnings = []
    nan = [r["id"] for r in records if r["nan"]]
    if nan:
        warnings.append(f"{len(nan)} trial(s) had non-finite (NaN/inf) attention and were not counted: "
                        f"{', '.join(nan[:5])}{' ...' if len(nan) > 5 else ''} (try --dtype float32)")
    top: list[tuple[int, int, float]] = []
    mean = scores.mean()
    if counted and mean.sum() > 0:
        share = normalized_importance(mean)
        values, flat = share.flatten().topk(min(10, share.numel()))
        top = [(int(i) // geometry.query_heads, int(i) % geometry.query_heads, float(v))
               for v, i in zip(values, flat, strict=True)]
        head_heatmap(share, out_dir / HEATMAP_FILE, cbar_label="share of total score",
                     title=f"{header['model']}: {header['method']} head scores, {header['mode']} "
                           f"({len(counted)} trials)")
    else:
        (out_dir / HEATMAP_FILE).unlink(missing_ok=True)
        reason = "every trial's attention was non-finite" if len(nan) == len(records) else (
            "no response passed the success check; try --mode teacher-forced or a lower threshold")
        warnings.append(f"no trial counted ({len(records)} run): {reason}; head_scores.json holds empty lists "
                        f"(allocate will refuse it) and no heatmap was drawn; see {TABLE_FILE}")
    metadata = {
        "command": "estimate", **header,
        **({"r2_weight": header.get("r2_weight", "released")} if header["method"] == "r2" else {}),
        "mode_note": MODE_NOTES[header["mode"]],
        "trials_run": len(records), "trials_counted": len(counted), "trials_nan": len(nan),
        "files": {"scores": SCORES_FILE, "table": TABLE_FILE, "heatmap": HEATMAP_FILE if top else None,
                  "journal": JOURNAL},
        "versions": versions(), **extra,
        "timing": {"trial_seconds_total": round(sum(r["seconds"] for r in records), 3),
                   "prompt_tokens": sum(r["length"] for r in records),
                   "prompt_tokens_from_prefix_cache": sum(r.get("cached_tokens", 0) for r in records)},
    }
    write_json(out_dir / METADATA_FILE, metadata)
    return EstimateResult(out_dir=out_dir, run=len(records), counted=len(counted),
                          total=header["trials_count"], top_heads=top, warnings=warnings, metadata=metadata)


# ---------------------------------------------------------------- runs


def check_first_failures(records: dict[int, dict[str, Any]], first: Sequence[int], journal: Path) -> None:
    """Stop a decode run whose `first` trials all ran and all failed the success check (the model does not
    answer these prompts): one error line naming the fixes. The journal keeps the trials done."""
    if not first or any(i not in records or records[i]["success"] for i in first):
        return
    response = records[first[0]]["response"]
    raise HeadscoreError(
        f"stopped: the first {len(first)} trials all failed the success check (first response: "
        f"{response[:40]!r}), so no head would be scored; fix: estimate --mode teacher-forced, or rebuild the "
        f"trials with build-needles --template chat; or --stop-after-failures 0 to run every trial anyway "
        f"(the {len(records)} trials done are kept in {journal})")


def estimate(
    model: Any,
    tokenizer: Any,
    trials: Sequence[Trial],
    out_dir: str | Path,
    *,
    options: EstimateOptions = EstimateOptions(),
    model_name: str,
    shard: tuple[int, int] = (0, 1),
    limit: int | None = None,
    stop_after_failures: int = STOP_AFTER_FAILURES,
    prefix: PrefixOptions = PrefixOptions(),
    progress: Callable[[int, int, dict[str, Any] | None], None] | None = None,
) -> EstimateResult | None:
    """Score every head on the selected trials, continuing the journal in `out_dir` if there is one.

    Trials run in prefix-sharing order (`prefix`, see `headscore.core.prefix_cache`; the outputs are in
    trial-file order). Decode mode stops with a HeadscoreError (the journal kept) once the first
    `stop_after_failures` trials to run all failed the success check (0: never stop). `progress(done, total,
    record)` is called once at the start (record None) and after every trial.
    Under a launcher the selected trials are split over the ranks (contiguous ranges of the run order); rank 0
    returns the result of the whole run (the files equal one process's), the other ranks None.
    The one-rule case of `estimate_rules`.
    """
    found = estimate_rules(model, tokenizer, trials, {options.rule: out_dir}, options=options,
                           model_name=model_name, shard=shard, limit=limit, stop_after_failures=stop_after_failures,
                           prefix=prefix, progress=progress)
    return None if found is None else found[options.rule]


def estimate_rules(
    model: Any,
    tokenizer: Any,
    trials: Sequence[Trial],
    out_dirs: Mapping[str, str | Path],
    *,
    options: EstimateOptions = EstimateOptions(),
    model_name: str,
    shard: tuple[int, int] = (0, 1),
    limit: int | None = None,
    stop_after_failures: int = STOP_AFTER_FAILURES,
    prefix: PrefixOptions = PrefixOptions(),
    progress: Callable[[int, int, dict[str, Any] | None], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, EstimateResult] | None:
    """`estimate` for several score rules on one pass over the trials: `out_dirs` maps each rule to its
    output folder, and every folder ends exactly as `estimate` with `replace(options, rule=rule)` leaves it
    (the same files; journal records equal but for `seconds`); each folder resumes on its own, and a trial
    already in a folder's journal is not scored again for it. Each trial runs once for the rules that still
    need it (teacher-forced: one pass; decode: one greedy decode, each rule scored up to its own stop,
    `score_trial_rules`). A rule whose first trials all fail the success check stops alone; the others finish
    (their outputs written), then its error is raised. `log(line)` says what is shared.
    Returns each rule's result (rank 0; None on the other ranks).
    """

    if not out_dirs:
        raise HeadscoreError("estimate needs at least one score rule")
    runs = {rule: (Path(folder), replace(options, rule=rule)) for rule, folder in out_dirs.items()}
    if len({folder.resolve() for folder, _ in runs.values()}) != len(runs):
        raise HeadscoreError("each score rule needs its own output folder")
    check_tokenizer(trials, tokenizer)
    geometry = Geometry.from_config(model.config)
    if stop_after_failures < 0:
        raise HeadscoreError("--stop-after-failures must be 0 (never stop) or more")
    prefix = prefix.for_model(model)
    headers = {rule: run_header(model_name, geometry, option, trials, shard) for rule, (_, option) in runs.items()}
    # planned over the whole file: shards are contiguous ranges of the sharing order (whatever the prefix
    # options), and a trial's shared length, hence its result, does not depend on the shard, limit or resume
    encoded = [encode_trial(trial, tokenizer) for trial in trials]
    if geometry.sliding_window is not None:  # every layer sliding: full attention within the window only
        for trial, (prompt, span) in zip(trials, encoded, strict=True):
            geometry.check_fits(max(trial_tokens(model, tokenizer, trial, prompt, span, option)
                                    for _, option in runs.values()), f"trial {trial.id}'s prompt and answer")
    ids = [prompt for prompt, _ in encoded]
    plan = plan_prefixes(ids, max_tokens=prefix.max_tokens)
    chosen = select_trials(len(trials), shard, limit, plan_prefixes(ids).order if prefix.max_tokens else plan.order)
    rank = {index: position for position, index in enumerate(plan.order)}
    keys = sorted(chosen, key=rank.__getitem__) if prefix.enabled else chosen  # the order trials run in
    stops = options.mode == "decode" and 0 < stop_after_failures <= len(keys)  # shorter runs just finish
    first = keys[:stop_after_failures] if stops else []
    prefixes = PrefixCache(model, plan.prefixes, prefix.chunk) if prefix.enabled else None
    names = list(runs)
    if log is not None and len(names) > 1:
        log(f"estimate: {', '.join(names)} scored on one {options.mode} pass per trial"
            + (" (one greedy decode, each rule up to its own stop)" if options.mode == "decode" else ""))

    def check(folder: Path) -> Callable[[dict[int, dict[str, Any]]], None]:
        return lambda found: check_first_failures(found, first, folder / JOURNAL)

    def work(index: int, which: list[int]) -> list[dict[str, Any]]:
        return score_trial_rules(model, tokenizer, trials[index], index, [runs[names[i]][1] for i in which],
                                 capture, prefixes, plan.shared[index], encoded[index])

    with attention_capture(model, geometry.model_layers) as capture:
        found = run_journaled_together([(runs[rule][0], headers[rule], check(runs[rule][0])) for rule in names],
                                       keys, "index", work, progress)
    where = ranks()
    results: dict[str, EstimateResult] | None = None
    failed: list[tuple[str, Exception]] = []
    if found is not None:  # rank 0 (or the only process) writes the outputs
        extra = {"selection": {"shard": headers[names[0]]["shard"], "limit": limit, "selected": len(chosen)},
                 "scored_layers": scored_layers(model.config, geometry),
                 "prefix_cache": prefix.describe(), "dtype": str(model.dtype).removeprefix("torch."),
                 "device": str(input_device(model)),
                 **({"processes": where.world} if where.distributed else {})}
        results = {}
        for rule, records in zip(names, found, strict=True):
            if isinstance(records, Exception):
                failed.append((rule, records))
                continue
            results[rule] = build_outputs(runs[rule][0], headers[rule], [records[i] for i in chosen], extra)
    where.barrier()  # every rank returns once the files are there
    if failed:
        rule, error = failed[0]
        raise HeadscoreError(f"{rule}: {error}" + (f" (written: {', '.join(results or {})})" if results else ""))
    return results


def run_header(model_name: str, geometry: Geometry, options: EstimateOptions, trials: Sequence[Trial],
               shard: tuple[int, int]) -> dict[str, Any]:
    """What an estimate run is (its journal's header, the base of metadata.json)."""
    # the rule is recorded as "method" (the files' key since the first release), then its description
    settings = {("method" if key == "rule" else key): value for key, value in asdict(options).items()}
    rule = get_rule(options.rule).description
    if options.r2_weight == "released":  # named only when not the default, so earlier journals stay valid
        settings.pop("r2_weight")
    elif options.rule == "r2":
        rule += "; --r2-weight head: weight / N per hit instead (the repository head, commit 4c68d6b)"
    return {"model": model_name, "geometry": geometry.to_dict(), **settings, "rule": rule,
            "trials_fingerprint": trials_fingerprint(trials), "trials_count": len(trials),
            "shard": f"{shard[0]}/{shard[1]}"}


def run_estimate(
    model: str,
    trials_path: str | Path,
    out_dir: str | Path,
    *,
    options: EstimateOptions = EstimateOptions(),
    device: str = "auto",
    dtype: str | None = None,
    device_map: str | None = None,
    shard: str | None = None,
    limit: int | None = None,
    stop_after_failures: int = STOP_AFTER_FAILURES,
    prefix: PrefixOptions = PrefixOptions(),
    progress: Callable[[int, int, dict[str, Any] | None], None] | None = None,
) -> EstimateResult | None:
    """`headscore estimate`: read the trials, load the model (on this rank's device), run `estimate`.

    Returns None on ranks other than 0 of a distributed run. The one-rule case of `run_estimate_rules`.
    """
    found = run_estimate_rules(model, trials_path, {options.rule: out_dir}, options=options, device=device,
                               dtype=dtype, device_map=device_map, shard=shard, limit=limit,
                               stop_after_failures=stop_after_failures, prefix=prefix, progress=progress)
    return None if found is None else found[options.rule]


def run_estimate_rules(
    model: str,
    trials_path: str | Path,
    out_dirs: Mapping[str, str | Path],
    *,
    options: EstimateOptions = EstimateOptions(),
    device: str = "auto",
    dtype: str | None = None,
    device_map: str | None = None,
    shard: str | None = None,
    limit: int | None = None,
    stop_after_failures: int = STOP_AFTER_FAILURES,
    prefix: PrefixOptions = PrefixOptions(),
    progress: Callable[[int, int, dict[str, Any] | None], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, EstimateResult] | None:
    """`headscore estimate --rule A,B`: read the trials, load the model (on this rank's device), run
    `estimate_rules` (rule -> output folder). Returns each rule's result; None on ranks other than 0.
    """

    trials = read_trials(trials_path)
    shard_spec = parse_shard(shard)
    for rule in out_dirs:
        replace(options, rule=rule)  # an unknown rule fails before the model loads
    lm, tokenizer = load_model(model, device=rank_device(device, ranks()), dtype=dtype, device_map=device_map)
    return estimate_rules(lm, tokenizer, trials, out_dirs, options=options, model_name=model, shard=shard_spec,
                          limit=limit, stop_after_failures=stop_after_failures, prefix=prefix, progress=progress,
                          log=log)


def merge_runs(dirs: Sequence[str | Path], out_dir: str | Path) -> EstimateResult:
    """Combine the journals of shard runs of one trial set into one run in `out_dir` (files as one run)."""
    if not dirs:
        raise HeadscoreError("merge needs at least one run folder")
    out_dir = Path(out_dir)
    header: dict[str, Any] | None = None
    records: dict[int, dict[str, Any]] = {}
    shards = []
    for folder in map(Path, dirs):
        found, entries = read_journal(folder / JOURNAL)
        if found is None:
            raise HeadscoreError(f"{folder} holds no {JOURNAL} (not an estimate output folder)")
        base = {key: value for key, value in found.items() if key != "shard"}
        if header is None:
            header = base
        elif base != header:
            differing = sorted(key for key in set(base) | set(header) if base.get(key) != header.get(key))
            raise HeadscoreError(f"{folder} is a different run (differs in {', '.join(differing)}); "
                                 "cannot merge")
        shards.append(found["shard"])
        for entry in entries:
            records.setdefault(entry["index"], entry)
    assert header is not None
    header = {**header, "shard": "0/1"}
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = [records[i] for i in sorted(records)]
    write_journal(out_dir / JOURNAL, header, ordered)
    extra = {"selection": {"shard": "0/1", "limit": None, "selected": len(ordered)},
             "merged_from": [{"dir": str(d), "shard": s} for d, s in zip(dirs, shards, strict=True)]}
    result = build_outputs(out_dir, header, ordered, extra)
    missing = header["trials_count"] - len(ordered)
    if missing:
        result.warnings.append(f"{missing} of {header['trials_count']} trials are in none of the merged "
                               f"runs; run `headscore estimate ... --out {out_dir}` to complete them")
    return result
