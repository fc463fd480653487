"""`headscore tune`: choose HeadKV's β per budget on a validation split, then check it on held-out samples.

1. The samples are split into validation and test with a fixed seed (`split_samples`: per task, a seeded
   permutation of the samples sorted by id; `val_fraction` of each task goes to validation).
2. Every β of the grid runs on the validation samples only, through `evaluate` (each sample prefilled once,
   every (budget, β) compressed from that one state), into `validation/`.
3. Per (method, budget) the β with the best mean validation score wins. Ties (scores equal to 1e-9) go to the
   β whose shared pool, floor((B − w) / β) per head, is closest to the default β's pool (the smallest change
   from the default allocation), then to the β closest to the default on a log scale.
4. The chosen β, the default β and the baselines (snapkv, ada-snapkv) run on the test samples (`test/`); the
   held-out gain is the tuned minus the default test score.

Outputs in the run folder: `tuned_budgets.json` (every chosen (method, budget) in the one budgets format, each
entry's `tuning` saying how its β was chosen) and one `tuned_budgets_<method>_B<budget>.json` per entry (a
single budgets object, for `compress --budgets` and the like), `validation.csv` and `validation_vs_beta.png`
(validation score vs β per budget), `comparison.csv` (the test-split comparison), `tune.md` (both tables),
`metadata.json` (the split, the options, the versions). Both evaluation folders resume from their journals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from headscore.compression.allocation import allocate
from headscore.compression.budgets import Budgets, check_beta, check_budget, pool_share
from headscore.compression.budgets_file import read_budget_sweep, write_budgets
from headscore.compression.presses import make_press, parse_method
from headscore.core.defaults import (
    BETA,
    BETA_GRID,
    TEMP,
    TUNE_BASELINES,
    TUNE_BUDGETS,
)
from headscore.core.distributed import ranks
from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_open, atomic_write_text, fingerprint_file, versions, write_json
from headscore.core.model import Geometry, input_device
from headscore.core.plots import line_plot
from headscore.evaluation.evaluate import (
    Condition,
    EvaluateOptions,
    evaluate,
    plan_conditions,
    prepare_evaluate,
    scores_option,
)
from headscore.scoring.head_scores import read_head_scores

DEFAULT_GRID = BETA_GRID
DEFAULT_BETA = BETA
TIE = 1e-9


def tuned_method(budgets: Budgets) -> str:
    """The evaluation method a tuned `Budgets` was chosen for (its `tuning` record)."""
    if budgets.tuning is None:
        raise HeadscoreError("tune: a budgets entry without its tuning record")
    return str(budgets.tuning["method"])


def tunable(method: str) -> bool:
    """Whether an evaluation method takes a β to tune (HeadKV's allocation on named head scores:
    `headkv-NAME`, `SCORER@headkv-NAME`)."""
    spec = parse_method(method)
    return "beta" in spec.parameters() and spec.head_scores is not None


TUNED_FILE = "tuned_budgets.json"
VALIDATION_DIR = "validation"
TEST_DIR = "test"
VALIDATION_TABLE = "validation.csv"
VALIDATION_FIGURE = "validation_vs_beta.png"
COMPARISON_TABLE = "comparison.csv"
SUMMARY_FILE = "tune.md"
METADATA_FILE = "metadata.json"
RULE = ("best mean validation score; ties (within 1e-9) to the beta whose shared pool floor((B-w)/beta) is "
        "closest to the default beta's, then to the beta closest to the default")


@dataclass
class TuneOptions:
    """What to tune: `methods` (headkv-NAME or SCORER@headkv-NAME, each needing its file in `scores` under NAME,
    as in `EvaluateOptions`) at every budget over the β grid `betas`; `baselines` (any evaluation method without
    a β, razor-kN included) run on the test split beside the tuned and the `default_beta` allocation. `params`:
    the method parameters, as `EvaluateOptions.params`."""

    methods: Sequence[str] = ("headkv-r2",)
    budgets: Sequence[int] = TUNE_BUDGETS
    scores: dict[str, str] = field(default_factory=dict)
    betas: Sequence[float] = DEFAULT_GRID
    default_beta: float = DEFAULT_BETA
    baselines: Sequence[str] = TUNE_BASELINES
    val_fraction: float = 0.5
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def window(self) -> int:
        return self.evaluate_options([], []).window

    def check(self) -> None:
        """Bad values fail here, before any model is loaded."""
        if not self.methods:
            raise HeadscoreError("tune: no method given (use headkv-NAME for --scores NAME=FILE)")
        for method in self.methods:
            if not tunable(method):
                raise HeadscoreError(f"tune: method '{method}' has no β to tune: use headkv-NAME or "
                                     "SCORER@headkv-NAME")
            needs = parse_method(method).head_scores or ""
            if not self.scores.get(needs):
                raise HeadscoreError(f"tune: method {method} needs {scores_option(needs)}")
        for method in self.baselines:
            try:
                known = not tunable(method)
            except HeadscoreError:  # not a method at all
                known = False
            if not known:
                raise HeadscoreError(f"tune: unknown baseline '{method}': use any evaluation method without a β "
                                     "(full, snapkv, ada-snapkv, SCORER@ALLOCATION, razor, razor-kN, ...)")
        if not self.budgets:
            raise HeadscoreError("tune: no budget given")
        for budget in self.budgets:
            check_budget(budget, self.window)
        if not self.betas:
            raise HeadscoreError("tune: the β grid is empty")
        for beta in (*self.betas, self.default_beta):
            check_beta(beta)
        if len(set(self.betas)) != len(self.betas):
            raise HeadscoreError("tune: the β grid repeats a value")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise HeadscoreError(f"tune: --val-fraction must lie strictly between 0 and 1, got {self.val_fraction}")

    def evaluate_options(self, methods: Sequence[str], betas: Sequence[float]) -> EvaluateOptions:
        """The `EvaluateOptions` of one evaluation phase."""
        return EvaluateOptions(methods=list(methods), budgets=[int(b) for b in self.budgets],
                               scores=dict(self.scores), betas=[float(b) for b in betas], params=dict(self.params))


def split_samples(samples: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(validation, test), each in the input order. Per task, the samples sorted by id are permuted by a
    generator seeded with `seed`; the first round(val_fraction × n) go to validation (at least one to each
    side when the task has two or more). The split depends only on the sample ids, the fraction and the seed."""
    if len({s.id for s in samples}) != len(samples):
        raise HeadscoreError("tune: sample ids repeat; the split needs unique ids")
    generator = torch.Generator().manual_seed(seed)
    validation: set[str] = set()
    for task in sorted({s.task for s in samples}):
        ids = sorted(s.id for s in samples if s.task == task)
        take = math.floor(val_fraction * len(ids) + 0.5)
        take = min(max(take, 1), len(ids) - 1) if len(ids) > 1 else take
        order = torch.randperm(len(ids), generator=generator).tolist()
        validation.update(ids[i] for i in order[:take])
    val = [s for s in samples if s.id in validation]
    test = [s for s in samples if s.id not in validation]
    if not val or not test:
        raise HeadscoreError(f"tune: {len(samples)} sample(s) give an empty {'validation' if not val else 'test'} "
                             "split; use more samples (more lengths, depths or needles)")
    return val, test


