"""Generation on the head-wise cache: exactness against full attention, budgets, bytes, the API and the CLI."""

from __future__ import annotations

import sys

import pytest
import torch

from headscore.compression.allocation import allocate
from headscore.compression.attention import HEADWISE_ATTENTION
from headscore.compression.cache import HeadwiseCache
from headscore.compression.generation import (
    StopRule,
    compress_generate,
    compress_state,
    decode,
    decode_rows,
    generate_ids,
    prefill,
)
from headscore.compression.presses import make_press
from headscore.core.attention import use_attention
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry, with_cache
from headscore.scoring.head_scores import HeadScores

METHODS = ["full", "snapkv", "streaming", "pyramidkv", "ada-snapkv", "headkv", "razor", "random", "random@global"]
COMPRESSING = [m for m in METHODS if m != "full"]


@pytest.fixture(params=["llama", "neox"])
def tiny_model(request, tiny_llama, tiny_neox):
    return tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8) if request.param == "llama" else tiny_neox


@pytest.fixture
def press_for(random_scores):
    """Factory: the press of `method` at `budget` with window 4 (headkv, razor: random head scores)."""

    def make(method: str, geometry: Geometry, budget: int, **options):
        scores = random_scores(geometry.layers, geometry.query_heads) if method in ("headkv", "razor") else None
        return make_press(method, geometry, settings={"budget": budget, "window": 4, "scores": scores, **options})

    return make


def plain_greedy(model, ids: torch.Tensor, new: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("method", METHODS)
def test_budget_above_context_generates_the_full_tokens(tiny_model, method, press_for):
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, 48))
    want = plain_greedy(tiny_model, ids, 12)
    geometry = Geometry.from_config(tiny_model.config)
    tokens, report = generate_ids(tiny_model, ids, press_for(method, geometry, 2000), max_new_tokens=12)
    assert tokens == want
    assert report.kept == [[48] * geometry.kv_heads] * geometry.layers


@pytest.mark.parametrize("method", COMPRESSING)
def test_kept_entries_and_bytes_at_a_small_budget(tiny_model, method, press_for):
    torch.manual_seed(2)
    ids = torch.randint(3, 128, (1, 64))
    geometry = Geometry.from_config(tiny_model.config)
    press = press_for(method, geometry, 20)
    tokens, report = generate_ids(tiny_model, ids, press, max_new_tokens=6)
    kept = torch.tensor(report.kept)
    if method == "random@global":  # one pool over the model: the total of the uniform budget
        assert int(kept.sum()) == 20 * kept.numel() and int(kept.min()) >= 4
    elif method == "ada-snapkv":
        assert kept.sum(1).tolist() == [20 * geometry.kv_heads] * geometry.layers
        assert int(kept.min()) >= 4 + int(0.2 * 16)
    elif method == "razor":  # k = round((20 − 4 − 4) · heads / 64) full heads, the rest 4 sinks + 4 window
        k = round(12 * kept.numel() / 64)
        assert sorted(kept.flatten().tolist()) == [8] * (kept.numel() - k) + [64] * k
    else:
        assert torch.equal(kept, press_matrix(press, geometry) + 4)
    generated_in_cache = len(tokens) - 1
    element = 4  # float32
    want = (int(kept.sum()) + geometry.layers * geometry.kv_heads * generated_in_cache) * geometry.head_dim * 2
    assert report.kv_bytes == want * element
    assert report.full_kv_bytes == (geometry.layers * geometry.kv_heads * (64 + generated_in_cache)
                                    * geometry.head_dim * 2 * element)
    assert report.ratio < 0.5


def press_matrix(press, geometry):
    return press.budgets_for(geometry).matrix


