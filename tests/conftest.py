"""Shared fixtures: tiny randomly initialised models of several architectures built in the test, random head
scores, the SmolLM2 tokenizer, and the real SmolLM2 (tests that load it are marked `slow`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"  # committed fixtures derived from the authors' files
# The authors' full files: ../shared/reference beside the clone, or $HEADSCORE_REFERENCE. A user's clone never
# has them; tests that take `reference_dir` are extras, deselected (not skipped) when the folder is absent.
REFERENCE = Path(os.environ.get("HEADSCORE_REFERENCE") or Path(__file__).resolve().parents[2] / "shared"
                 / "reference")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data: the fixtures derived from the authors' files (provenance in tests/data/README.md)."""
    return DATA


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The authors' full files (only tests that run where the folder exists ever get this)."""
    return REFERENCE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the authors' full files, the extra checks against them are deselected: nothing skips."""
    if REFERENCE.is_dir():
        return
    extras = [item for item in items if "reference_dir" in getattr(item, "fixturenames", ())]
    if extras:
        config.hook.pytest_deselected(items=extras)
        items[:] = [item for item in items if item not in extras]


@pytest.fixture
def tiny_llama():
    """Factory for a tiny random LlamaForCausalLM (GQA 4 query heads / 2 KV heads by default), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8, vocab: int = 128,
             seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=4 * heads * head_dim,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             head_dim=head_dim, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0, attn_implementation=attn_implementation, **overrides)
        return LlamaForCausalLM(config).eval()

    return make


@pytest.fixture
def tiny_neox():
    """A tiny random GPT-NeoX (multi-head attention, partial rotary, fused QKV): another architecture."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=512, rotary_pct=0.5,
                           bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture
def tiny_qwen2():
    """Factory for a tiny random Qwen2 (GQA 6 query heads / 2 KV heads, 3 layers, biased QKV), eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def make(attn_implementation: str = "sdpa") -> Qwen2ForCausalLM:
        torch.manual_seed(1)
        config = Qwen2Config(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                             attn_implementation=attn_implementation)
        return Qwen2ForCausalLM(config).eval()

    return make


@pytest.fixture(scope="session")
def random_scores():
    """Factory for `HeadScores` of `trials` uniform random per-trial scores on a `layers × heads` grid;
    `zero_below` zeroes the smaller ones (sparse, like real retrieval scores)."""
    from headscore.scoring.head_scores import HeadScores

    def make(layers: int, heads: int, *, trials: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32,
             zero_below: float | None = None) -> HeadScores:
        generator = torch.Generator().manual_seed(seed)
        per_trial = torch.rand(trials, layers, heads, generator=generator, dtype=dtype)
        if zero_below is not None:
            per_trial[per_trial < zero_below] = 0.0
        return HeadScores.from_tensor(per_trial)

    return make


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (no weights are loaded): token counts and chat templates of real text."""
    from headscore.core.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2():
    """The real default model and tokenizer (converted from the GGUF once, then cached)."""
    from headscore.core.model import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def no_plots(monkeypatch):
    """estimate's and evaluate's figures are not drawn (their paths are still listed): for tests of numbers and
    files other than the figures, where drawing would take most of the time. `write_figures`' own test draws."""
    from headscore.evaluation import evaluate
    from headscore.scoring import estimate

    for module, name in ((evaluate, "grid_heatmap"), (evaluate, "line_plot"), (estimate, "head_heatmap")):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: None)


@pytest.fixture
def suffix_passes(monkeypatch) -> list[tuple[int, int]]:
    """(queries, keys) of every attention call that took `causal_suffix_attention` (a pass after cached tokens)."""
    from headscore.core import attention

    calls: list[tuple[int, int]] = []
    inner = attention.causal_suffix_attention

    def counted(query, key, *args, **kwargs):
        calls.append((query.shape[2], key.shape[2]))
        return inner(query, key, *args, **kwargs)

    monkeypatch.setattr(attention, "causal_suffix_attention", counted)
    return calls


@pytest.fixture
def headscore_cli(monkeypatch):
    """Run `headscore ARGS...` in this process, as the console entry point runs it (`headscore.cli.main`:
    a HeadscoreError is one stderr line and exit status 2), without paying a new interpreter's torch import.

    Returns a `subprocess.CompletedProcess` (returncode, stdout, stderr), like `subprocess.run(...,
    capture_output=True, text=True)`; `cwd` and `env` (variables to add) apply for the call only. Python warnings
    raised during the call land on its stderr under a fresh interpreter's default filters, as they would in a
    subprocess (so "one line on stderr" still fails on a stray warning). A handful of tests still start a real
    `python -m headscore` (the entry point itself, a fresh interpreter).
    """
    import contextlib
    import io
    import subprocess
    import sys
    import warnings

    from headscore.cli import main

    def run(*args: object, cwd: str | os.PathLike | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        argv = ["headscore", *map(str, args)]
        stdout, stderr = io.StringIO(), io.StringIO()
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", argv)
            if cwd is not None:
                patch.chdir(cwd)
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                    warnings.catch_warnings(record=True) as raised:
                warnings.resetwarnings()  # a fresh interpreter's defaults: these four ignored, the rest shown
                for ignored in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                    warnings.simplefilter("ignore", ignored)
                try:
                    main()
                    code = 0
                except SystemExit as done:  # typer's standalone mode and main() both end in SystemExit
                    code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            for warning in raised:
                stderr.write(warnings.formatwarning(warning.message, warning.category, warning.filename,
                                                    warning.lineno, warning.line))
        return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())

    return run


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random llama with SmolLM2's tokenizer, saved as a model folder (what `--model FOLDER` loads:
the CLI and the study on a real folder). Tests that need sharper attention build their own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from headscore.core.model import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def recorded():
    """Factory: a `RecordedPrompt` of one prompt from per-layer `keys`/`values` `[kv_heads, n, d]` (one layer:
    plain tensors) with random queries of `q_heads` heads over the last `window` positions."""
    from headscore.compression.cache import LayerRecord, RecordedPrompt

    def make(keys, values, q_heads: int, window: int, seed: int = 0) -> RecordedPrompt:
        keys = keys if isinstance(keys, list) else [keys]
        values = values if isinstance(values, list) else [values]
        generator = torch.Generator().manual_seed(seed)
        layers = [LayerRecord(k, v, torch.randn(q_heads, window, k.shape[-1], generator=generator, dtype=k.dtype))
                  for k, v in zip(keys, values, strict=True)]
        return RecordedPrompt(layers, window)

    return make


@pytest.fixture(scope="session")
def bos_tokenizer():
    """A tiny byte-level BPE that adds <s> to every encoding, as Llama and Mistral tokenizers do (trained here on
    a slice of the default haystack)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from headscore.core.haystack import load_haystack

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([load_haystack(None).text[:80_000]], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