def choose_beta(scores: dict[float, float], budget: int, window: int, default_beta: float) -> float:
    """The β with the best score in `scores` (β -> mean validation score); ties as in the module docstring."""
    best = max(scores.values())
    inner = budget - window
    default_pool = pool_share(inner, default_beta)
    tied = [beta for beta, value in scores.items() if value >= best - TIE]
    return min(tied, key=lambda beta: (abs(pool_share(inner, beta) - default_pool),
                                       abs(math.log(beta) - math.log(default_beta)), beta))


@dataclass
class TuneResult:
    out_dir: Path
    validation: list[dict[str, Any]]
    comparison: list[dict[str, Any]]
    tuned: list[Budgets]
    files: list[Path]
    val_samples: int
    test_samples: int


def validation_table(rows: Sequence[dict[str, Any]], options: TuneOptions) -> list[dict[str, Any]]:
    """Mean validation score per (method, budget, β) with its pool and whether it was chosen."""
    frame = pd.DataFrame(rows)
    frame["base"] = frame["method"].str.split(" ").str[0]
    table = []
    for method in options.methods:
        for budget in options.budgets:
            group = frame[(frame["base"] == method) & (frame["budget"] == budget)]
            means = {float(beta): float(g["score"].mean()) for beta, g in group.groupby("beta")}
            chosen = choose_beta(means, int(budget), options.window, options.default_beta)
            for beta in options.betas:
                table.append({"method": method, "budget": int(budget), "beta": float(beta),
                              "pool_per_head": pool_share(int(budget) - options.window, float(beta)),
                              "score": means[float(beta)], "samples": int(group["sample"].nunique()),
                              "chosen": float(beta) == chosen})
    return table


