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
