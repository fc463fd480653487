"""Head ablation: zero the output of chosen query heads and measure needle-in-a-haystack accuracy.

If the head scores mean something, removing the `k` highest-scoring heads hurts retrieval far more than
removing `k` random heads, and removing the `k` lowest-scoring heads hurts least. A head is removed by a
forward pre-hook on each layer's `self_attn.o_proj` that multiplies its `[..., heads * head_dim]` input by a
per-head 0/1 mask (one `[heads, 1]` tensor per layer, broadcast over `head_dim`; no loop over heads). A sample's
conditions decode together, one batch row per condition with its own mask (`[rows, 1, heads, 1]`).

The prompt's prefill is shared among conditions as far as their masks agree (`HeadAblation.prefill`): a decoder
layer runs once per distinct ablation of the layers up to it, so conditions that remove no head before layer L
compute layers 0..L-1 once together (a fifth of the default study's layer passes).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headscore.compression.generation import decode_rows
from headscore.core.decoding import StopRule
from headscore.core.defaults import TEMPLATE
from headscore.core.errors import HeadscoreError
from headscore.core.files import atomic_write_text, fingerprint_file, versions, write_json
from headscore.core.kv_cache import growing_cache
from headscore.core.model import (
    Geometry,
    eos_ids,
    input_device,
    load_geometry,
    load_model,
    load_tokenizer,
    resolve_device,
    with_cache,
)
from headscore.core.plots import line_plot
from headscore.core.prompts import encode_prompt
from headscore.evaluation.tasks import Sample, get_task, score, task_samples
from headscore.scoring.head_scores import read_head_scores

CONDITIONS = ("top", "random", "lowest")
CSV_FIELDS = ("condition", "k", "seed", "accuracy", "n")


def select_heads(importance: torch.Tensor, k: int, condition: str, seed: int = 0) -> torch.Tensor:
    """Flat indices `layer * heads + head` (`[k]`, int64) of the heads to remove, from `[layers, heads]`.

    `top`: the k highest scores; `lowest`: the k lowest; `random`: k heads drawn uniformly with `seed`.
    Ties in `top`/`lowest` are broken by one fixed random order (seed 0), not by layer, so heads tied at zero
    are not all taken from the first layers.
    """
    total = importance.numel()
    if not 0 <= k <= total:
        raise HeadscoreError(f"cannot remove {k} heads: the model has {total} query heads")
    if condition == "random":
        return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:k]
    if condition not in ("top", "lowest"):
        raise HeadscoreError(f"unknown ablation condition '{condition}': use one of {', '.join(CONDITIONS)}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(0))
    ranked = torch.argsort(importance.flatten().double()[order], descending=condition == "top", stable=True)
    return order[ranked[:k]]


def ablation_mask(heads: torch.Tensor, layers: int, num_heads: int) -> torch.Tensor:
    """`[layers, heads]` float mask: 0 at the flat head indices in `heads`, 1 elsewhere."""
    mask = torch.ones(layers * num_heads)
    mask[heads.long()] = 0.0
    return mask.view(layers, num_heads)


def attention_modules(model: Any) -> list[Any]:
    """The `self_attn` module of each scored decoder layer (the full-attention ones of a hybrid model, the rows
    of its head scores), in layer order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "o_proj")
                                 for layer in layers):
        raise HeadscoreError("head ablation needs decoder layers with self_attn.o_proj (llama-style models)")
    return [layers[index].self_attn for index in Geometry.from_config(model.config).model_layers]