def tuned_budgets(geometry: Geometry, table: Sequence[dict[str, Any]], options: TuneOptions,
                  val_samples: int) -> list[Budgets]:
    """One `Budgets` per (method, budget) at its chosen β, carrying how the β was chosen in `tuning`."""
    loaded = {}
    result = []
    for method in options.methods:
        needs = parse_method(method).head_scores or ""
        if needs not in loaded:
            loaded[needs] = read_head_scores(options.scores[needs], geometry.layers, geometry.query_heads)
        for budget in options.budgets:
            rows = [r for r in table if r["method"] == method and r["budget"] == int(budget)]
            chosen = next(r["beta"] for r in rows if r["chosen"])
            budgets = allocate("headkv", geometry, int(budget), window=options.window, beta=chosen,
                               temp=options.params.get("temp") or TEMP, granularity=options.params.get("granularity"),
                               scores=loaded[needs])
            budgets.tuning = {
                "method": method, "chosen_beta": chosen, "default_beta": float(options.default_beta),
                "rule": RULE, "validation_scores": {f"{r['beta']:g}": r["score"] for r in rows},
                "validation_samples": val_samples, "val_fraction": float(options.val_fraction),
                "seed": int(options.seed), "scores_file": str(options.scores[needs]),
                "scores_file_fingerprint": fingerprint_file(options.scores[needs]),
            }
            result.append(budgets)
    return result


def test_conditions(geometry: Geometry, tuned: Sequence[Budgets], options: TuneOptions) -> list[Condition]:
    """Baselines, then per tuned (method, budget): "<method> default" (default β) and "<method> tuned"."""
    conditions = []
    if options.baselines:
        conditions += plan_conditions(geometry, options.evaluate_options(options.baselines, [options.default_beta]))
    for budgets in tuned:
        method = tuned_method(budgets)
        default = plan_conditions(geometry, replace(options.evaluate_options([method], [options.default_beta]),
                                                    budgets=[budgets.budget]))[0]
        conditions.append(replace(default, label=f"{method} default"))
        spec = parse_method(method)
        scoring = "+".join([spec.scorer or "snapkv", *spec.modifiers])
        press = make_press(f"{scoring}@headkv", geometry, settings={**options.params, "budgets": budgets})
        conditions.append(Condition(method=method, budget=budgets.budget, beta=budgets.beta, press=press,
                                    label=f"{method} tuned"))
    return conditions


