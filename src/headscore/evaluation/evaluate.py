"""`headscore evaluate`: methods × budgets over long-context tasks, each sample prefilled once.

Every sample is prefilled once (`generation.prefill`: full keys/values plus the window scores of every layer);
its compressed (method, budget) conditions then become the rows of one head-wise cache built from that state
(`generation.compress_state`) and decode greedily together (`generation.decode_rows`, `--decode-batch` caps
the rows), the full cache on its own. The results equal separate runs of each method (tested), at the cost of
one prefill per sample instead of one per condition and one decode step per token for all conditions.

Outputs in the run folder: `results.csv` (one row per sample × condition), `summary.md` (mean score per
method × budget, overall and per task), `metadata.json`, `niah_<method>_<budget>.png` heatmaps (length ×
depth) and `score_vs_kv.png` (mean score against KV size); with LongBench or LooGLE tasks also
`longbench.md` / `longbench.csv` (each dataset's score as LongBench reports it, their average, LongBench-E
buckets). `journal.jsonl` makes the run resumable. `dump_prompts` writes the rendered prompts and generation
settings without loading weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from headscore.compression.attention import HEADWISE_ATTENTION
from headscore.compression.generation import (
    KVReport,
    PrefillState,
    cache_report,
    compress_rows,
    decode_rows,
    extend,
    prefill,
    prefill_batch,
    run_extra_passes,
)
from headscore.compression.presses import FullPress, changed_settings, make_press, parse_method
from headscore.core.attention import use_attention
from headscore.core.decoding import StopRule, newline_token_ids
from headscore.core.defaults import (
    BETA,
    EVALUATE_BUDGETS,
    EVALUATE_METHODS,
    TEMPLATE,
    WINDOW,
)
from headscore.core.distributed import rank_device, ranks
from headscore.core.errors import HeadscoreError
from headscore.core.files import (
    atomic_open,
    atomic_write_text,
    fingerprint_bytes,
    fingerprint_file,
    versions,
    write_json,
)
from headscore.core.journal import run_journaled
from headscore.core.model import Geometry, eos_ids, input_device, load_geometry, load_model, load_tokenizer
from headscore.core.plots import grid_heatmap, line_plot
from headscore.core.prefix_cache import PrefixCache, PrefixOptions, plan_prefixes, shared_prefix
from headscore.core.prompts import encode_prompt
from headscore.evaluation.tasks import (
    SOURCED,
    Sample,
    Task,
    expand_specs,
    get_task,
    newline_token,
    score,
    task_samples,
    task_settings,
)
from headscore.evaluation.tasks.longbench import longbench_markdown, longbench_table
from headscore.scoring.head_scores import read_head_scores
from headscore.scoring.rules import rule_for_scores

RESULTS_FILE = "results.csv"
SUMMARY_FILE = "summary.md"
METADATA_FILE = "metadata.json"
CURVE_FILE = "score_vs_kv.png"
LONGBENCH_FILE = "longbench.md"
LONGBENCH_CSV = "longbench.csv"
GENERATED_TASK_TEMPLATE = TEMPLATE  # niah/synthetic prompts unless a template is given (sourced tasks: their own)



COMPENSATED = " (compensation)"  # the label suffix of conditions with the compensation token, run both ways


def compensation_variants(setting: bool | str) -> list[bool]:
    """The compensation settings a method taking one runs with: `[setting]`, or both for "both"."""
    if setting == "both":
        return [False, True]
    if not isinstance(setting, bool):
        raise HeadscoreError(f"evaluate: compensation must be true, false or both, got {setting!r}")
    return [setting]


def scores_option(name: str) -> str:
    """How to give the head scores named `name`: `--scores NAME=FILE`, with the estimate rule that makes them."""
    rule = rule_for_scores(name)
    return f"--scores {name}=FILE" + (f" (head scores of estimate --rule {rule.name})" if rule else "")


@dataclass
class EvaluateOptions:
    """What to compare: `methods` (names of `presses.parse_method`: `SCORER@ALLOCATION`, the aliases, `full`,
    `razor`, `razor-kN`) at every KV size in `budgets` (average KV entries per head, window included: the
    paper's KV size) and every compression ratio in `ratios` (the fraction of each prompt's entries removed).

    `scores` maps names to head-score files: a method needing head scores named NAME (`headkv-NAME`,
    `SCORER@headkv-NAME`; razor: `r`) takes that file. `betas`: HeadKV's pool control; several values make a β
    sweep (each method taking β runs at every β). `params`: every other method parameter, the one set of
    settings each method takes what applies to from (`make_press(settings=...)`: window, kernel, alpha, temp,
    granularity, pyramid_beta, sinks, the fidelity options of docs/fidelity.md, each scorer's own), and
    `compensation` (RazorAttention's compensation token: true, false, or "both": every method taking it runs
    both ways, the compensated one labelled `<method> (compensation)`; their rebuttal says it made a run about
    three times slower at large k, so it was likely on in the authors' runs; the paper does not say).
    `answer_prefix` is appended to every prompt (after the generation prompt, so the observation window
    covers it); the model continues it and the prediction excludes it. `question`: "in-prompt" (the paper's
    protocol: the whole prompt is prefilled and compressed) or "after" (only the context before the question is;
    the question and answer prefix are then prefilled on the compressed cache: query-agnostic compression, the
    leaderboard's protocol, `evaluate_sample`).
    """

    methods: Sequence[str] = EVALUATE_METHODS
    budgets: Sequence[int] = EVALUATE_BUDGETS
    ratios: Sequence[float] = ()
    scores: dict[str, str] = field(default_factory=dict)
    betas: Sequence[float] = (BETA,)
    params: dict[str, Any] = field(default_factory=dict)
    answer_prefix: str = ""
    question: str = "in-prompt"

    @property
    def window(self) -> int:
        """The observation window every method shares."""
        window = self.params.get("window")
        return WINDOW if window is None else int(window)


@dataclass(frozen=True)
class Condition:
    """One compared setting: an evaluation method at a KV size `budget` or compression `ratio` (both None for a
    method that takes none: full, razor-kN), β where the method takes one, and its press.

    `label` names it in tables and figures: the method, with β appended in a β sweep.
    """

    method: str
    budget: int | None
    beta: float | None
    press: Any
    label: str
    ratio: float | None = None


def plan_conditions(geometry: Geometry, options: EvaluateOptions) -> list[Condition]:
    """Every (method, KV size or ratio, β) condition, checked up front (unknown methods, missing scores, bad
    budgets, inapplicable parameters, a k above the model's heads). What each method needs comes from the
    registries (`MethodSpec`): named head scores, a budget, β."""

    if not options.methods:
        raise HeadscoreError("evaluate: no method given")
    specs = [parse_method(name) for name in options.methods]
    if not options.budgets and not options.ratios and any(spec.takes_budget for spec in specs):
        raise HeadscoreError("evaluate: no budget given")
    if not options.betas:
        raise HeadscoreError("evaluate: no beta given")
    for spec in specs:
        if spec.head_scores is not None and not options.scores.get(spec.head_scores):
            raise HeadscoreError(f"evaluate: method {spec.name} needs {scores_option(spec.head_scores)}")
    loaded = {name: read_head_scores(options.scores[name], geometry.layers, geometry.query_heads)
              for name in dict.fromkeys(spec.head_scores for spec in specs if spec.head_scores)}
    sizes: list[tuple[str | None, Any]] = [("budget", int(b)) for b in options.budgets]
    sizes += [("ratio", float(r)) for r in options.ratios]
    sweep = len(options.betas) > 1
    compensations = compensation_variants(options.params.get("compensation", False))
    conditions = []
    for spec in specs:
        betas = options.betas if "beta" in spec.parameters() else [None]
        takes = "compensation" in spec.parameters()
        variants = [(beta, c) for beta in betas for c in (compensations if takes else [False])]
        for unit, size in sizes if spec.takes_budget else [(None, None)]:
            for beta, compensation in variants:
                settings = {**options.params, "beta": beta, "scores": loaded or None,
                            "compensation": compensation, **({unit: size} if unit else {})}
                try:
                    press = make_press(spec.name, geometry, settings=settings)
                except HeadscoreError as error:
                    raise HeadscoreError(f"evaluate: method {spec.name}: {error}") from error
                label = f"{spec.name} (β={beta:g})" if sweep and beta is not None else spec.name
                label += COMPENSATED if compensation and len(compensations) > 1 else ""
                conditions.append(Condition(method=spec.name, budget=size if unit == "budget" else None, beta=beta,
                                            press=press, label=label, ratio=size if unit == "ratio" else None))
    return conditions


def condition_columns(press: Any, report: KVReport) -> dict[str, Any]:
    """The columns of a result row that describe what its cache held: `kv_size`, the mean prompt entries kept
    per cache head (window and compensation entries included: the paper's KV size, measured); `full_heads` (k)
    and `compensation` where the method has them (razor), else None; `scorer` and `allocation` (None for a
    press of its own); `ratio_achieved`: the fraction of the prompt's entries removed."""
    kept = [count for layer in report.kept for count in layer]
    described = report.press
    heads = len(kept)
    return {"kv_size": sum(kept) / heads if kept else None,
            "full_heads": described.get("full_heads"), "compensation": described.get("compensation"),
            "scorer": described.get("scorer"), "allocation": described.get("allocation"),
            "ratio_achieved": 1 - sum(kept) / (heads * report.context_tokens) if kept else None}


def tokenizer_eos(tokenizer: Any) -> set[int]:
    """The tokenizer's EOS id alone (the authors' `eos_token_id=[tokenizer.eos_token_id]`)."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise HeadscoreError("the tokenizer has no EOS token; LongBench generation ends at it")
    return {int(tokenizer.eos_token_id)}


def stop_tokens(sample: Sample, tokenizer: Any, stops: Set[int], line_end: Set[int]) -> tuple[Set[int], Set[int]]:
    """`(eos ids, line-end ids)` of the sample's stop rule: `stops` and `line_end` for "line", the tokenizer's
    EOS id and no line ends for "eos", that and the tokenizer's newline token for "newline-token"."""
    if sample.stop == "newline-token":
        return tokenizer_eos(tokenizer) | {newline_token(tokenizer)}, set()
    return (tokenizer_eos(tokenizer), set()) if sample.stop == "eos" else (stops, line_end)


def sample_ids(tokenizer: Any, sample: Any, answer_prefix: str = "") -> list[int]:
    """The token ids `evaluate` runs for a sample: its prompt followed by `answer_prefix`."""
    return encode_prompt(tokenizer, sample.prompt + answer_prefix, sample.template)["input_ids"]


QUESTION_MODES = ("in-prompt", "after")


def question_start(tokenizer: Any, sample: Any, answer_prefix: str = "") -> int:
    """Where the question begins in `sample_ids` (`--question after`: the tokens before it are prefilled and
    compressed, the rest asked on the compressed cache): the first token holding part of the last occurrence of
    `sample.question` in the prompt text. The two parts are the very ids of the prompt, split."""
    at = sample.prompt.rfind(sample.question) if sample.question else -1
    encoded = encode_prompt(tokenizer, sample.prompt + answer_prefix, sample.template, offsets=True)
    ends = [end for start, end in encoded["offset_mapping"]]
    split = next((k for k, end in enumerate(ends) if end > at and k > 0), None) if at > 0 else None
    if split is None:
        raise HeadscoreError(f"evaluate --question after: sample {sample.id} has no question after its context")
    return split


def prefill_ids(tokenizer: Any, sample: Any, answer_prefix: str, question: str) -> list[int]:
    """The ids prefilled (and compressed) for a sample: all of `sample_ids`, or the context before the question
    (`question` "after")."""
    ids = sample_ids(tokenizer, sample, answer_prefix)
    return ids[:question_start(tokenizer, sample, answer_prefix)] if question == "after" else ids


def batch_groups(conditions: Sequence[Condition], samples: int, decode_batch: int | None
                 ) -> list[list[tuple[int, int]]]:
    """Which (sample, condition) rows of `samples` samples decode together (positions into the batch and into
    `conditions`): each full-cache condition's rows on their own (a `DynamicCache`), then every compressed row,
    sample by sample in plan order; at most `decode_batch` rows per group (None: all)."""
    if decode_batch is not None and decode_batch < 1:
        raise HeadscoreError(f"--decode-batch must be at least 1, got {decode_batch}")
    full = [[(s, i) for s in range(samples)] for i, c in enumerate(conditions) if isinstance(c.press, FullPress)]
    compressed = [(s, i) for s in range(samples) for i, c in enumerate(conditions)
                  if not isinstance(c.press, FullPress)]
    groups: list[list[tuple[int, int]]] = []
    for rows in [*full, compressed]:
        size = decode_batch or max(len(rows), 1)
        groups.extend(rows[start:start + size] for start in range(0, len(rows), size))
    return groups


def decode_groups(conditions: Sequence[Condition], decode_batch: int | None) -> list[list[int]]:
    """Which conditions (positions into `conditions`) of one sample decode together (`batch_groups`): the
    compressed ones in plan order, at most `decode_batch` per group, each full-cache condition alone."""
    return [[condition for _, condition in group] for group in batch_groups(conditions, 1, decode_batch)]


def decode_pairs(model: Any, rows: Sequence[tuple[PrefillState, Any]], rules: Sequence[StopRule],
                 question: torch.Tensor | None = None) -> list[tuple[list[int], KVReport]]:
    """Decode `(prefill state, press)` rows at once (`compress_rows`: presses of one prefill, or prompts of
    several left padded to the longest), row `i` ending on `rules[i]`: `(tokens, KVReport)` per row, the report
    taken when its row finished. `question` `[q]`: ids asked after the compressed context (rows of one prefill),
    prefilled on the compressed cache before decoding."""
    cache = compress_rows(rows)
    states = [state for state, _ in rows]
    several = any(state is not states[0] for state in states)
    width = max(state.length for state in states)
    decoded: dict[int, tuple[list[int], KVReport]] = {}

    def finished(row: int, position: int, tokens: list[int], seconds: list[float]) -> None:
        state, press = rows[row]
        decoded[row] = (tokens, cache_report(cache, press, state.geometry, state.length, len(tokens),
                                             state.seconds, seconds, row=position, padding=width - state.length))

    logits = torch.stack([state.logits for state in states]) if several else states[0].logits
    if question is not None:
        if several:
            raise HeadscoreError("a question after the context takes rows of one prefill")
        logits = extend(model, cache, question[None].expand(len(rows), -1))
    decode_rows(model, cache, logits, rules, on_finish=finished,
                lengths=[state.length for state in states] if several else None)
    return [decoded[row] for row in range(len(rows))]


def decode_conditions(model: Any, state: PrefillState, presses: Sequence[Any], rule: StopRule,
                      question: torch.Tensor | None = None) -> list[tuple[list[int], KVReport]]:
    """Decode one prefill under several presses at once (one batch row each; the full press alone):
    `(tokens, KVReport)` per press (`decode_pairs`; `question`: asked after the compressed context)."""
    return decode_pairs(model, [(state, press) for press in presses], [rule] * len(presses), question)


def sample_rule(sample: Sample, tokenizer: Any, stops: Set[int], line_end: Set[int]) -> StopRule:
    """The sample's `StopRule`: its stop tokens (`stop_tokens`), maximum and minimum new tokens."""
    eos, line_end = stop_tokens(sample, tokenizer, stops, line_end)
    return StopRule(sample.max_new_tokens, frozenset(eos), frozenset(line_end), sample.min_new_tokens)


def query_count(conditions: Sequence[Condition], window: int) -> int:
    """The last prompt queries a prefill keeps for every condition's scorer (at least the window)."""
    return max([window, *(c.press.query_count() for c in conditions)])


def extra_passes(conditions: Sequence[Condition]) -> list[str]:
    """The extra passes over each prompt the conditions' scorers declared (run once per prompt)."""
    return list(dict.fromkeys(c.press.extra_pass for c in conditions if c.press.extra_pass))


def prefill_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Which prompts (positions into `lengths`) of a batch prefill together: longest first, a prompt joining the
    current group while it is at least half the group's longest (so padding stays below half of each row)."""
    groups: list[list[int]] = []
    for position in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and 2 * lengths[position] >= lengths[groups[-1][0]]:
            groups[-1].append(position)
        else:
            groups.append([position])
    return groups


def evaluate_sample(model: Any, tokenizer: Any, sample: Any, conditions: Sequence[Condition],
                    stops: set[int], window: int, line_end: Set[int] = frozenset(),
                    answer_prefix: str = "", prefixes: PrefixCache | None = None,
                    shared: int = 0, decode_batch: int | None = None,
                    question: str = "in-prompt") -> list[dict[str, Any]]:
    """Prefill `sample` (its prompt followed by `answer_prefix`) once, then decode every condition: one result
    row per condition, in plan order. `question` "after": only the context before the question is prefilled and
    compressed; the question (and the answer prefix) is then prefilled on each compressed cache
    (`question_start`), so the selection cannot see it (query-agnostic compression, RULER's leaderboard
    protocol).

    The compressed conditions decode together, one batch row each (`decode_groups`, at most `decode_batch`
    rows; 1: one at a time), each row ending on the sample's stop rule (`stop_tokens`) and leaving the batch
    when it does. "eos" predictions are kept unstripped. With `prefixes`, the sample's first `shared` tokens
    come from the shared prefix cache (the prefill state still holds every token's keys and values).
    """

    ids = sample_ids(tokenizer, sample, answer_prefix)
    split = question_start(tokenizer, sample, answer_prefix) if question == "after" else len(ids)
    prompt, asked = torch.tensor(ids[:split]), torch.tensor(ids[split:]) if split < len(ids) else None
    # the prefix is prefilled with the same (sdpa-exact) attention function as the rest of the prompt
    with use_attention(model, HEADWISE_ATTENTION), shared_prefix(prefixes, prompt, shared) as (cache, start):
        state = prefill(model, prompt[None].to(input_device(model)), window, cache, start,
                        queries=query_count(conditions, window))
    run_extra_passes(model, tokenizer, state, extra_passes(conditions))
    rule = sample_rule(sample, tokenizer, stops, line_end)
    results: dict[int, tuple[list[int], KVReport]] = {}
    for group in decode_groups(conditions, decode_batch):
        decoded = decode_conditions(model, state, [conditions[i].press for i in group], rule, asked)
        results.update(zip(group, decoded, strict=True))
    return result_rows(tokenizer, sample, len(ids), conditions, [results[i] for i in range(len(conditions))],
                       question)


def evaluate_batch(model: Any, tokenizer: Any, samples: Sequence[Any], conditions: Sequence[Condition],
                   stops: set[int], window: int, line_end: Set[int] = frozenset(), answer_prefix: str = "",
                   decode_batch: int | None = None) -> list[list[dict[str, Any]]]:
    """`evaluate_sample` for several samples at once: their prompts prefilled together (left padded, in groups
    of similar length: `prefill_groups`), then every (sample, condition) one decode row (`batch_groups`, at
    most `decode_batch` rows together), each ending on its sample's stop rule. The result rows of each sample,
    equal to its `evaluate_sample` (but for the rounding padding may bring)."""
    ids = [sample_ids(tokenizer, sample, answer_prefix) for sample in samples]
    states: dict[int, PrefillState] = {}
    queries, extras = query_count(conditions, window), extra_passes(conditions)
    for group in prefill_groups([len(prompt) for prompt in ids]):
        prefilled = prefill_batch(model, [torch.tensor(ids[i]) for i in group], window, queries=queries)
        for state in prefilled:
            run_extra_passes(model, tokenizer, state, extras)
        states.update(zip(group, prefilled, strict=True))
    rules = [sample_rule(sample, tokenizer, stops, line_end) for sample in samples]
    results: dict[tuple[int, int], tuple[list[int], KVReport]] = {}
    for pairs in batch_groups(conditions, len(samples), decode_batch):
        decoded = decode_pairs(model, [(states[s], conditions[c].press) for s, c in pairs],
                               [rules[s] for s, _ in pairs])
        results.update(zip(pairs, decoded, strict=True))
    return [result_rows(tokenizer, sample, len(ids[s]), conditions,
                        [results[s, c] for c in range(len(conditions))]) for s, sample in enumerate(samples)]


def result_rows(tokenizer: Any, sample: Any, length: int, conditions: Sequence[Condition],
                decoded: Sequence[tuple[list[int], KVReport]], question: str = "in-prompt") -> list[dict[str, Any]]:
    """One result row per condition of `sample` (its prompt `length` tokens) from its decoded `(tokens,
    report)`; "eos" predictions are kept unstripped."""
    rows = []
    for condition, (tokens, report) in zip(conditions, decoded, strict=True):
        prediction = tokenizer.decode(tokens, skip_special_tokens=True)
        prediction = prediction if sample.stop == "eos" else prediction.strip()
        rows.append({
            "task": sample.task, "sample": sample.id, "length": length, "target_length": sample.target_length,
            "depth": sample.depth, "method": condition.label, "budget": condition.budget,
            "beta": condition.beta,
            "prediction": prediction, "answers": " | ".join(sample.answers), "metric": sample.metric,
            "score": score(sample, prediction), "kv_bytes": report.kv_bytes,
            "full_kv_bytes": report.full_kv_bytes, "kv_ratio": report.ratio,
            **condition_columns(condition.press, report), "ratio": condition.ratio, "question": question,
        })
    return rows


@dataclass
class EvaluateResult:
    out_dir: Path
    samples: int
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    figures: list[Path]


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score and KV ratio per (method, budget), overall and per task, in plan order."""

    frame = pd.DataFrame(rows)
    frame["budget"] = frame["budget"].astype("Int64")
    order = {m: i for i, m in enumerate(dict.fromkeys(frame["method"]))}
    table = []
    for (method, budget), group in frame.groupby(["method", "budget"], dropna=False, sort=False):
        entry = {"method": method, "budget": None if pd.isna(budget) else int(budget),
                 "score": float(group["score"].mean()), "kv_ratio": float(group["kv_ratio"].mean()),
                 "samples": int(group["sample"].nunique())}
        entry.update({f"score[{task}]": float(g["score"].mean()) for task, g in group.groupby("task", sort=True)})
        table.append(entry)
    table.sort(key=lambda e: (order[e["method"]], -1 if e["budget"] is None else e["budget"]))
    return table


def summary_table(summary: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The summary as `(header, rows)` of formatted cells: method × budget rows, KV ratio, overall and
    per-task mean scores (the columns of `summary.md` and of the CLI's table)."""
    tasks = sorted({key for entry in summary for key in entry if key.startswith("score[")})
    header = ["method", "budget", "KV ratio", "mean score", *[t[6:-1] for t in tasks]]
    rows = [[entry["method"], "all" if entry["budget"] is None else str(entry["budget"]),
             f"{entry['kv_ratio']:.3f}", f"{entry['score']:.3f}",
             *[f"{entry[t]:.3f}" if t in entry else "" for t in tasks]] for entry in summary]
    return header, rows


def summary_markdown(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a markdown table (`summary_table`)."""
    header, rows = summary_table(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(cells) + " |" for cells in rows)
    return "\n".join(lines) + "\n"


def write_figures(out_dir: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """NIAH heatmaps (length × depth) per method and budget, and the score-vs-KV-size curves.

    A compressed method that takes no budget (razor-kN) has its heatmap named `niah_<method>_all.png` and is
    one point on the curve, at the mean KV size its rows held (`kv_size`)."""

    frame = pd.DataFrame(rows)
    figures = []
    niah = frame[frame["task"] == "niah"]
    if not niah.empty:
        lengths = sorted(niah["target_length"].unique())
        depths = sorted(niah["depth"].unique())
        for (method, budget), group in niah.groupby(["method", "budget"], dropna=False, sort=False):
            grid = group.pivot_table(index="depth", columns="target_length", values="score", aggfunc="mean")
            grid = grid.reindex(index=depths, columns=lengths)
            label = f"{int(budget)}" if not pd.isna(budget) else "full" if method == "full" else "all"
            path = out_dir / f"niah_{method}_{label}.png"
            grid_heatmap(torch.tensor(grid.to_numpy(dtype=float)), path,
                         title=f"NIAH {method}" + ("" if pd.isna(budget) else f", KV size {int(budget)}"),
                         xlabel="context length (tokens)", ylabel="depth (%)", cbar_label="score",
                         xticklabels=[str(int(v)) for v in lengths], yticklabels=[f"{v:g}" for v in depths],
                         vmin=0.0, vmax=1.0, cmap="RdYlGn")
            figures.append(path)
    compressed = frame[frame["budget"].notna()]
    fixed = frame[frame["budget"].isna() & (frame["method"] != "full")]
    if "kv_size" in frame:
        fixed = fixed[fixed["kv_size"].notna()]
    if not compressed.empty or not fixed.empty:
        series = {}
        for method, group in compressed.groupby("method", sort=False):
            means = group.groupby("budget")["score"].mean().sort_index()
            series[method] = ([float(b) for b in means.index], [float(v) for v in means], None)
        for method, group in fixed.groupby("method", sort=False):
            series[method] = ([float(group["kv_size"].mean())], [float(group["score"].mean())], None)
        full = frame[frame["method"] == "full"]
        if not full.empty:
            sizes = sorted({x for xs, _, _ in series.values() for x in xs})
            series["full"] = (sizes, [float(full["score"].mean())] * len(sizes), None)
        path = out_dir / CURVE_FILE
        line_plot(series, path, title="score vs KV size", xlabel="KV size (entries per head)",
                  ylabel="mean score", xscale="log")
        figures.append(path)
    return figures


def evaluate(model: Any, tokenizer: Any, samples: Sequence[Any], out_dir: str | Path, *,
             options: EvaluateOptions, model_name: str, task_settings: Sequence[dict[str, Any]] = (),
             prefix: PrefixOptions = PrefixOptions(),
             progress: Callable[[int, int], None] | None = None, conditions: Sequence[Condition] | None = None,
             figures: bool = True, decode_batch: int | None = None, batch_size: int = 1) -> EvaluateResult | None:
    """Run every condition on every sample, resuming the journal in `out_dir`; write the outputs.

    `conditions`: an explicit plan instead of `plan_conditions(options)` (e.g. `tune`'s per-budget β); its
    presses are part of the journal header. `figures=False` skips the NIAH heatmaps and the KV curve.
    `decode_batch`: at most this many compressed conditions of a sample decode together (None: all of them;
    1: one at a time); the outputs and the journal do not depend on it. `batch_size`: samples run this many
    at a time, in the order they run (`evaluate_batch`: prompts prefilled together, left padded, each prompt
    whole, without the shared prefix; every (sample, condition) a decode row); the outputs and the journal do
    not depend on it either (but for the rounding padding may bring), and each sample is journaled once its
    batch is done.
    Samples that begin with the same tokens (tasks cut from one haystack) share the prefill of their common
    beginning (`prefix`, see `headscore.core.prefix_cache`) and run in that order; the outputs stay in sample
    order.
    Under a launcher the samples are split over the ranks; rank 0 writes the outputs (equal to one process's)
    and returns the result, the other ranks None.
    """

    out_dir = Path(out_dir)
    geometry = Geometry.from_config(model.config)
    explicit = conditions is not None
    conditions = list(conditions) if conditions is not None else plan_conditions(geometry, options)
    decode_groups(conditions, decode_batch)  # a bad --decode-batch fails before any work
    if batch_size < 1:
        raise HeadscoreError(f"--batch-size must be at least 1, got {batch_size}")
    if options.question not in QUESTION_MODES:
        raise HeadscoreError(f"evaluate: --question must be one of {', '.join(QUESTION_MODES)}, got "
                             f"'{options.question}'")
    if batch_size > 1 and options.question == "after":
        raise HeadscoreError("--question after runs one sample at a time: use --batch-size 1")
    if batch_size > 1 and geometry.compressed_layers is not None:
        raise HeadscoreError("--batch-size above 1 needs a model whose layers are all full attention (this one "
                             "has sliding-window layers)")
    limit = geometry.max_context
    too_long = [s.id for s in samples if limit and s.length + s.max_new_tokens > limit]
    if too_long:
        raise HeadscoreError(f"evaluate: sample {too_long[0]} does not fit the model's context of {limit} tokens "
                             "(LongBench/LooGLE: --max-length truncates prompts)")
    for sample in samples:  # a model whose every layer is sliding: full attention within its window only
        geometry.check_fits(sample.length + sample.max_new_tokens, f"sample {sample.id}'s prompt and answer")
    described = {**asdict(options), "params": changed_settings(options.params)}  # defaults spelled out or not
    header: dict[str, Any] = {"model": model_name, "geometry": geometry.to_dict(),
              "options": {**described, "methods": list(options.methods), "budgets": list(options.budgets),
                          "scores": {k: fingerprint_file(v) for k, v in sorted(options.scores.items())}},
              "samples_fingerprint": fingerprint_bytes(*(s.id + "\0" + s.prompt for s in samples)),
              "samples": len(samples)}
    if explicit:
        header["conditions"] = [[c.label, c.budget, c.press.describe()] for c in conditions]
    stops, line_end = eos_ids(model, tokenizer), set(newline_token_ids(tokenizer))
    by_id: dict[str, Any] = {}
    for sample in samples:
        by_id.setdefault(sample.id, sample)
    # planned over every sample (resumed runs share the same lengths); the window's queries run unshared
    prefix = prefix.for_model(model)
    keys = list(by_id)
    plan = plan_prefixes([torch.tensor(prefill_ids(tokenizer, by_id[key], options.answer_prefix, options.question))
                          for key in keys],
                         min_suffix=max(query_count(conditions, options.window), 1), max_tokens=prefix.max_tokens)
    shared = {keys[position]: plan.shared[position] for position in range(len(keys))}
    sharing = prefix.enabled and batch_size == 1  # batched prompts are prefilled whole
    prefixes = PrefixCache(model, plan.prefixes, prefix.chunk) if sharing else None

    def work(sample_id: str) -> dict[str, Any]:
        rows = evaluate_sample(model, tokenizer, by_id[sample_id], conditions, stops, options.window, line_end,
                               options.answer_prefix, prefixes, shared[sample_id], decode_batch, options.question)
        return {"sample": sample_id, "rows": rows}

    def work_batch(batch_keys: list[str]) -> list[dict[str, Any]]:
        batch = evaluate_batch(model, tokenizer, [by_id[key] for key in batch_keys], conditions, stops,
                               options.window, line_end, options.answer_prefix, decode_batch)
        return [{"sample": key, "rows": rows} for key, rows in zip(batch_keys, batch, strict=True)]

    began = time.perf_counter()
    report = None if progress is None else (lambda done, total, record: progress(done, total))
    order = [keys[position] for position in plan.order] if prefix.enabled else keys  # the order samples run in
    records = run_journaled(out_dir, header, order, "sample", work, report,
                            work_batch=work_batch if batch_size > 1 else None, batch=batch_size)
    where = ranks()
    if records is None:  # a rank other than 0: rank 0 writes the outputs
        where.barrier()
        return None
    done = {key: record["rows"] for key, record in records.items()}
    rows = [row for sample in samples for row in done[sample.id]]
    summary = summarize(rows)
    with atomic_open(out_dir / RESULTS_FILE) as handle:
        pd.DataFrame(rows).to_csv(handle, index=False)
    atomic_write_text(out_dir / SUMMARY_FILE, f"# Evaluation: {model_name}\n\n" + summary_markdown(summary))
    written = write_figures(out_dir, rows) if figures else []
    longbench = longbench_table(samples, rows)
    if longbench:
        atomic_write_text(out_dir / LONGBENCH_FILE, f"# LongBench / LooGLE scores: {model_name}\n\n"
                          "Each dataset: mean score × 100, 2 decimals (LongBench's scorer); average: over the "
                          "datasets; qa_average, loogle_average: the paper's main-table averages (the 6 "
                          "LongBench QA datasets; LooGLE's 4 tasks).\n\n" + longbench_markdown(longbench))
        with atomic_open(out_dir / LONGBENCH_CSV) as handle:
            pd.DataFrame(longbench).to_csv(handle, index=False)
    write_json(out_dir / METADATA_FILE, {
        **header, "options": {**header["options"], "scores_files": dict(options.scores)},
        "tasks": list(task_settings),
        "conditions": [{"method": c.method, "label": c.label, "budget": c.budget, "beta": c.beta,
                        "press": c.press.describe()} for c in conditions],
        "prefix_cache": {**prefix.describe(), "enabled": sharing}, "decode_batch": decode_batch,
        "batch_size": batch_size,
        "dtype": str(model.dtype).removeprefix("torch."), "device": str(input_device(model)),
        "seconds_this_run": round(time.perf_counter() - began, 2), "versions": versions(),
        **({"processes": where.world} if where.distributed else {}),
    })
    where.barrier()  # every rank returns once the files are there
    return EvaluateResult(out_dir=out_dir, samples=len(samples), rows=rows, summary=summary, figures=written)


@dataclass
class EvaluationSetup:
    """A checked plan with its loaded model and built samples, ready for `evaluate`."""

    model: Any
    tokenizer: Any
    samples: list[Any]
    task_settings: list[dict[str, Any]]


def build_tasks(tasks: str, task_options: dict[str, Any] | None = None) -> list[Task]:
    """The tasks of comma-separated `tasks` specs, each given the `task_options` it accepts.

    Without a `template` option, niah and synthetic tasks use the chat template and LongBench/LooGLE the
    authors' formatting (their own default, `raw`).
    """
    task_options = {k: v for k, v in (task_options or {}).items() if v is not None}
    built = []
    for spec in expand_specs(tasks):
        accepted = set(task_settings(spec))
        settings = {k: v for k, v in task_options.items() if k in accepted}
        if "template" in accepted and "template" not in settings and spec.partition(":")[0] not in SOURCED:
            settings["template"] = GENERATED_TASK_TEMPLATE
        built.append(get_task(spec, **settings))
    return built


def dump_prompts(model_name: str, tasks: str, out: str | Path, *, task_options: dict[str, Any] | None = None,
                 limit: int | None = None, answer_prefix: str = "") -> int:
    """Write every sample's exact model input (after truncation, ending with `answer_prefix`) and generation
    settings as JSONL to `out` (atomically), loading only the tokenizer. Returns the number of samples.

    Fields: `id`, `task`, `dataset`, `prompt`, `prompt_tokens` (with the tokenizer's special tokens),
    `template`, `max_new_tokens`, `min_new_tokens`, `decoding` (greedy), `stop`, `eos_token_ids` (the
    tokenizer's; "line" samples also stop at the model's generation-config EOS ids and at a line break),
    `metric`, `first_line`, `answers`.
    """
    built = build_tasks(tasks, task_options)
    tokenizer = load_tokenizer(model_name)
    samples = [sample for task in built for sample in task_samples(task, tokenizer)][:limit]
    if not samples:
        raise HeadscoreError("evaluate: the tasks produced no samples")
    with atomic_open(out) as handle:
        for s in samples:
            eos = stop_tokens(s, tokenizer, eos_ids(None, tokenizer), set())[0]
            prompt = s.prompt + answer_prefix
            tokens = len(encode_prompt(tokenizer, prompt, s.template)["input_ids"]) if answer_prefix else s.length
            line = {"id": s.id, "task": s.task, "dataset": s.meta.get("dataset"), "prompt": prompt,
                    "prompt_tokens": tokens, "template": s.template, "max_new_tokens": s.max_new_tokens,
                    "min_new_tokens": s.min_new_tokens, "decoding": "greedy", "stop": s.stop,
                    "eos_token_ids": sorted(eos), "metric": s.metric,
                    "first_line": bool(s.meta.get("first_line")), "answers": s.answers}
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(samples)


def prepare_evaluate(model_name: str, tasks: str, *, options: EvaluateOptions,
                     task_options: dict[str, Any] | None = None, device: str = "auto", dtype: str | None = None,
                     limit: int | None = None) -> EvaluationSetup:
    """Check the tasks and the plan (before loading weights), load the model, build the task samples.

    `tasks`: comma-separated specs (`niah`, `synthetic` or its parts, `longbench:PATH_OR_HF_ID`);
    `task_options`: settings passed to every task that takes them (e.g. lengths, depths, samples_per_length).
    """

    built = build_tasks(tasks, task_options)
    plan_conditions(load_geometry(model_name), options)  # bad methods or scores fail before loading weights
    model, tokenizer = load_model(model_name, device=rank_device(device, ranks()), dtype=dtype)
    samples = [sample for task in built for sample in task_samples(task, tokenizer)]
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise HeadscoreError("evaluate: the tasks produced no samples")
    return EvaluationSetup(model, tokenizer, samples, [task.settings() for task in built])


def run_evaluate(model_name: str, tasks: str, out_dir: str | Path, *, options: EvaluateOptions,
                 task_options: dict[str, Any] | None = None, device: str = "auto", dtype: str | None = None,
                 limit: int | None = None, prefix: PrefixOptions = PrefixOptions(),
                 progress: Callable[[int, int], None] | None = None,
                 decode_batch: int | None = None, batch_size: int = 1) -> EvaluateResult | None:
    """`headscore evaluate` from Python: `prepare_evaluate`, then `evaluate` (None on ranks other than 0)."""
    setup = prepare_evaluate(model_name, tasks, options=options, task_options=task_options, device=device,
                             dtype=dtype, limit=limit)
    return evaluate(setup.model, setup.tokenizer, setup.samples, out_dir, options=options, model_name=model_name,
                    task_settings=setup.task_settings, prefix=prefix, progress=progress, decode_batch=decode_batch,
                    batch_size=batch_size)