def test_headkv_budgets_are_head_level(tiny_llama):
    """Different heads keep different numbers of entries, exactly the allocated budgets."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    geometry = Geometry.from_config(model.config)
    scores = HeadScores.from_tensor(torch.tensor([[[0.9, 0.8, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]]] * 2))
    press = make_press("headkv", geometry, budget=24, window=4, beta=1.5, scores=scores)
    torch.manual_seed(3)
    _, report = generate_ids(model, torch.randint(3, 128, (1, 90)), press, max_new_tokens=3)
    assert torch.equal(torch.tensor(report.kept), press_matrix(press, geometry) + 4)
    assert len({v for row in report.kept for v in row}) > 1


@pytest.mark.parametrize("method", COMPRESSING)
def test_prefill_once_compress_many_equals_the_direct_path(tiny_llama, method, press_for):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(4)
    ids = torch.randint(3, 128, (1, 60))
    state = prefill(model, ids, window=4)
    for budget in (12, 30):
        press = press_for(method, geometry, budget)
        direct, report = generate_ids(model, ids, press, max_new_tokens=10)
        cache = compress_state(state, press)
        tokens, _ = decode(model, cache, state.logits, 10)
        assert tokens == direct
        assert cache.kept().tolist() == report.kept
    full, _ = decode(model, compress_state(state, make_press("full", geometry)), state.logits, 10)
    assert full == plain_greedy(model, ids, 10)
    with pytest.raises(HeadscoreError, match="window 4"):
        compress_state(state, make_press("snapkv", geometry, budget=30, window=8))


def test_rows_that_stop_at_different_steps_decode_as_they_would_alone(tiny_llama, press_for):
    """Each row of a batch ends on its own rule and leaves the batch; its tokens and report are those of its
    one-row decode."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8).double()
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(8)
    state = prefill(model, torch.randint(3, 128, (1, 60)), window=4)
    presses = [press_for("snapkv", geometry, 12), press_for("headkv", geometry, 20),
               press_for("ada-snapkv", geometry, 16), press_for("streaming", geometry, 30)]
    alone = [decode(model, compress_state(state, press), state.logits, 12)[0] for press in presses]
    line_end = frozenset({alone[1][3]})  # row 1 ends at its 4th token (a "line break" after content)
    rules = [StopRule(2), StopRule(12, line_end=line_end), StopRule(7), StopRule(12, eos=frozenset({alone[3][5]}))]
    cache = compress_state(state, presses)
    finished = []
    tokens, seconds = decode_rows(model, cache, state.logits, rules,
                                  on_finish=lambda row, position, got, _: finished.append((row, cache.rows)))
    want = [alone[0][:2], alone[1][:alone[1].index(alone[1][3]) + 1], alone[2][:7],
            alone[3][:alone[3].index(alone[3][5]) + 1]]
    assert tokens == want
    assert [len(s) for s in seconds] == [len(t) - 1 for t in want]
    assert finished[0] == (0, 4) and [row for row, _ in finished] == sorted(range(4), key=lambda r: len(want[r]))
    assert cache.rows == 1  # finished rows left the batch; the last one is still there


def test_flex_kernel_decodes_what_the_buckets_decode(tiny_llama, press_for, monkeypatch):
    """The flex prompt kernel through a whole batched decode (block masks built per layer, rebuilt when rows
    leave): the same tokens as the bucketed kernel."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8).double()
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(9)
    state = prefill(model, torch.randint(3, 128, (1, 300)), window=4)
    presses = [press_for("headkv", geometry, 40), press_for("snapkv", geometry, 150),
               press_for("ada-snapkv", geometry, 90)]
    rules = [StopRule(3), StopRule(9), StopRule(6)]
    got = {}
    for kernel in ("buckets", "flex"):
        monkeypatch.setenv("HEADSCORE_DECODE_KERNEL", kernel)
        cache = compress_state(state, presses)
        got[kernel] = decode_rows(model, cache, state.logits, rules)[0]
        assert any(layer.flex_masks for layer in cache.layers) == (kernel == "flex")
    assert got["flex"] == got["buckets"] and [len(t) for t in got["flex"]] == [3, 9, 6]


def test_stop_rules():
    rule = StopRule(5, eos=frozenset({2}), line_end=frozenset({9}), min_new_tokens=2)
    assert not rule.finished([9]) and not rule.finished([9, 9])  # leading line breaks do not end an answer
    assert rule.finished([9, 4, 9]) and rule.finished([4, 2]) and rule.finished([1, 1, 1, 1, 1])
    assert rule.banned(1) == {2} and rule.banned(2) == frozenset()
    assert StopRule(5, line_end=frozenset({9}), skip_leading_line_ends=False).finished([9])
    with pytest.raises(HeadscoreError, match="at least 1"):
        StopRule(0)


def test_transformers_generate_runs_on_the_headwise_cache(tiny_llama, press_for):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(5)
    ids = torch.randint(3, 128, (1, 50))
    press = press_for("snapkv", geometry, 16)
    ours, _ = generate_ids(model, ids, press, max_new_tokens=8)
    with torch.inference_mode(), use_attention(model, HEADWISE_ATTENTION):
        cache = HeadwiseCache(geometry, press)
        out = model.generate(ids, **with_cache(model, cache), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert out[0, 50:].tolist() == ours
    assert cache.kept().tolist() == [[16, 16]] * 2


def test_query_granularity_budgets_on_gqa(tiny_llama, random_scores):
    """Official behaviour: each query head keeps its own selection of the shared KV head."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    geometry = Geometry.from_config(model.config)
    torch.manual_seed(6)
    ids = torch.randint(3, 128, (1, 40))
    scores = random_scores(geometry.layers, geometry.query_heads)
    press = make_press("headkv", geometry, budget=2000, window=4, scores=scores, granularity="query")
    tokens, report = generate_ids(model, ids, press, max_new_tokens=8)
    assert tokens == plain_greedy(model, ids, 8)
    assert report.kept == [[40] * 4] * 2
    small = make_press("headkv", geometry, budget=12, window=4, scores=scores, granularity="query")
    _, report = generate_ids(model, ids, small, max_new_tokens=2)
    assert torch.equal(torch.tensor(report.kept), press_matrix(small, geometry) + 4)


