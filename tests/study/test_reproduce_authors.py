"""The Mistral paper config's evaluate stage on a tiny random model of Mistral-7B's attention geometry (32 layers
× 32 query heads, 8 KV heads): the authors' needle test and BABILong on small records, the β sweep, RazorAttention
both ways, and the report's sections for them, from the stage's own result files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from headscore.study.report import (
    at_beta,
    babilong_section,
    beta_sweep_section,
    niah_official_section,
    razor_section,
)
from headscore.study.reproduce import load_config, run_study

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def mistral_geometry_folder(tmp_path_factory):
    """Mistral-7B's heads (32 × 32, 8 KV heads) at head_dim 2, with SmolLM2's tokenizer, saved as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from headscore.core.model import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("mistral-geometry")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow  # about 40 s of CPU: 70 conditions on a 32-layer model
def test_paper_config_evaluate_stage_runs_the_authors_experiments(mistral_geometry_folder, tmp_path):
    config = yaml.safe_load((CONFIGS / "mistral-7b-instruct.yaml").read_text())
    babilong = tmp_path / "babilong"
    for length in ("0k", "1k", "2k", "4k", "8k", "16k", "32k"):  # Mistral's truncation (31500) runs to 32k
        (babilong / length).mkdir(parents=True)
        for task in ("qa1", "qa2", "qa3", "qa4", "qa5"):
            record = {"input": "Mary went to the kitchen. " * 20, "question": "Where is Mary?", "target": "kitchen"}
            (babilong / length / f"{task}.jsonl").write_text(json.dumps(record) + "\n")
    evaluate = config["evaluate"]
    assert evaluate["razor_compensation"] == "both" and len(evaluate["betas"]) == 8
    # the paper's methods, razor both ways, its truncation and numerics; smaller grids and the records above
    evaluate.update(tasks=f"niah-official,babilong:{babilong}", lengths=[400], depths=[0, 100], budgets=[64, 128],
                    betas=[1.005, 1.01], limit=3, dtype="float32")
    config.update(model=str(mistral_geometry_folder), device="cpu", dtype="float32", name="paper")
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(config))
    load_config(path)
    root = tmp_path / "results" / "paper"
    for name in ("r2", "retrieval", "er"):
        (root / f"scores-{name}").mkdir(parents=True)
        generator = torch.Generator().manual_seed(len(name))
        values = torch.rand(32, 32, 3, generator=generator).tolist()
        (root / f"scores-{name}" / "head_scores.json").write_text(
            json.dumps({f"{layer}-{head}": values[layer][head] for layer in range(32) for head in range(32)}))
    run_study(path, results=tmp_path / "results", stages=["evaluate"], log=lambda line: None)
    results = pd.read_csv(root / "evaluate" / "results.csv")
    assert set(results["task"]) == {"niah-official", "babilong:qa1"} and results["sample"].nunique() == 3
    labels = set(results["method"])
    assert {"headkv-r2 (β=1.005)", "headkv-r2 (β=1.01)", "razor", "razor (compensation)", "razor-k500",
            "razor-k500 (compensation)", "full", "ada-snapkv"} <= labels
    assert results.loc[results["method"] == "razor (compensation)", "compensation"].all()
    assert not results.loc[results["method"] == "razor", "compensation"].any()
    # the report's sections from these files
    text = "".join(niah_official_section(results, root, "tiny"))
    assert (root / "niah-official" / "niah_official_B64.png").is_file() and "| `full` | all |" in text
    assert "| `babilong` " not in text and "| `full` | all |" in "".join(babilong_section(results))
    sweep = "".join(beta_sweep_section(results, root / "tune"))
    assert "| `headkv-r2` | 64 |" in sweep and "| `headkv-er` | 128 |" in sweep
    main = at_beta(results, 1.01)
    assert "headkv-r2" in set(main["method"]) and "Run both ways" in "".join(razor_section(main))
