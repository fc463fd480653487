"""estimate with the shared prefix cache: the same scores as without it, contiguous shards, identical files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from headscore.core.prefix_cache import PrefixOptions, common_prefix_length, plan_prefixes
from headscore.core.prompts import encode_prompt
from headscore.scoring.estimate import EstimateOptions, encode_trial, estimate, merge_runs, select_trials
from headscore.scoring.trials import build_needle_trials

OFF = PrefixOptions(enabled=False)
pytestmark = pytest.mark.usefixtures("no_plots")  # journals, tables and score files are compared, not heatmaps


@pytest.fixture(scope="module")
def tokenizer():
    from headscore.core.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def trials():
    """Two needles × 4 depths × 2 lengths."""
    return build_needle_trials("smollm2-135m", min_length=150, max_length=260, lengths=2, depths=4)


@pytest.fixture
def tiny(tiny_llama, tokenizer):
    """A tiny llama over SmolLM2's vocabulary with sharpened attention (top-N choices are not near-ties)."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, vocab=len(tokenizer), seed=7)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    return model


def records(folder: Path) -> dict[int, dict]:
    lines = (folder / "journal.jsonl").read_text().splitlines()[1:]
    return {entry["index"]: entry for entry in map(json.loads, lines)}


def assert_same_results(shared: Path, plain: Path) -> None:
    """Same trials, responses and counts; scores within 1e-5 (float32); the same table."""
    with_cache, without = records(shared), records(plain)
    assert sorted(with_cache) == sorted(without)
    for index, record in without.items():
        other = with_cache[index]
        for key in ("response", "steps", "counted", "success", "nan"):
            assert other[key] == record[key], (index, key)
        if record["scores"] is not None:
            torch.testing.assert_close(torch.tensor(other["scores"]), torch.tensor(record["scores"]),
                                       atol=1e-5, rtol=0)
    assert (shared / "trials.csv").read_bytes() == (plain / "trials.csv").read_bytes()


def prefix_timing(folder: Path) -> tuple[int, int]:
    timing = json.loads((folder / "metadata.json").read_text())["timing"]
    return timing["prompt_tokens_from_prefix_cache"], timing["prompt_tokens"]


@pytest.mark.parametrize("mode, method", [("decode", "r2"), ("decode", "retrieval"), ("teacher-forced", "r2"),
                                          ("teacher-forced", "retrieval")])
def test_prefix_cache_gives_the_scores_of_unshared_runs(tiny, tokenizer, trials, tmp_path, mode, method,
                                                      suffix_passes):
    options = EstimateOptions(rule=method, mode=mode, f1_threshold=-1, rouge_threshold=-1, max_new_tokens=4)
    estimate(tiny, tokenizer, trials, tmp_path / "plain", options=options, model_name="tiny", prefix=OFF)
    # the shared prefix prefilled in passes of at most 64 tokens
    result = estimate(tiny, tokenizer, trials, tmp_path / "shared", options=options, model_name="tiny",
                      prefix=PrefixOptions(chunk=64))
    assert result.counted == len(trials)
    assert_same_results(tmp_path / "shared", tmp_path / "plain")
    reused, total = prefix_timing(tmp_path / "shared")
    assert reused > 0.3 * total and prefix_timing(tmp_path / "plain")[0] == 0
    assert suffix_passes  # the suffixes attended without their masked half
    if method == "r2":
        assert any(sum(map(sum, r["scores"])) > 0 for r in records(tmp_path / "shared").values())