def comparison_table(test_rows: Sequence[dict[str, Any]], validation: Sequence[dict[str, Any]],
                     tuned: Sequence[Budgets], options: TuneOptions) -> list[dict[str, Any]]:
    """Per tuned (method, budget): chosen β, validation and test scores of tuned and default β, the held-out
    gain, and the baselines' test scores at that budget (a baseline that takes no budget, full or razor-kN: its
    one score at every budget)."""
    frame = pd.DataFrame(test_rows)
    means = frame.groupby(["method", "budget"])["score"].mean().to_dict()
    unbudgeted = frame[frame["budget"].isna()].groupby("method")["score"].mean().to_dict()
    table = []
    for budgets in tuned:
        method, budget = tuned_method(budgets), budgets.budget
        val = {r["beta"]: r["score"] for r in validation if r["method"] == method and r["budget"] == budget}
        tuned_score, default_score = means[(f"{method} tuned", budget)], means[(f"{method} default", budget)]
        table.append({"method": method, "budget": budget, "chosen_beta": budgets.beta,
                      "default_beta": float(options.default_beta),
                      "val_tuned": val[budgets.beta], "val_default": val.get(float(options.default_beta)),
                      "test_tuned": tuned_score, "test_default": default_score,
                      "test_gain": tuned_score - default_score,
                      **{f"test[{b}]": means.get((b, budget), unbudgeted.get(b)) for b in options.baselines}})
    return table


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "✓" if value else ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(header: list[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_markdown(comparison: Sequence[dict[str, Any]], baselines: Sequence[str]) -> str:
    """The test-split comparison as a markdown table."""
    return markdown(["method", "budget", "chosen β", "val (chosen)", "val (default β)", "test (chosen)",
                     "test (default β)", "held-out gain", *baselines],
                    [[r["method"], r["budget"], f"{r['chosen_beta']:g}", r["val_tuned"], r["val_default"],
                      r["test_tuned"], r["test_default"], f"{r['test_gain']:+.3f}",
                      *[r[f"test[{b}]"] for b in baselines]] for r in comparison])


def validation_markdown(validation: Sequence[dict[str, Any]]) -> str:
    """The validation table (one row per method, budget and β) as markdown."""
    return markdown(["method", "budget", "β", "pool per head", "validation score", "chosen"],
                    [[r["method"], r["budget"], f"{r['beta']:g}", r["pool_per_head"], r["score"], r["chosen"]]
                     for r in validation])


def tune(model: Any, tokenizer: Any, samples: Sequence[Any], out_dir: str | Path, *, options: TuneOptions,
         model_name: str, task_settings: Sequence[dict[str, Any]] = (),
         progress: Callable[[str, int, int], None] | None = None,
         decode_batch: int | None = None, batch_size: int = 1) -> TuneResult | None:
    """Split, evaluate the grid on validation, choose β per budget, evaluate on test; write the outputs.

    `progress(phase, done, total)` with phase "validation" or "test". Resumes both phases' journals. Under a
    launcher both phases split their samples over the ranks; rank 0 chooses β and writes the outputs (the
    others read its choice) and returns the result, the other ranks None. `decode_batch`, `batch_size`: as in
    `evaluate`.
    """
    options.check()
    out_dir = Path(out_dir)
    geometry = Geometry.from_config(model.config)
    val, test = split_samples(samples, options.val_fraction, options.seed)
    began = time.perf_counter()

    def phase(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    grid = options.evaluate_options(options.methods, options.betas)
    val_result = evaluate(model, tokenizer, val, out_dir / VALIDATION_DIR, options=grid, model_name=model_name,
                          task_settings=task_settings, progress=phase("validation"), figures=False,
                          decode_batch=decode_batch, batch_size=batch_size)
    where = ranks()
    files = [out_dir / TUNED_FILE]
    if val_result is not None:  # rank 0 (or one process) holds the validation rows and chooses
        validation = validation_table(val_result.rows, options)
        tuned = tuned_budgets(geometry, validation, options, len(val))
        write_budgets(out_dir / TUNED_FILE, tuned)
        for budgets in tuned:
            path = out_dir / f"tuned_budgets_{tuned_method(budgets)}_B{budgets.budget}.json"
            write_budgets(path, budgets)
            files.append(path)
    where.barrier()
    if val_result is None:  # the other ranks take rank 0's choice from its file
        tuned = read_budget_sweep(out_dir / TUNED_FILE, geometry)

    conditions = test_conditions(geometry, tuned, options)
    test_result = evaluate(model, tokenizer, test, out_dir / TEST_DIR,
                           options=options.evaluate_options([*options.baselines, *options.methods],
                                                            [options.default_beta]),
                           model_name=model_name, task_settings=task_settings, progress=phase("test"),
                           conditions=conditions, decode_batch=decode_batch, batch_size=batch_size)
    if test_result is None:  # a rank other than 0: rank 0 writes the outputs
        return None
    comparison = comparison_table(test_result.rows, validation, tuned, options)

    with atomic_open(out_dir / VALIDATION_TABLE) as handle:
        pd.DataFrame(validation).to_csv(handle, index=False)
    with atomic_open(out_dir / COMPARISON_TABLE) as handle:
        pd.DataFrame(comparison).to_csv(handle, index=False)
    series = {}
    for method in options.methods:
        for budget in options.budgets:
            rows = [r for r in validation if r["method"] == method and r["budget"] == int(budget)]
            series[f"{method}, KV size {budget}"] = ([r["beta"] for r in rows], [r["score"] for r in rows], None)
    line_plot(series, out_dir / VALIDATION_FIGURE, title=f"validation score vs β ({len(val)} samples)",
              xlabel="β (larger = smaller shared pool)", ylabel="mean validation score", xscale="linear")
    atomic_write_text(out_dir / SUMMARY_FILE, (
        f"# β tuning: {model_name}\n\n{len(val)} validation and {len(test)} test samples (val fraction "
        f"{options.val_fraction:g}, seed {options.seed}). Rule: {RULE}.\n\n## Validation\n\n"
        f"{validation_markdown(validation)}\n![validation score vs beta]({VALIDATION_FIGURE})\n\n"
        f"## Test split\n\n{comparison_markdown(comparison, options.baselines)}"))
    files += [out_dir / name for name in (VALIDATION_TABLE, VALIDATION_FIGURE, COMPARISON_TABLE, SUMMARY_FILE,
                                          METADATA_FILE)]
    write_json(out_dir / METADATA_FILE, {
        "model": model_name, "geometry": geometry.to_dict(),
        "options": {**asdict(options), "methods": list(options.methods), "budgets": list(options.budgets),
                    "betas": list(options.betas), "baselines": list(options.baselines)},
        "scores_fingerprints": {k: fingerprint_file(v) for k, v in sorted(options.scores.items())},
        "split": {"validation": [s.id for s in val], "test": [s.id for s in test]},
        "tasks": list(task_settings), "rule": RULE,
        "dtype": str(model.dtype).removeprefix("torch."), "device": str(input_device(model)),
        "seconds_this_run": round(time.perf_counter() - began, 2), "versions": versions(),
    })
    return TuneResult(out_dir=out_dir, validation=validation, comparison=comparison, tuned=tuned, files=files,
                      val_samples=len(val), test_samples=len(test))


def run_tune(model_name: str, tasks: str, out_dir: str | Path, *, options: TuneOptions,
             task_options: dict[str, Any] | None = None, device: str = "auto", dtype: str | None = None,
             limit: int | None = None, progress: Callable[[str, int, int], None] | None = None,
             decode_batch: int | None = None, batch_size: int = 1) -> TuneResult | None:
    """`headscore tune` from Python: check the options, load the model and the task samples, `tune`."""
    options.check()
    setup = prepare_evaluate(model_name, tasks, options=options.evaluate_options(
        [*options.baselines, *options.methods], options.betas), task_options=task_options, device=device,
        dtype=dtype, limit=limit)
    return tune(setup.model, setup.tokenizer, setup.samples, out_dir, options=options, model_name=model_name,
                task_settings=setup.task_settings, progress=progress, decode_batch=decode_batch,
                batch_size=batch_size)