class HeadAblation:
    """Context manager that zeroes the heads where `mask` is 0, by o_proj pre-hooks.

    `mask`: `[layers, heads]` (every batch row alike) or `[rows, layers, heads]` (one ablation per batch row:
    conditions decoded together); `select_rows` follows the batch when rows leave it. Only layers with a
    removed head get a hook; hooks are removed on exit.
    """

    def __init__(self, model: torch.nn.Module, mask: torch.Tensor):
        self.modules = attention_modules(model)
        if mask.shape[-2] != len(self.modules):
            raise HeadscoreError(f"ablation mask has {mask.shape[-2]} layers, the model {len(self.modules)}")
        self.mask = mask
        self.factors: dict[int, torch.Tensor] = {}  # layer -> [heads, 1] or [rows, 1, heads, 1]
        self.handles: list[Any] = []

    def __enter__(self) -> HeadAblation:
        heads = self.mask.shape[-1]
        per_row = self.mask.ndim == 3
        for layer, attn in enumerate(self.modules):
            layer_mask = self.mask[..., layer, :]
            if bool((layer_mask != 1).any()):
                weight = attn.o_proj.weight
                factor = layer_mask.to(weight.device, weight.dtype)
                self.factors[layer] = factor[:, None, :, None] if per_row else factor.view(heads, 1)
                self.handles.append(attn.o_proj.register_forward_pre_hook(self._hook(layer, heads)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def prefill(self, model: Any, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Prefill one prompt `input_ids` `[1, n]` into `cache` for every row of the per-row mask: the last
        logits `[rows, vocab]`, and `cache` holding each row's keys and values, as a prefill of the prompt
        repeated once per row gives.

        Rows share a decoder layer's pass while their masks agree on every scored layer up to it (`layer_groups`):
        a forward pre-hook on each decoder layer splits the hidden states `[groups, n, hidden]` into the next
        layer's groups, and each o_proj hook uses one mask per group. The cache's layers are expanded to the rows
        at the end (`batch_select_indices` with repeated indices)."""
        if self.mask.ndim != 3 or input_ids.shape[0] != 1:
            raise HeadscoreError("a shared ablation prefill takes one prompt and one mask per row")
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        scored = Geometry.from_config(model.config).model_layers
        groups = layer_groups(self.mask, scored, len(decoder.layers))
        row_factors = self.factors
        firsts = [first_rows(inverse) for inverse in groups]
        handles = []
        try:
            # each o_proj hook uses the masks of its layer's groups (one representative row per group)
            self.factors = {slot: factor[firsts[scored[slot]].to(factor.device)]
                            for slot, factor in row_factors.items()}
            for index, layer in enumerate(decoder.layers):
                parents = groups[index - 1][firsts[index]] if index else torch.zeros_like(firsts[index])
                if index == 0 or not torch.equal(parents, torch.arange(len(parents))):
                    handles.append(layer.register_forward_pre_hook(split_hidden(parents), with_kwargs=True))
            logits = model(input_ids=input_ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits
        finally:
            for handle in handles:
                handle.remove()
            self.factors = row_factors
        for index, inverse in enumerate(groups):
            cache.layers[index].batch_select_indices(inverse.to(input_ids.device))
        return logits[groups[-1].to(logits.device), -1]

    def select_rows(self, indices: torch.Tensor) -> None:
        """Keep the per-row masks of batch rows `indices` (as the cache keeps their rows)."""
        if self.mask.ndim == 3:
            self.factors = {layer: factor[indices.to(factor.device)] for layer, factor in self.factors.items()}

    def _hook(self, layer: int, heads: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]  # [rows, ..., heads * head_dim], head-major
            masked = (x.unflatten(-1, (heads, x.shape[-1] // heads)) * self.factors[layer]).flatten(-2)
            return (masked, *args[1:])

        return hook


def layer_groups(mask: torch.Tensor, scored: Sequence[int], layers: int) -> list[torch.Tensor]:
    """Per decoder layer, the group of each row (`[rows]` int64, numbered 0..groups-1): rows are in one group
    while their masks (`[rows, scored layers, heads]`) agree on every scored layer at or before it (`scored`:
    the decoder index of each mask layer)."""
    rows = mask.shape[0]
    groups, seen = [], 0
    for index in range(layers):
        while seen < len(scored) and scored[seen] <= index:
            seen += 1
        if seen == 0:
            groups.append(torch.zeros(rows, dtype=torch.long))
        else:
            groups.append(torch.unique(mask[:, :seen].flatten(1), dim=0, return_inverse=True)[1].long())
    return groups


def first_rows(inverse: torch.Tensor) -> torch.Tensor:
    """The first row of each group (`inverse`: each row's group, `[rows]`): `[groups]`."""
    rows = torch.arange(inverse.shape[0])
    first = torch.full((int(inverse.max()) + 1,), inverse.shape[0], dtype=torch.long)
    return first.scatter_reduce(0, inverse, rows, reduce="amin")


def split_hidden(parents: torch.Tensor) -> Callable:
    """A decoder-layer forward pre-hook giving each group the hidden states of its parent group (`parents`:
    `[groups]` indices into the previous layer's groups)."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0].index_select(0, parents.to(args[0].device)), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": hidden.index_select(0, parents.to(hidden.device))}

    return hook


def greedy_answers(model: Any, tokenizer: Any, sample: Sample, masks: torch.Tensor,
                   max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers of one sample under each of `masks` (`[rows, layers, heads]`), decoded as one batch
    (`compression.generation.decode_rows`): the prompt prefilled for all rows at once, sharing layers where
    their masks agree (`HeadAblation.prefill`), each row ending at an EOS token of the model's generation config
    or after `max_new_tokens` (the sample's by default), as `generate` stops. The new text only."""
    ids = encode_prompt(tokenizer, sample.prompt, sample.template)["input_ids"]
    rows = masks.shape[0]
    input_ids = torch.tensor([ids], device=input_device(model))
    rule = StopRule(max_new_tokens or sample.max_new_tokens, frozenset(eos_ids(model)))
    with torch.inference_mode(), HeadAblation(model, masks) as ablation:
        cache = growing_cache(model.config)
        logits = ablation.prefill(model, input_ids, cache)
        tokens, _ = decode_rows(model, cache, logits, [rule] * rows, on_select=ablation.select_rows)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]


@dataclass(frozen=True)
class Condition:
    """One ablation run: remove `heads` (flat indices) chosen by `condition` with `k` and `seed`."""

    condition: str
    k: int
    seed: int | None
    heads: torch.Tensor


def plan_conditions(importance: torch.Tensor, ks: Sequence[int], seeds: Sequence[int],
                    conditions: Iterable[str] = CONDITIONS) -> list[Condition]:
    """The baseline (`none`, k=0), then for each k: top, one random run per seed, lowest."""
    plan = [Condition("none", 0, None, torch.empty(0, dtype=torch.long))]
    conditions = list(conditions)
    for k in ks:
        for condition in conditions:
            for seed in (seeds if condition == "random" else [None]):
                plan.append(Condition(condition, k, seed, select_heads(importance, k, condition, seed or 0)))
    return plan


def run_ablation(model: torch.nn.Module, tokenizer: Any, samples: Sequence[Sample], importance: torch.Tensor,
                 plan: Sequence[Condition], progress: Callable[[], None] | None = None,
                 decode_batch: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Generate every sample under every condition; returns (table rows, per-sample predictions).

    A sample's conditions decode together, one batch row each, at most `decode_batch` rows (None: all; 1: one
    at a time; the results do not depend on it). A row's accuracy is the mean sample score (the task's
    metric: for niah, ROUGE-1 recall of the fact).
    """
    if decode_batch is not None and decode_batch < 1:
        raise HeadscoreError(f"--decode-batch must be at least 1, got {decode_batch}")
    layers, heads = importance.shape
    masks = torch.stack([ablation_mask(cond.heads, layers, heads) for cond in plan])
    size = decode_batch or len(plan)
    answers: dict[tuple[int, int], str] = {}
    for index, sample in enumerate(samples):
        for start in range(0, len(plan), size):
            for offset, answer in enumerate(greedy_answers(model, tokenizer, sample, masks[start:start + size])):
                answers[(start + offset, index)] = answer
                if progress:
                    progress()
    rows, predictions = [], []
    for position, cond in enumerate(plan):
        scores = []
        for index, sample in enumerate(samples):
            answer = answers[(position, index)]
            value = score(sample, answer)
            scores.append(value)
            predictions.append({"condition": cond.condition, "k": cond.k, "seed": cond.seed,
                                "sample": sample.id, "prediction": answer, "score": value})
        rows.append({"condition": cond.condition, "k": cond.k, "seed": cond.seed,
                     "accuracy": sum(scores) / len(scores) if scores else 0.0, "n": len(scores)})
    return rows, predictions


def table_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "seed": "" if row["seed"] is None else row["seed"],
                         "accuracy": f"{row['accuracy']:.6f}"})
    return buffer.getvalue()


def curves(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float], list[float] | None]]:
    """Accuracy vs k per condition (random: mean and standard deviation over seeds), the baseline at k=0."""
    base = [r["accuracy"] for r in rows if r["condition"] == "none"][:1]
    out = {}
    for condition in CONDITIONS:
        ks = sorted({r["k"] for r in rows if r["condition"] == condition})
        if not ks:
            continue
        groups = [[r["accuracy"] for r in rows if r["condition"] == condition and r["k"] == k] for k in ks]
        xs = [0.0] * len(base) + [float(k) for k in ks]
        means = base + [statistics.fmean(g) for g in groups]
        spreads = [0.0] * len(base) + [statistics.pstdev(g) for g in groups]
        out[condition] = (xs, means, spreads if condition == "random" else None)
    return out


def write_outputs(out_dir: str | Path, rows: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]],
                  metadata: dict[str, Any], title: str) -> dict[str, Path]:
    """ablation.csv, ablation.png, predictions.jsonl, metadata.json in `out_dir` (each written atomically)."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ("ablation.csv", "ablation.png", "predictions.jsonl", "metadata.json")
    paths = {name: out / name for name in names}
    atomic_write_text(paths["ablation.csv"], table_csv(rows))
    atomic_write_text(paths["predictions.jsonl"],
                      "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    line_plot(curves(rows), paths["ablation.png"], title=title, xlabel="heads removed (k)",
              ylabel="NIAH accuracy")
    write_json(paths["metadata.json"], metadata)
    return paths


@dataclass
class AblationSetup:
    """Everything a run needs: the loaded model, the NIAH samples, the importance matrix and the plan."""

    model: Any
    tokenizer: Any
    samples: list[Sample]
    importance: torch.Tensor
    plan: list[Condition]
    metadata: dict[str, Any]

    @property
    def total(self) -> int:
        """Number of generations the run makes."""
        return len(self.plan) * len(self.samples)


def prepare(model_name: str, scores_path: str | Path, *, ks: Sequence[int], seeds: Sequence[int],
            conditions: Sequence[str] = CONDITIONS, lengths: Sequence[int] = (1000, 2000),
            depths: Sequence[float] = (0, 50, 100), needles: str | None = None,
            num_needles: int | None = None, haystack: str | None = None, template: str = TEMPLATE,
            max_new_tokens: int = 32, device: str = "auto", dtype: str | None = None) -> AblationSetup:
    """Load the model and scores, build the NIAH samples and the list of ablation conditions."""

    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        raise HeadscoreError(f"unknown ablation condition {', '.join(unknown)}: use {', '.join(CONDITIONS)}")
    geometry = load_geometry(model_name)  # everything is checked before the weights load
    scores = read_head_scores(scores_path, layers=geometry.layers, heads=geometry.query_heads)
    importance = scores.importance()
    bad = [k for k in ks if not 1 <= k <= importance.numel()]
    if bad:
        raise HeadscoreError(f"--ks {bad[0]} is outside 1..{importance.numel()} (the model's query heads)")
    plan = plan_conditions(importance, ks, seeds, conditions)
    task = get_task("niah", lengths=tuple(lengths), depths=tuple(depths), needles=needles,
                    num_needles=num_needles, haystack=haystack, template=template,
                    max_new_tokens=max_new_tokens)
    samples = task_samples(task, load_tokenizer(model_name))
    lm, tokenizer = load_model(model_name, device=device, dtype=dtype, attn_implementation="sdpa")
    per_layer = geometry.query_heads
    metadata = {
        "command": "ablate",
        "model": model_name,
        "geometry": geometry.to_dict(),
        "scores": {"path": str(scores_path), "fingerprint": fingerprint_file(scores_path),
                   "trials": scores.num_trials},
        "parameters": {"ks": list(ks), "seeds": list(seeds), "conditions": list(conditions),
                       "device": resolve_device(device),
                       "dtype": str(lm.dtype).removeprefix("torch."), "generation": "greedy, sdpa"},
        "task": {**task.settings(), "samples": len(samples), "sample_ids": [s.id for s in samples]},
        "heads_removed": {f"{c.condition}-k{c.k}" + ("" if c.seed is None else f"-s{c.seed}"):
                          [f"{h // per_layer}-{h % per_layer}" for h in c.heads.tolist()]
                          for c in plan if c.k},
        "versions": versions(),
    }
    return AblationSetup(lm, tokenizer, samples, importance, plan, metadata)


def execute(setup: AblationSetup, out_dir: str | Path, progress: Callable[[], None] | None = None,
            decode_batch: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Run every condition and write the outputs; returns (table rows, output paths)."""
    rows, predictions = run_ablation(setup.model, setup.tokenizer, setup.samples, setup.importance,
                                     setup.plan, progress, decode_batch)
    title = f"Head ablation: {setup.metadata['model']}, {len(setup.samples)} NIAH samples"
    paths = write_outputs(out_dir, rows, predictions, {**setup.metadata, "results": rows}, title)
    return rows, paths