def test_chat_template_and_another_haystack_share_what_their_ids_share(tiny, tokenizer, trials, tmp_path):
    haystack = tmp_path / "other.txt"
    haystack.write_text("Rivers carry silt to the sea. The delta grows each spring. " * 60)
    chat = build_needle_trials("smollm2-135m", min_length=150, max_length=200, lengths=2, depths=3,
                               template="chat")
    other = build_needle_trials("smollm2-135m", min_length=150, max_length=200, lengths=1, depths=3,
                                haystack=str(haystack))
    mixed = [replace(t, id=f"{name}-{t.id}") for name, group in (("raw", trials[:6]), ("chat", chat),
                                                                   ("other", other)) for t in group]
    options = EstimateOptions(mode="teacher-forced")
    estimate(tiny, tokenizer, mixed, tmp_path / "plain", options=options, model_name="tiny", prefix=OFF)
    estimate(tiny, tokenizer, mixed, tmp_path / "shared", options=options, model_name="tiny")
    assert_same_results(tmp_path / "shared", tmp_path / "plain")
    turns = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
             for text in ("Rivers", "Mountains")]
    header = common_prefix_length(*(torch.tensor(encode_prompt(tokenizer, t, "chat")["input_ids"]) for t in turns))
    assert header > 5  # the chat template's system turn precedes the haystack
    chat_rows = [r for r in records(tmp_path / "shared").values() if r["id"].startswith("chat-")]
    assert all(r["cached_tokens"] >= header for r in chat_rows)
    assert sum(r["cached_tokens"] > header for r in chat_rows) >= len(chat_rows) // 2  # and the haystack


def test_shards_are_contiguous_in_sharing_order_and_merge_into_identical_files(tiny, tokenizer, trials,
                                                                                tmp_path):
    order = plan_prefixes([encode_trial(t, tokenizer)[0] for t in trials]).order
    shards = [select_trials(len(trials), (i, 3), None, order) for i in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(len(trials)))
    for shard in shards:
        ranks = sorted(order.index(i) for i in shard)
        assert shard == sorted(shard) and ranks == list(range(ranks[0], ranks[0] + len(shard)))
    assert select_trials(len(trials), (1, 3), 2, order) == shards[1][:2]

    options = EstimateOptions(mode="teacher-forced")
    estimate(tiny, tokenizer, trials, tmp_path / "full", options=options, model_name="tiny")
    for i in range(3):
        estimate(tiny, tokenizer, trials, tmp_path / f"s{i}", options=options, model_name="tiny", shard=(i, 3))
        assert sorted(records(tmp_path / f"s{i}")) == shards[i]
    merge_runs([tmp_path / f"s{i}" for i in range(3)], tmp_path / "merged")
    for name in ("head_scores.json", "trials.csv"):  # bit-identical: a trial's result ignores the shard
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_a_capped_prefix_cache_still_agrees(tiny, tokenizer, trials, tmp_path):
    options = EstimateOptions(mode="teacher-forced")
    capped = PrefixOptions(max_tokens=40, chunk=16)
    estimate(tiny, tokenizer, trials, tmp_path / "capped", options=options, model_name="tiny", prefix=capped)
    estimate(tiny, tokenizer, trials, tmp_path / "plain", options=options, model_name="tiny", prefix=OFF)
    assert_same_results(tmp_path / "capped", tmp_path / "plain")
    assert max(r["cached_tokens"] for r in records(tmp_path / "capped").values()) == 40


def test_cli_bad_prefix_cap_is_one_line(tmp_path, headscore_cli):
    result = headscore_cli("estimate", "--trials", tmp_path / "t.jsonl", "--out", tmp_path / "out",
                           "--prefix-max-tokens", "0")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "--prefix-max-tokens must be at least 1" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["decode", "teacher-forced"])
def test_smollm2_scores_agree_with_and_without_the_prefix_cache(tmp_path, mode):
    """Through the CLI: the default run reuses prefixes, `--no-prefix-cache` does not; same scores."""
    from typer.testing import CliRunner

    from headscore.cli import app
    from headscore.scoring.trials import write_trials

    trials = tmp_path / "trials.jsonl"
    write_trials(trials, build_needle_trials("smollm2-135m", min_length=200, max_length=320, lengths=2, depths=3))
    common = ["estimate", "--trials", str(trials), "--mode", mode, "--f1-threshold", "-1", "--rouge-threshold",
              "-1", "--max-new-tokens", "4"]
    runner = CliRunner()
    plain = runner.invoke(app, [*common, "--out", str(tmp_path / "plain"), "--no-prefix-cache"])
    shared = runner.invoke(app, [*common, "--out", str(tmp_path / "shared")])
    assert plain.exit_code == shared.exit_code == 0, plain.output + shared.output
    assert "prefix cache:" in shared.output and "prefix cache:" not in plain.output
    assert_same_results(tmp_path / "shared", tmp_path / "plain")
    reused, total = prefix_timing(tmp_path / "shared")
    assert reused > 0.3 * total
