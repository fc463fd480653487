"""`headscore reproduce` / `make reproduce`: the whole study from one YAML config, then `report.md`.

Stages, each writing its own folder under `results/<config>/` (every stage readable alone):

| stage | output | what |
|---|---|---|
| needles | `trials-r2.jsonl`, `trials-retrieval.jsonl` | build-needles for both needle kinds |
| estimate | `scores-r2/`, `scores-retrieval/`, `scores-er/` | head scores (HeadKV format) + heatmaps (`SCORE_SETS`) |
| stability | `stability/` | bootstrap of the r2 scores: how many trials a stable top-k needs (`compare --bootstrap`) |
| allocate | `budgets/` | budget files and heatmaps for a few β |
| evaluate | `evaluate/` | methods × budgets on niah + synthetic tasks |
| tune | `tune/` | β chosen per budget on a validation split, checked on the held-out test split (`tune`) |
| ablate | `ablate/` | top-k vs random vs lowest head ablation |
| latency | `latency/` | prefill, decode and KV bytes vs context length, full vs compressed |
| report | `report.md` | every figure, with the numbers read from the files above |

Estimate, evaluate and latency resume from their journals; a stage whose outputs exist for the same config
section is skipped, so rerunning after an interruption continues where it stopped. Under torchrun
(`NPROC=N make reproduce`) every rank takes part in the estimate, evaluate and tune stages (trials and
samples split over the ranks); rank 0 alone runs the other stages while the others wait at a barrier.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from headscore.compression.allocation import allocate_sweep
from headscore.compression.budgets_file import write_allocations
from headscore.compression.presses import known_parameters, parse_method
from headscore.core import defaults
from headscore.core.distributed import ranks
from headscore.core.errors import HeadscoreError
from headscore.core.files import fingerprint_bytes, write_json
from headscore.core.model import load_geometry
from headscore.evaluation.ablate import execute, prepare
from headscore.evaluation.compare import bootstrap_stability, write_stability
from headscore.evaluation.evaluate import EvaluateOptions, run_evaluate
from headscore.evaluation.latency import run_latency
from headscore.evaluation.tune import DEFAULT_BETA, DEFAULT_GRID, TuneOptions, run_tune
from headscore.scoring.estimate import EstimateOptions, run_estimate_rules
from headscore.scoring.head_scores import read_head_scores
from headscore.scoring.rules import rule_for_scores
from headscore.scoring.trials import build_needle_trials, write_trials
from headscore.study.report import write_report
from headscore.study.stages import SHARED_STAGES, STAGES

# section -> allowed keys (with their defaults); any other key is an error naming the section and key
SCHEMA: dict[str, dict[str, Any]] = {
    "": {"name": None, "model": "smollm2-135m", "seed": 0, "device": "auto", "dtype": None, "note": ""},
    "needles": {"min_length": 1000, "max_length": None, "lengths": 5, "depths": 10, "template": "raw",
                "r2_haystack": None, "retrieval_haystack": None, "span": "answer"},
    "estimate": {"r2_mode": "decode", "retrieval_mode": "decode", "er_mode": "decode", "max_new_tokens": 50,
                 "limit": None, "f1_threshold": 0.5, "rouge_threshold": 0.5, "stop_rule": "newline",
                 "rouge": "plain", "r2_weight": "released"},
    "stability": {"scores": "r2", "draws": 200, "seed": 0, "k": 20, "overlap": 0.9, "share": 0.95,
                  "budget": defaults.BUDGET, "beta": defaults.BETA},
    "allocate": {"budgets": [defaults.BUDGET], "betas": [1.005, defaults.BETA, 1.2, 2.0], "window": defaults.WINDOW,
                 "scores": "r2", "granularity": None},
    "evaluate": {"tasks": "niah,synthetic",
                 "methods": ["full", "snapkv", "pyramidkv", "ada-snapkv", "headkv-r", "headkv-er", "headkv-r2",
                             "razor"],
                 # betas: a β sweep of every headkv method at every budget (head_start_mistral.sh's grid); beta:
                 # the one the other report sections (Table 2, razor) read, one of betas
                 "budgets": list(defaults.EVALUATE_BUDGETS), "beta": defaults.BETA, "betas": None,
                 "window": defaults.WINDOW,
                 "kernel": defaults.KERNEL, "alpha": defaults.ALPHA,
                 "lengths": [1000, 2000, 4000], "depths": [0, 25, 50, 75, 100], "samples_per_length": 2,
                 "max_length": None, "limit": None, "template": None, "num_needles": None,
                 # docs/fidelity.md: the authors' compression settings and LongBench weights
                 "granularity": None, "beyond_prompt": "clamp", "score_dtype": "float32",
                 "pyramid_schedule": "linear", "ada_allocation": "pool", "dtype": None,
                 # razor, razor-kN (and tune's razor baselines): RazorAttention's compensation token, true, false
                 # or both (every razor method both ways; tune's baselines then without)
                 "razor_compensation": False,
                 # compression ratios beside the budgets; any other method parameter (temp, sinks, pyramid_beta, a
                 # scorer's own: `headscore evaluate --help`), as `--param KEY=VALUE`
                 "ratios": [], "params": {},
                 # in-prompt (the paper's protocol) or after (the question asked after compression: RULER's)
                 "question": "in-prompt",
                 "batch_size": 1},  # samples prefilled and decoded together (evaluate --batch-size)
    "tune": {"methods": ["headkv-r2"], "budgets": [64], "betas": list(DEFAULT_GRID), "default_beta": DEFAULT_BETA,
             "baselines": list(defaults.TUNE_BASELINES), "val_fraction": 0.5, "seed": 0, "tasks": "niah",
             "lengths": None, "depths": None},
    "ablate": {"scores": "r2", "ks": [1, 4, 16, 64], "seeds": [0, 1], "conditions": ["top", "random", "lowest"],
               "lengths": [1000, 2000], "depths": [0, 50, 100], "template": "chat", "max_new_tokens": 24,
               "num_needles": None},
    "latency": {"lengths": [1000, 2000, 4000, 8000], "method": "headkv-r2", "budget": defaults.BUDGET,
                "beta": defaults.BETA, "max_new_tokens": 16},
}
SECTIONS = tuple(s for s in SCHEMA if s)
METHOD_KEYS = ("window", "kernel", "alpha", "granularity", "beyond_prompt", "score_dtype", "pyramid_schedule",
               "ada_allocation")  # evaluate-section keys that are method parameters


def method_params(settings: dict[str, Any]) -> dict[str, Any]:
    """The method parameters of an evaluate section (`EvaluateOptions.params`): its named keys, the razor
    compensation, and `params` (any other parameter a method takes; an unknown name is an error)."""
    extra = dict(settings["params"] or {})
    unknown = sorted(set(extra) - known_parameters())
    if unknown:
        raise HeadscoreError(f"reproduce: evaluate.params: no method takes the parameter '{unknown[0]}'")
    return {**{k: settings[k] for k in METHOD_KEYS}, "compensation": settings["razor_compensation"], **extra}
RUN_ONLY = frozenset({"batch_size"})  # settings that change how a stage runs, not what it writes
# the head-score sets the estimate stage writes (`scores-<name>/`): name -> (score rule, needle trials); the
# paper's Table 2: Head-R (retrieval rule, retrieval needles), Head-ER (r2 rule on the retrieval needles),
# Head-R2 (r2 rule, retrieval-reasoning needles). Evaluation names them headkv-r, headkv-er, headkv-r2.
SCORE_SETS = {"r2": ("r2", "r2"), "retrieval": ("retrieval", "retrieval"), "er": ("r2", "retrieval")}
# sections that were renamed: old name -> what to write instead
RENAMED = {"beta_sweep": "section 'beta_sweep' was replaced by 'tune' (β chosen on a validation split, checked on "
                         "held-out samples): rename it and give 'budgets' as a list"}


@dataclass
class StudyConfig:
    """A validated config: `values[section][key]`, defaults filled in; `name` names the results folder."""

    path: Path
    values: dict[str, dict[str, Any]]

    @property
    def name(self) -> str:
        return self.values[""]["name"] or self.path.stem

    def section(self, name: str) -> dict[str, Any]:
        return self.values[name]

    @property
    def top(self) -> dict[str, Any]:
        return self.values[""]

    def fingerprint(self, section: str) -> str:
        """What a stage's outputs depend on: its section (but the run-only `batch_size`) plus the model
        settings."""
        settings = {k: v for k, v in self.values.get(section, {}).items() if k not in RUN_ONLY}
        return fingerprint_bytes(json.dumps([self.top, settings], sort_keys=True, default=str))


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a reproduce config: unknown sections or keys are errors naming them."""

    path = Path(path)
    if not path.is_file():
        raise HeadscoreError(f"reproduce: config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise HeadscoreError(f"reproduce: config {path} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(raw, dict):
        raise HeadscoreError(f"reproduce: config {path} must be a mapping of settings")
    values: dict[str, dict[str, Any]] = {section: dict(defaults) for section, defaults in SCHEMA.items()}
    for key, value in raw.items():
        if key in RENAMED:
            raise HeadscoreError(f"reproduce: config {path}: {RENAMED[key]}")
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise HeadscoreError(f"reproduce: config {path}: section '{key}' must be a mapping")
            for inner, setting in value.items():
                if inner not in SCHEMA[key]:
                    raise HeadscoreError(f"reproduce: config {path}: unknown key '{key}.{inner}' (stage {key} "
                                         f"takes: {', '.join(SCHEMA[key])})")
                values[key][inner] = setting
        elif key in SCHEMA[""]:
            values[""][key] = value
        else:
            raise HeadscoreError(f"reproduce: config {path}: unknown key '{key}' (top-level keys: "
                                 f"{', '.join([*SCHEMA[''], *SECTIONS])})")
    for section, key in (("evaluate", "methods"), ("evaluate", "budgets"), ("allocate", "betas"),
                         ("allocate", "budgets"), ("tune", "betas"),
                         ("tune", "budgets"), ("tune", "methods"), ("ablate", "ks"), ("ablate", "seeds"),
                         ("latency", "lengths")):
        empty_allowed = (section, key) == ("evaluate", "budgets") and values["evaluate"]["ratios"]  # ratios only
        if not isinstance(values[section][key], list) or not (values[section][key] or empty_allowed):
            raise HeadscoreError(f"reproduce: config {path}: '{section}.{key}' must be a non-empty list")
    if not isinstance(values["evaluate"]["ratios"], list):
        raise HeadscoreError(f"reproduce: config {path}: 'evaluate.ratios' must be a list")
    betas = values["evaluate"]["betas"]
    if betas is not None and (not isinstance(betas, list) or values["evaluate"]["beta"] not in betas):
        raise HeadscoreError(f"reproduce: config {path}: 'evaluate.betas' must be a list holding 'evaluate.beta' "
                             f"({values['evaluate']['beta']})")
    return StudyConfig(path=path, values=values)


class Study:
    """Runs the stages of one config into `results/<name>/`, recording what ran in `stages.json`."""

    def __init__(self, config: StudyConfig, results: str | Path = "results",
                 log: Callable[[str], None] = print) -> None:
        self.config = config
        self.root = Path(results) / config.name
        self.log = log
        self.record_path = self.root / "stages.json"
        self.record: dict[str, Any] = (json.loads(self.record_path.read_text()) if self.record_path.is_file()
                                       else {})

    # ------------------------------------------------------------------------------------- bookkeeping

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def require(self, stage: str, *paths: Path) -> None:
        """Missing inputs from an earlier stage: one line naming this stage and the missing piece."""
        for path in paths:
            if not path.exists():
                raise HeadscoreError(f"reproduce stage '{stage}': missing {path} (run the earlier stages first)")

    def done(self, stage: str) -> bool:
        entry = self.record.get(stage)
        return entry is not None and bool(entry) and entry.get("config") == self.config.fingerprint(stage)

    def mark(self, stage: str, seconds: float, **details: Any) -> None:
        previous = self.record.get(stage, {})
        self.record[stage] = {"config": self.config.fingerprint(stage), "seconds": round(seconds, 1),
                              "seconds_total": round(previous.get("seconds_total", 0) + seconds, 1)
                              if previous.get("config") == self.config.fingerprint(stage) else round(seconds, 1),
                              **details}
        write_json(self.record_path, self.record)

    def run(self, stages: Sequence[str] = STAGES, force: bool = False) -> Path:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise HeadscoreError(f"reproduce: unknown stage '{unknown[0]}': use some of {', '.join(STAGES)}")
        where = ranks()
        if where.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            if stage not in stages:
                continue
            where.barrier()  # the previous stage's files (and stages.json) are written
            if where.distributed:
                self.record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {}
            if stage != "report" and self.done(stage) and not force:
                if where.is_main:
                    self.log(f"[{stage}] done already (same config); skipped")
                continue
            if not where.is_main and stage not in SHARED_STAGES:
                continue
            if where.is_main:
                self.log(f"[{stage}] running")
            began = time.perf_counter()
            try:
                details = getattr(self, f"stage_{stage}")() or {}
            except HeadscoreError as error:
                if str(error).startswith("reproduce"):
                    raise
                raise HeadscoreError(f"reproduce stage '{stage}': {error}") from error
            if where.is_main:
                self.mark(stage, time.perf_counter() - began, **details)
                self.log(f"[{stage}] finished in {time.perf_counter() - began:.1f} s")
        where.barrier()
        return self.path("report.md")

    # ------------------------------------------------------------------------------------- stages

    def stage_needles(self) -> dict[str, Any]:

        settings = dict(self.config.section("needles"))
        haystacks = {"r2": settings.pop("r2_haystack"), "retrieval": settings.pop("retrieval_haystack")}
        counts = {}
        for kind, short in (("reasoning", "r2"), ("retrieval", "retrieval")):
            trials = build_needle_trials(self.config.top["model"], kind=kind, haystack=haystacks[short], **settings,
                                         warn=self.log)
            write_trials(self.path(f"trials-{short}.jsonl"), trials)
            counts[short] = len(trials)
        return {"trials": counts}

    def stage_estimate(self) -> dict[str, Any]:
        """Every score set of `SCORE_SETS`; the sets on one needle kind's trials in one mode run as one pass
        (`run_estimate_rules`: the retrieval trials once for `retrieval` and `er`)."""
        settings = self.config.section("estimate")
        top = self.config.top
        groups: list[tuple[str, str, dict[str, str]]] = []  # (needles, mode, {rule: score set})
        for name, (rule, needles) in SCORE_SETS.items():
            mode = settings[f"{name}_mode"]
            group = next((g for g in groups if g[:2] == (needles, mode) and rule not in g[2]), None)
            if group is None:
                groups.append((needles, mode, {rule: name}))
            else:
                group[2][rule] = name
        found = {}
        for needles, mode, sets in groups:
            trials = self.path(f"trials-{needles}.jsonl")
            self.require("estimate", trials)
            options = EstimateOptions(rule=next(iter(sets)), mode=mode,
                                      f1_threshold=settings["f1_threshold"],
                                      rouge_threshold=settings["rouge_threshold"],
                                      max_new_tokens=settings["max_new_tokens"], stop_rule=settings["stop_rule"],
                                      rouge=settings["rouge"], r2_weight=settings["r2_weight"])
            if len(sets) > 1:
                self.log(f"estimate: {', '.join(f'scores-{name}' for name in sets.values())} from one "
                         f"{options.mode} pass over trials-{needles}")
            results = run_estimate_rules(top["model"], trials,
                                         {rule: self.path(f"scores-{name}") for rule, name in sets.items()},
                                         options=options, device=top["device"], dtype=top["dtype"],
                                         limit=settings["limit"])
            for rule, name in sets.items():
                if results is not None:  # None on ranks other than 0
                    result = results[rule]
                    found[name] = {"run": result.run, "counted": result.counted, "mode": options.mode}
        return {"estimate": {name: found[name] for name in SCORE_SETS if name in found}}

    def scores_file(self, which: str, stage: str) -> Path:
        """The study's head scores named `which`: a rule (r2, retrieval) or its scores name (r2, r)."""
        rule = rule_for_scores(which)
        path = self.path(f"scores-{rule.name if rule else which}", "head_scores.json")
        self.require(stage, path)
        return path

    def method_scores(self, methods: Sequence[str], stage: str) -> dict[str, str]:
        """The score files `methods` need (headkv-r, headkv-er, headkv-r2, razor ...), by score-set name."""
        scores = {}
        for method in methods:
            try:
                needs = parse_method(method).head_scores
            except HeadscoreError:  # an unknown method: the stage's own check names it
                needs = None
            if needs:
                scores[needs] = str(self.scores_file(needs, stage))
        return scores

    def stage_stability(self) -> dict[str, Any]:
        s = self.config.section("stability")
        geometry = load_geometry(self.config.top["model"])
        scores = read_head_scores(self.scores_file(s["scores"], "stability"), geometry.layers, geometry.query_heads)
        if not scores.num_trials:  # nothing counted: the report says so
            write_json(self.path("stability", "stability.json"), {"source": s["scores"], "trials": 0, "rows": []})
            return {"trials": 0, "stable_at": None}
        result = bootstrap_stability(scores, geometry=geometry, draws=int(s["draws"]), seed=int(s["seed"]),
                                     k=int(s["k"]), overlap=float(s["overlap"]), share=float(s["share"]),
                                     budget=int(s["budget"]), beta=float(s["beta"]),
                                     window=self.config.section("evaluate")["window"],
                                     source=f"scores-{s['scores']}/head_scores.json")
        write_stability(result, self.path("stability"))
        return {"trials": result.trials, "stable_at": result.stable_at}

    def stage_allocate(self) -> dict[str, Any]:

        settings = self.config.section("allocate")
        geometry = load_geometry(self.config.top["model"])
        scores = read_head_scores(self.scores_file(settings["scores"], "allocate"), geometry.layers,
                                  geometry.query_heads)
        results = allocate_sweep("headkv", geometry, [int(b) for b in settings["budgets"]],
                                 [float(b) for b in settings["betas"]], window=settings["window"], scores=scores,
                                 granularity=settings["granularity"])
        out = self.path("budgets")
        files = write_allocations(results, out / "budgets.json", split=True, plot=out / "budgets.png")
        return {"files": [path.stem for path in files]}

    def _evaluate(self, stage: str, out: Path, *, tasks: str, methods: Sequence[str], budgets: Sequence[int],
                  betas: Sequence[float], lengths: Any, depths: Any) -> dict[str, Any]:

        settings = self.config.section("evaluate")
        top = self.config.top
        scores = self.method_scores(methods, stage)
        options = EvaluateOptions(methods=list(methods), budgets=[int(b) for b in budgets],
                                  ratios=[float(r) for r in settings["ratios"]], scores=scores,
                                  betas=[float(b) for b in betas], params=method_params(settings),
                                  question=settings["question"])
        task_options = {"lengths": lengths, "depths": depths, "template": settings["template"],
                        "num_needles": settings["num_needles"],
                        "samples_per_length": settings["samples_per_length"], "max_length": settings["max_length"]}
        result = run_evaluate(top["model"], tasks, out, options=options, task_options=task_options,
                              device=top["device"], dtype=settings["dtype"] or top["dtype"], limit=settings["limit"],
                              batch_size=int(settings["batch_size"]))
        return {"samples": result.samples} if result is not None else {}

    def stage_evaluate(self) -> dict[str, Any]:
        s = self.config.section("evaluate")
        return self._evaluate("evaluate", self.path("evaluate"), tasks=s["tasks"], methods=s["methods"],
                              budgets=s["budgets"], betas=s["betas"] or [s["beta"]], lengths=s["lengths"],
                              depths=s["depths"])

    def stage_tune(self) -> dict[str, Any]:
        s, e = self.config.section("tune"), self.config.section("evaluate")
        top = self.config.top
        scores = self.method_scores(s["methods"], "tune")
        options = TuneOptions(methods=list(s["methods"]), budgets=[int(b) for b in s["budgets"]], scores=scores,
                              betas=[float(b) for b in s["betas"]], default_beta=float(s["default_beta"]),
                              baselines=list(s["baselines"]), val_fraction=float(s["val_fraction"]),
                              seed=int(s["seed"]),  # tune's razor baselines: without the token under "both"
                              params={**method_params(e), "compensation": e["razor_compensation"] is True})
        task_options = {"lengths": s["lengths"] or e["lengths"], "depths": s["depths"] or e["depths"],
                        "template": e["template"], "num_needles": e["num_needles"],
                        "samples_per_length": e["samples_per_length"], "max_length": e["max_length"]}
        result = run_tune(top["model"], s["tasks"], self.path("tune"), options=options, task_options=task_options,
                          device=top["device"], dtype=top["dtype"], limit=e["limit"], batch_size=int(e["batch_size"]))
        if result is None:  # a rank other than 0
            return {}
        return {"validation_samples": result.val_samples, "test_samples": result.test_samples,
                "chosen": {f"{r['method']} B{r['budget']}": r["chosen_beta"] for r in result.comparison}}

    def stage_ablate(self) -> dict[str, Any]:

        s = self.config.section("ablate")
        top = self.config.top
        setup = prepare(top["model"], self.scores_file(s["scores"], "ablate"), ks=s["ks"], seeds=s["seeds"],
                        conditions=s["conditions"], lengths=s["lengths"], depths=s["depths"],
                        template=s["template"], max_new_tokens=s["max_new_tokens"], num_needles=s["num_needles"],
                        device=top["device"],
                        dtype=top["dtype"])
        rows, _ = execute(setup, self.path("ablate"))
        return {"generations": setup.total}

    def stage_latency(self) -> dict[str, Any]:

        s = self.config.section("latency")
        top = self.config.top
        spec = parse_method(s["method"])
        scores = str(self.scores_file(spec.head_scores, "latency")) if spec.head_scores else None
        rows = run_latency(top["model"], self.path("latency"), lengths=s["lengths"], method=s["method"],
                           label=s["method"], budget=s["budget"], beta=s["beta"], scores=scores,
                           max_new_tokens=s["max_new_tokens"], device=top["device"], dtype=top["dtype"])
        return {"lengths": len(rows)}

    def stage_report(self) -> dict[str, Any]:

        write_report(self)
        return {}


def run_study(config_path: str | Path, *, results: str | Path = "results", stages: Sequence[str] = STAGES,
              force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run (or continue) the study of `config_path`; returns the path of its report."""

    config = load_config(config_path)
    torch.manual_seed(config.top["seed"])
    return Study(config, results, log).run(stages, force)