@pytest.mark.slow
def test_smollm2_headkv(smollm2, random_scores):
    model, tokenizer = smollm2
    geometry = Geometry.from_config(model.config)
    context = " ".join(f"Fact {i}: the code of box {i} is {1000 + 37 * i}." for i in range(20))
    question = "What is the code of box 7?"
    scores = random_scores(geometry.layers, geometry.query_heads, seed=1)
    full = compress_generate(model, tokenizer, context, question, method="full", max_new_tokens=8,
                             template="chat")
    large = compress_generate(model, tokenizer, context, question, method="headkv", budget=4000, scores=scores,
                              max_new_tokens=8, template="chat")
    assert large.tokens == full.tokens and large.answer == full.answer
    context_tokens = full.report.context_tokens
    assert 300 < context_tokens < 600
    small = compress_generate(model, tokenizer, context, question, method="headkv", budget=32, scores=scores,
                              max_new_tokens=4, template="chat")
    budgets = allocate("headkv", geometry, 32, window=8, scores=scores)
    assert torch.equal(torch.tensor(small.report.kept), budgets.matrix + 8)
    cached = context_tokens + len(small.tokens) - 1
    tail = geometry.layers * geometry.kv_heads * (len(small.tokens) - 1)
    assert small.report.kv_bytes == (budgets.total_entries + tail) * 64 * 2 * 4
    assert small.report.full_kv_bytes == geometry.layers * geometry.kv_heads * cached * 64 * 2 * 4


@pytest.mark.slow
def test_smollm2_generate_on_a_padded_batch_equals_single_runs(smollm2, random_scores):
    """The README's five lines on the real model: three prompts of different lengths, one press per row."""
    model, tokenizer = smollm2
    geometry = Geometry.from_config(model.config)
    scores = random_scores(geometry.layers, geometry.query_heads, seed=2)
    prompts = [" ".join(f"Fact {i}: box {i} holds {1000 + 37 * i}." for i in range(n)) + " Box 3 holds"
               for n in (12, 30, 20)]
    presses = [make_press("snapkv", geometry, budget=64), make_press("headkv", geometry, budget=48, scores=scores),
               make_press("pyramidkv", geometry, budget=96)]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side  # the fixture is shared
    cache = HeadwiseCache(geometry, presses)
    with torch.inference_mode(), use_attention(model, HEADWISE_ATTENTION):
        out = model.generate(**batch, **with_cache(model, cache), max_new_tokens=12, do_sample=False,
                             min_new_tokens=12, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    for row, (prompt, press) in enumerate(zip(prompts, presses, strict=True)):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        tokens, _ = generate_ids(model, ids, press, max_new_tokens=12)
        assert out[row, batch["input_ids"].shape[1]:].tolist() == tokens


# ---------------------------------------------------------------------------------------------- CLI


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from headscore.cli import main

    monkeypatch.setattr(sys, "argv", ["headscore", "compress", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("case,message", [
    ("unknown-method", "unknown method 'nope'"),
    ("no-scores", "needs head scores"),
    ("other-geometry", "budgets.json are for 2 layers"),
    ("empty-context", "is empty"),
    ("missing-context", "context file not found"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, case, message):
    from headscore.compression.budgets_file import write_budgets

    context = tmp_path / "doc.txt"
    context.write_text("" if case == "empty-context" else "Some text.", encoding="utf-8")
    args = ["--context-file", str(context if case != "missing-context" else tmp_path / "none.txt"),
            "--question", "What?", "--method", "nope" if case == "unknown-method" else "headkv"]
    if case == "other-geometry":
        other = allocate("uniform", Geometry(layers=2, query_heads=4, kv_heads=2, head_dim=8), 16)
        write_budgets(tmp_path / "budgets.json", other)
        args += ["--budget-file", str(tmp_path / "budgets.json")]
    elif case not in ("no-scores",):
        args += ["--scores", str(tmp_path / "unused.json")]
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert err.startswith("headscore: error: ") and message in err and "\n" not in err
