"""Every ```python snippet of README.md and docs/*.md runs as written, imports included.

The convention the snippets follow (docs/development.md, "Snippets that run"): the model is `"smollm2-135m"`,
which this test replaces by a tiny random model folder (SmolLM2's tokenizer); the files a snippet reads are
these, made here in the folder the snippet runs in: `essay.txt` (a context), `trials.jsonl` (needle trials),
`head_scores.json` and `scores-r2/head_scores.json` (head scores for the model), `budgets.json` (one HeadKV
allocation at B = 128) and `sweep.json` (B = 128, 256 × β = 1.01), `A.json` and `B.json` (32 × 32 head-score
files, the authors' size).
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODEL = "smollm2-135m"  # the model every snippet names; replaced by the tiny model's folder
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def snippets() -> list:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in SNIPPET.finditer(text):
            line = text[:match.start()].count("\n") + 1
            found.append(pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}:{line}"))
    return found


def test_snippets_are_found():
    ids = [param.id for param in snippets()]
    assert any(i.startswith("README.md") for i in ids) and len(ids) >= 8


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random llama folder with SmolLM2's tokenizer and 4096 positions (the snippets' 1k–2k prompts)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from headscore.core.model import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def snippet_files(tiny_model, tmp_path_factory):
    """The folder of files the snippets read (see the module docstring)."""
    import torch

    from headscore.compression.allocation import allocate_sweep
    from headscore.compression.budgets_file import write_budgets
    from headscore.core.model import load_geometry
    from headscore.scoring.head_scores import HeadScores, write_head_scores
    from headscore.scoring.trials import build_needle_trials, write_trials

    folder = tmp_path_factory.mktemp("snippets")
    geometry = load_geometry(str(tiny_model))
    generator = torch.Generator().manual_seed(0)

    def scores(layers: int, heads: int) -> HeadScores:
        return HeadScores.from_tensor(torch.rand(4, layers, heads, generator=generator, dtype=torch.float64))

    write_head_scores(folder / "head_scores.json", scores(geometry.layers, geometry.query_heads))
    (folder / "scores-r2").mkdir()
    write_head_scores(folder / "scores-r2" / "head_scores.json", scores(geometry.layers, geometry.query_heads))
    write_head_scores(folder / "A.json", scores(32, 32))
    write_head_scores(folder / "B.json", scores(32, 32))
    sweep = allocate_sweep("headkv", geometry, [128, 256], [1.01],
                           scores=scores(geometry.layers, geometry.query_heads))
    write_budgets(folder / "budgets.json", sweep[0])
    write_budgets(folder / "sweep.json", sweep)
    write_trials(folder / "trials.jsonl", build_needle_trials(str(tiny_model), min_length=150, max_length=200,
                                                             lengths=2, depths=2))
    (folder / "essay.txt").write_text("The lighthouse keeper painted the door blue. The code of box 7 is 4123. "
                                      * 20)
    return folder


@pytest.fixture
def registries():
    """What a snippet registers (a press, a task...) is gone after it: every registry as it was before."""
    from headscore.compression.allocation import ALLOCATIONS
    from headscore.compression.presses import PRESSES
    from headscore.compression.scorers import SCORERS
    from headscore.evaluation.tasks import SHORTHANDS, TASKS
    from headscore.scoring.rules import RULES

    kept = [(registry, dict(registry)) for registry in (ALLOCATIONS, PRESSES, SCORERS, SHORTHANDS, TASKS, RULES)]
    yield
    for registry, entries in kept:
        registry.clear()
        registry.update(entries)


@pytest.mark.parametrize("code", snippets())
def test_snippet_runs(code, snippet_files, tiny_model, tmp_path, monkeypatch, no_plots, registries):
    for item in snippet_files.iterdir():
        (tmp_path / item.name).symlink_to(item)
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("snippet")  # a real module: dataclasses defined in a snippet look it up
    monkeypatch.setitem(sys.modules, "snippet", module)
    code = code.replace(f'"{MODEL}"', repr(str(tiny_model)))
    exec(compile(code, "<snippet>", "exec", dont_inherit=True), module.__dict__)  # this file's __future__ aside
