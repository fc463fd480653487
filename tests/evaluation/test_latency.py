"""latency: razor's k given directly (razor-kN, the reproduce stage's `latency.method`) reaches the press."""

from __future__ import annotations

import json

import torch

from headscore.compression.generation import generate_ids
from headscore.compression.presses import make_press
from headscore.core.model import Geometry
from headscore.core.prompts import encode_prompt
from headscore.evaluation import latency
from headscore.evaluation.tasks import get_task, task_samples
from headscore.scoring.head_scores import read_head_scores, write_head_scores


def test_run_latency_takes_a_given_k(tiny_llama, tokenizer, random_scores, tmp_path, monkeypatch):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=len(tokenizer))
    monkeypatch.setattr(latency, "load_model", lambda name, device, dtype: (model, tokenizer))
    scores = tmp_path / "r.json"
    write_head_scores(scores, random_scores(2, 4, seed=1))
    rows = latency.run_latency("tiny", tmp_path / "out", lengths=[150], method="razor", label="razor-k1",
                               scores=str(scores), full_heads=1, max_new_tokens=2, device="cpu")
    sample = task_samples(get_task("niah", lengths=[150], depths=[50.0], num_needles=1), tokenizer)[0]
    ids = torch.tensor([encode_prompt(tokenizer, sample.prompt, sample.template)["input_ids"]])
    press = make_press("razor", Geometry.from_config(model.config), scores=read_head_scores(scores), full_heads=1)
    _, report = generate_ids(model, ids, press, max_new_tokens=2)
    assert [r["kv_bytes"] for r in rows if r["method"] == "razor-k1"] == [report.kv_bytes]
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["full_heads"] == 1


def test_each_length_is_prefilled_once_for_both_caches(tiny_llama, tokenizer, monkeypatch):
    """One prefill per length serves the full and the compressed run; the compressed run's prefill time adds
    its selection to it, and each cache holds what `generate_ids` builds for its press alone."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=len(tokenizer))
    calls = []
    original = latency.prefill
    monkeypatch.setattr(latency, "prefill", lambda *args, **kwargs: calls.append(args[1].shape) or
                        original(*args, **kwargs))
    geometry = Geometry.from_config(model.config)
    presses = {"full": make_press("full", geometry), "snapkv": make_press("snapkv", geometry, budget=16)}
    rows = latency.measure_lengths(model, tokenizer, [120, 200], presses, max_new_tokens=3)
    assert len(calls) == 2 and [r["method"] for r in rows] == ["full", "snapkv"] * 2
    for full, compressed in zip(rows[::2], rows[1::2], strict=True):
        assert compressed["prefill_seconds"] >= full["prefill_seconds"]
        assert compressed["kv_bytes"] < full["kv_bytes"] == full["full_kv_bytes"]
    sample = task_samples(get_task("niah", lengths=[200], depths=[50.0], num_needles=1), tokenizer)[0]
    ids = torch.tensor([encode_prompt(tokenizer, sample.prompt, sample.template)["input_ids"]])
    for row, press in zip(rows[2:], presses.values(), strict=True):
        _, report = generate_ids(model, ids, press, max_new_tokens=3)
        assert (row["kv_bytes"], row["generated_tokens"]) == (report.kv_bytes, 3)
