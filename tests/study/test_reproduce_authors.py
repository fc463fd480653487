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


@pytest.mark.slow  # every stage of the paper config on a tiny model: a few minutes of CPU
def test_paper_config_runs_every_stage_end_to_end(mistral_geometry_folder, tmp_path):
    """The Mistral paper config, its settings kept (the official template, span and stop rule, decode-mode
    estimation, query granularity, the authors' selection rules, razor both ways, the β sweep, niah-official,
    BABILong), its grids shrunk and its data generated here: every stage runs, the report is written, and a
    tokenizer-only dump of its LongBench task reads the 16 datasets."""
    from headscore.core.haystack import load_haystack
    from headscore.evaluation.evaluate import dump_prompts
    from headscore.evaluation.tasks.longbench import longbench_datasets

    config = yaml.safe_load((CONFIGS / "mistral-7b-instruct.yaml").read_text())
    text = load_haystack(None).text[:20_000]
    for folder, parts in (("r2", (0, 1)), ("retrieval", (1, 2, 3))):  # the authors' part{i} layout
        for part in parts:
            (tmp_path / folder / f"part{part}").mkdir(parents=True)
            (tmp_path / folder / f"part{part}" / "a.txt").write_text(text[part * 3000:], encoding="utf-8")
    babilong = tmp_path / "babilong"
    for length in ("0k", "1k", "2k", "4k", "8k", "16k", "32k"):
        (babilong / length).mkdir(parents=True)
        for task in ("qa1", "qa2", "qa3", "qa4", "qa5"):
            record = {"input": "Mary went to the kitchen. " * 20, "question": "Where is Mary?", "target": "kitchen"}
            (babilong / length / f"{task}.jsonl").write_text(json.dumps(record) + "\n")
    assert (config["needles"]["template"], config["needles"]["span"], config["estimate"]["stop_rule"]) == (
        "official", "official", "official")
    config["needles"].update(max_length=400, lengths=2, depths=2, r2_haystack=str(tmp_path / "r2"),
                             retrieval_haystack=str(tmp_path / "retrieval"))
    # a random model answers nothing: every trial counts (with the paper's thresholds none would)
    config["estimate"].update(f1_threshold=-1.0, rouge_threshold=-1.0)
    config["allocate"].update(budgets=[64, 128], betas=[1.005, 1.01])
    config["evaluate"].update(tasks=f"niah-official,babilong:{babilong}", lengths=[400], depths=[0, 100],
                              budgets=[64], betas=[1.005, 1.01], limit=2, dtype="float32",
                              methods=["full", "snapkv", "pyramidkv", "ada-snapkv", "headkv-r2", "headkv-er",
                                       "razor", "razor-k5"])
    config["tune"].update(lengths=[400], depths=[0, 100], betas=[1.005, 1.01])
    config["ablate"].update(ks=[1, 4], seeds=[0], lengths=[400], depths=[50])
    config["latency"].update(lengths=[300], max_new_tokens=2)
    config.update(model=str(mistral_geometry_folder), device="cpu", dtype="float32", name="paper")
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(config))
    first = ["needles", "estimate", "stability", "allocate"]
    run_study(path, results=tmp_path / "results", stages=first, log=lambda line: None)
    root = tmp_path / "results" / "paper"
    retrieval = json.loads((root / "scores-retrieval" / "head_scores.json").read_text())
    assert len(retrieval) == 32 * 32 and not any(map(any, retrieval.values()))  # a random model copies nothing
    generator = torch.Generator().manual_seed(0)  # razor ranks heads by retrieval scores: give it some
    values = torch.rand(32 * 32, 3, generator=generator).tolist()
    (root / "scores-retrieval" / "head_scores.json").write_text(
        json.dumps({key: values[i] for i, key in enumerate(retrieval)}))
    report = run_study(path, results=tmp_path / "results", log=lambda line: None)  # the rest; the first kept
    text = report.read_text(encoding="utf-8")
    stages = json.loads((root / "stages.json").read_text())
    assert {"needles", "estimate", "stability", "allocate", "evaluate", "tune", "ablate", "latency"} <= set(stages)
    assert stages["needles"]["trials"] == {"r2": 8, "retrieval": 12}
    budgets = json.loads((root / "budgets" / "budgets_B64_beta1.005.json").read_text())
    assert budgets["granularity"] == "query" and len(budgets["matrix"][0]) == 32  # the authors' per query head
    results = pd.read_csv(root / "evaluate" / "results.csv")
    assert {"razor (compensation)", "headkv-r2 (β=1.005)", "headkv-r2 (β=1.01)"} <= set(results["method"])
    assert "## Accuracy vs KV size" in text and "niah_official_B64.png" in text
    # the tokenizer-only LongBench dump the config's first task would run
    longbench = tmp_path / "LongBench"
    longbench.mkdir()
    for dataset in longbench_datasets():
        record = {"input": "What is the code?", "context": "The code is 4812. " * 40, "answers": ["4812"],
                  "all_classes": ["a", "b"], "length": 80, "_id": f"{dataset}-0"}
        (longbench / f"{dataset}.jsonl").write_text(json.dumps(record) + "\n")
    count = dump_prompts(str(mistral_geometry_folder), f"longbench:{longbench}", tmp_path / "prompts.jsonl",
                         task_options={"max_length": config["evaluate"]["max_length"], "template": "raw"})
    assert count == 16
