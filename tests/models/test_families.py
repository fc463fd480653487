"""The family matrix: tiny random models of every decoder family headscore claims (built here, no download).

For each family: the captured attention rows equal eager attention's `output_attentions` (sliding windows,
soft-capping, sinks and q/k norms included); `compress` at a budget above the context generates plain greedy
generation's tokens, and a small budget stores the expected bytes (sliding-window layers keep transformers' own
bounded cache); `estimate` (teacher-forced) scores the full-attention layers and `evaluate` runs end to end.
Unsupported families (latent attention, linear attention, state-space layers) get one clear error from the
config alone.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from headscore.compression.attention import HEADWISE_ATTENTION
from headscore.compression.cache import HeadwiseCache, HeadwiseLayer
from headscore.compression.generation import cache_report, decode, prefill_compressed
from headscore.compression.presses import make_press
from headscore.core.attention import use_attention
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry, check_config, load_model, with_cache
from headscore.scoring.capture import attention_capture

HYBRID = ["sliding_attention", "full_attention"]
WINDOW = 8  # the sliding window of the hybrid tiny models: shorter than every context below, so it matters
MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}
# family -> config overrides on top of COMMON (tiny widths; head_dim 8 where the config has one)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "mixtral": {**MOE, "sliding_window": None},
    "qwen2": {},
    "qwen3": {},  # q/k norms
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "gemma": {},
    "gemma2": {"layer_types": HYBRID, "sliding_window": WINDOW, "attn_logit_softcapping": 1.0,
               "initializer_range": 0.1, "query_pre_attn_scalar": 8},  # soft-capped logits, large enough to bend
    "gemma3_text": {"layer_types": HYBRID, "sliding_window": WINDOW, "query_pre_attn_scalar": 8},
    "gpt_oss": {**MOE, "layer_types": HYBRID, "sliding_window": WINDOW},  # learned sinks
    "cohere2": {"layer_types": HYBRID, "sliding_window": WINDOW},
    "phi3": {},
    "olmo2": {},
    "granite": {"attention_multiplier": 0.4},
    "starcoder2": {},
    "gpt_neox": {"rotary_pct": 0.5, "num_key_value_heads": None},  # multi-head attention
    "smollm3": {},
    "glm4": {"partial_rotary_factor": 0.5},
}
COMMON = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 1024, "bos_token_id": 1,
          "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}
SMALL_VOCAB = 256
# end to end on SmolLM2's vocabulary takes about 2 s a family: these run in the fast suite, the rest are `slow`
END_TO_END_FAST = ("llama", "gemma2", "gpt_oss")
END_TO_END = [family if family in END_TO_END_FAST else pytest.param(family, marks=pytest.mark.slow)
              for family in FAMILIES]


def tiny_family(family: str, vocab: int = SMALL_VOCAB, attn_implementation: str = "eager"):
    """A tiny random model of `family` in eval mode, attention sharpened (logits large enough for soft-capping
    and sinks to matter) and gpt-oss's sinks set away from zero."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=vocab, **{**COMMON, **FAMILIES[family]})
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "query_key_value.weight", "qkv_proj.weight")):
                parameter.mul_(4.0)
            elif name.endswith("sinks"):
                parameter.normal_(0.0, 2.0)
    return model


def sliding_layers(model) -> list[int]:
    geometry = Geometry.from_config(model.config)
    return [i for i in range(model.config.num_hidden_layers) if i not in geometry.model_layers]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_captured_rows_equal_eager_attention(family):
    model = tiny_family(family)
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, SMALL_VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    reference = model(ids, output_attentions=True)
    expected = torch.stack([a[0] for a in reference.attentions])  # [layers, heads, q, k]
    if family in ("gemma2", "gemma3_text", "gpt_oss", "cohere2"):
        assert (expected[0, :, -1, :40 - WINDOW] == 0).all()  # layer 0 is a sliding layer: the window is real
    with attention_capture(model, layers) as capture:
        capture.arm(6)  # one causal pass: every layer, sliding ones included
        logits = model(ids).logits
        rows = capture.take()
        torch.testing.assert_close(rows[:, 0], expected[:, :, -6:], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(logits, reference.logits, atol=1e-5, rtol=1e-4)
        # a decode step on transformers' own cache: the full-attention layers see every position
        full = list(Geometry.from_config(model.config).model_layers)
    with attention_capture(model, full) as capture:
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], **with_cache(model, cache), use_cache=True)
        capture.arm(1)
        step = model(ids[:, -1:], **with_cache(model, cache), use_cache=True).logits
        rows = capture.take()
    torch.testing.assert_close(rows[:, 0, :, 0], expected[full, :, -1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(step[0, -1], reference.logits[0, -1], atol=1e-5, rtol=1e-4)
    assert model.config._attn_implementation == "eager"


def plain_greedy(model, ids: torch.Tensor, new: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def compress(model, ids: torch.Tensor, press, new: int):
    cache, logits, seconds = prefill_compressed(model, ids, press)
    tokens, steps = decode(model, cache, logits, new)
    return cache, tokens, cache_report(cache, press, Geometry.from_config(model.config), ids.shape[1], len(tokens),
                                       seconds, steps)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["snapkv", "headkv"])
def test_budget_above_context_generates_plain_tokens(family, method, random_scores):
    model = tiny_family(family)
    geometry = Geometry.from_config(model.config)
    ids = torch.randint(3, SMALL_VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    want = plain_greedy(model, ids, 10)
    scores = random_scores(geometry.layers, geometry.query_heads) if method == "headkv" else None
    press = make_press(method, geometry, budget=2000, window=4, scores=scores)
    cache, tokens, report = compress(model, ids, press, 10)
    assert tokens == want
    assert report.kept == [[40] * geometry.kv_heads] * geometry.layers
    assert isinstance(cache, HeadwiseCache)
    assert [i for i, layer in enumerate(cache.layers) if isinstance(layer, HeadwiseLayer)] == list(
        geometry.model_layers)
    for index in sliding_layers(model):  # untouched: transformers' own window, WINDOW - 1 tokens kept
        assert isinstance(cache.layers[index], DynamicSlidingWindowLayer)
        assert cache.layers[index].keys.shape[2] == WINDOW - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_small_budget_stores_the_expected_bytes(family):
    model = tiny_family(family)
    geometry = Geometry.from_config(model.config)
    ids = torch.randint(3, SMALL_VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    press = make_press("snapkv", geometry, budget=12, window=4)
    _, tokens, report = compress(model, ids, press, 6)
    assert report.kept == [[12] * geometry.kv_heads] * geometry.layers
    tail = len(tokens) - 1  # the last token is never fed back
    per_entry = geometry.head_dim * 2 * 4  # keys + values, float32
    compressed = (12 + tail) * geometry.layers * geometry.kv_heads * per_entry
    windowed = len(sliding_layers(model)) * geometry.kv_heads * min(40 + tail, WINDOW - 1) * per_entry
    assert report.window_kv_bytes == windowed
    assert report.kv_bytes == compressed + windowed
    full_layers = (40 + tail) * geometry.layers * geometry.kv_heads * per_entry
    assert report.full_kv_bytes == full_layers + windowed
    # the full cache, measured the same way, holds exactly full_kv_bytes
    full = make_press("full", geometry)
    _, _, plain = compress(model, ids, full, 6)
    assert plain.kv_bytes == plain.full_kv_bytes == report.full_kv_bytes


@pytest.fixture(scope="module")
def trials():
    from headscore.scoring.trials import build_needle_trials

    return build_needle_trials("smollm2-135m", min_length=120, max_length=160, lengths=1, depths=2)


@pytest.mark.parametrize("family", END_TO_END)
def test_estimate_and_evaluate_end_to_end(family, tokenizer, trials, tmp_path, no_plots):
    """Teacher-forced estimate scores the full-attention layers only (equal to the rule applied to eager
    attention of those layers); evaluate runs full, snapkv and headkv-r2 from those scores."""
    from headscore.evaluation.evaluate import EvaluateOptions, evaluate
    from headscore.evaluation.tasks import get_task
    from headscore.scoring.estimate import EstimateOptions, encode_trial, estimate
    from headscore.scoring.head_scores import read_head_scores
    from headscore.scoring.rules import get_rule

    model = tiny_family(family, vocab=len(tokenizer))
    geometry = Geometry.from_config(model.config)
    result = estimate(model, tokenizer, trials, tmp_path / "scores", model_name=family,
                      options=EstimateOptions(rule="r2", mode="teacher-forced"))
    assert result.counted == len(trials)
    metadata = json.loads((tmp_path / "scores" / "metadata.json").read_text())
    assert metadata["scored_layers"]["indices"] == list(geometry.model_layers)
    assert metadata["scored_layers"].get("excluded", []) == sliding_layers(model)
    # trials of one haystack share their prefix's prefill, except on a hybrid (a sliding cache cannot be cropped)
    assert metadata["prefix_cache"]["enabled"] == (not sliding_layers(model))
    scores = read_head_scores(tmp_path / "scores" / "head_scores.json", geometry.layers, geometry.query_heads)
    ids, (start, end) = encode_trial(trials[0], tokenizer)
    inputs = torch.cat([ids, ids[start:end - 1]])[None]
    with torch.no_grad():
        attentions = model(inputs, output_attentions=True).attentions
    probs = torch.stack([attentions[i][0, :, -(end - start):] for i in geometry.model_layers]).permute(2, 0, 1, 3)
    answer_tokens = len(tokenizer(trials[0].answer, add_special_tokens=False)["input_ids"])
    want = get_rule("r2").score(probs, (start, end), ids[start:end], ids, answer_tokens=answer_tokens)
    first = torch.tensor([[values[0] for values in row] for row in scores.trials], dtype=torch.float64)
    torch.testing.assert_close(first, want.double(), atol=1e-5, rtol=1e-4)

    samples = get_task("niah", lengths=[140], depths=[50], num_needles=1, max_new_tokens=4).samples(tokenizer)
    options = EvaluateOptions(methods=["full", "snapkv", "headkv-r2"], budgets=[24],
                              scores={"r2": str(tmp_path / "scores" / "head_scores.json")})
    run = evaluate(model, tokenizer, samples, tmp_path / "eval", options=options, model_name=family)
    assert [row["method"] for row in run.rows] == ["full", "snapkv", "headkv-r2"]
    assert run.rows[0]["kv_ratio"] == 1.0 and all(0 < row["kv_ratio"] < 1 for row in run.rows[1:])


UNSUPPORTED = {
    "deepseek_v3": "multi-head latent attention",
    "qwen3_next": "linear-attention layers",
    "falcon_h1": "state-space layers",
    "jamba": "state-space layers",
    "mamba": "state-space layers",
}


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_unsupported_families_get_one_error_before_weights(family, tmp_path):
    config = AutoConfig.for_model(family)
    with pytest.raises(HeadscoreError, match=f"model family '{family}' is not supported: {UNSUPPORTED[family]}"):
        Geometry.from_config(config)
    config.save_pretrained(tmp_path)  # a folder without weights: the error comes from the config alone
    with pytest.raises(HeadscoreError, match=f"'{family}' is not supported"):
        check_config(str(tmp_path), str(tmp_path))
    with pytest.raises(HeadscoreError, match=f"'{family}' is not supported"):
        load_model(str(tmp_path), device="cpu")


def test_cli_refuses_an_unsupported_family_in_one_line(tmp_path, monkeypatch, capsys):
    import sys

    from headscore.cli import main

    AutoConfig.for_model("mamba").save_pretrained(tmp_path / "mamba")
    (tmp_path / "context.txt").write_text("Some context.")
    monkeypatch.setattr(sys, "argv", ["headscore", "compress", "--model", str(tmp_path / "mamba"), "--context-file",
                                      str(tmp_path / "context.txt"), "--question", "What?", "--method", "snapkv"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith("headscore: error: ") and "'mamba' is not supported: state-space layers" in err


def test_headwise_cache_of_a_hybrid_needs_its_config():
    geometry = Geometry.from_config(AutoConfig.for_model("gemma2", num_hidden_layers=4, layer_types=HYBRID * 2))
    with pytest.raises(HeadscoreError, match="needs its config"):
        HeadwiseCache(geometry, None)


@torch.no_grad()
def test_decode_attention_with_softcap_and_sinks_equals_plain():
    """`headwise_attention` (the compressed cache's decode) with soft-capping and sinks, on a cache that kept
    everything, equals plain attention over all keys with the same terms."""
    from headscore.compression.attention import HeadwiseEntries, headwise_attention, plan_segments

    torch.manual_seed(4)
    q_heads, kv_heads, n, t, d = 4, 2, 10, 3, 8
    query = torch.randn(q_heads, 1, d) * 3
    keys, values = torch.randn(kv_heads, n, d), torch.randn(kv_heads, n, d)
    tail_keys, tail_values = torch.randn(kv_heads, t, d), torch.randn(kv_heads, t, d)
    sinks = torch.randn(q_heads)
    kept = torch.full((1, kv_heads), n, dtype=torch.int64)
    entries = HeadwiseEntries(keys.reshape(-1, d), values.reshape(-1, d), plan_segments(kept), kv_heads,
                              tail_keys[None], tail_values[None])
    got = headwise_attention(query[None], entries, 0.5, softcap=1.5, sinks=sinks)[0]
    all_keys = torch.cat([keys, tail_keys], 1).repeat_interleave(2, 0)
    all_values = torch.cat([values, tail_values], 1).repeat_interleave(2, 0)
    logits = 1.5 * torch.tanh(query @ all_keys.transpose(1, 2) * 0.5 / 1.5)
    probs = torch.softmax(torch.cat([logits, sinks.view(-1, 1, 1)], -1), -1)[..., :-1]
    torch.testing.assert_close(got, probs @ all_values, atol=1e-6, rtol=1e-5)


def test_hybrid_prefill_uses_headscore_attention_on_full_layers_only():
    """In a hybrid model's compressed prefill, the full-attention layers hold a head-wise layer and the
    sliding ones transformers' layer; after decode the sliding layers still hold only the window."""
    model = tiny_family("gemma3_text")
    geometry = Geometry.from_config(model.config)
    assert geometry.compressed_layers == (1,)
    ids = torch.randint(3, SMALL_VOCAB, (1, 30), generator=torch.Generator().manual_seed(5))
    cache = HeadwiseCache(geometry, make_press("snapkv", geometry, budget=10, window=4), config=model.config)
    with torch.inference_mode(), use_attention(model, HEADWISE_ATTENTION):
        model(input_ids=ids, **with_cache(model, cache), use_cache=True)
    assert cache.kept().tolist() == [[10, 10]]
    assert cache.layers[0].keys.shape[2] == WINDOW - 1 and cache.get_seq_length() == 30


@pytest.mark.slow
def test_a_gemma3_folder_runs_every_command_from_the_cli(tokenizer, tmp_path):
    """A tiny Gemma-3-style folder (sliding and full layers; saved with save_pretrained beside a tokenizer)
    goes through build-needles, estimate, compress and evaluate from the CLI with `--model <folder>`."""
    from typer.testing import CliRunner

    from headscore.cli import app

    folder = tmp_path / "tiny-gemma3"
    tiny_family("gemma3_text", vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    runner = CliRunner()

    def run(*args: str) -> None:
        result = runner.invoke(app, [*args, "--model", str(folder)])
        assert result.exit_code == 0, result.output

    run("build-needles", "--out", str(tmp_path / "trials.jsonl"), "--min-length", "150", "--max-length", "150",
        "--lengths", "1", "--depths", "2")
    run("estimate", "--needles", str(tmp_path / "trials.jsonl"), "--out", str(tmp_path / "scores"), "--mode",
        "teacher-forced")
    metadata = json.loads((tmp_path / "scores" / "metadata.json").read_text())
    assert metadata["trials_counted"] == 4 and metadata["scored_layers"]["indices"] == [1]
    assert metadata["geometry"]["compressed_layers"] == [1]
    scores = str(tmp_path / "scores" / "head_scores.json")
    (tmp_path / "context.txt").write_text("The lighthouse keeper painted the door blue. " * 12)
    run("compress", "--context-file", str(tmp_path / "context.txt"), "--question", "What colour is the door?",
        "--method", "headkv", "--scores", scores, "--budget", "24", "--window", "4", "--max-new-tokens", "4",
        "--template", "raw", "--report", str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())["report"]
    assert len(report["kept"]) == 1 and sum(report["kept"][0]) == 24 * 2  # the full layer, 2 KV heads
    assert report["window_kv_bytes"] > 0 and report["kv_bytes"] < report["full_kv_bytes"]
    run("evaluate", "--out", str(tmp_path / "eval"), "--tasks", "niah", "--methods", "full,snapkv,headkv-r2",
        "--scores-r2", scores, "--budgets", "24", "--lengths", "150", "--depths", "50", "--num-needles", "1",
        "--template", "raw")
    rows = (tmp_path / "eval" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_a_family_without_sdpa_loads_with_eager_attention(family, tokenizer, tmp_path):
    """transformers has no sdpa path for soft-capped logits or sinks: such a folder loads with eager attention
    (headscore's own functions replace it in its passes), not with a load error."""
    tiny_family(family, vocab=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), device="cpu")
    assert model.config._attn_implementation == "eager"
    assert Geometry.from_config(model.config).compressed_layers == (1,)


def write_gguf_header(path, fields: dict[str, str]) -> None:
    """A GGUF file holding only a header of string fields (version 3, no tensors)."""
    import struct

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    body = b"".join(string(key) + struct.pack("<I", 8) + string(value) for key, value in fields.items())
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(fields)) + body)


@pytest.mark.parametrize("architecture,message", [
    ("mamba", "'mamba' is not supported: state-space layers"),
    ("bert", "GGUF loader does not convert architecture 'bert'"),
])
def test_gguf_architecture_is_checked_before_converting(architecture, message, tmp_path, monkeypatch):
    from headscore.core.assets import gguf_architecture, resolve_model

    monkeypatch.setenv("HEADSCORE_CACHE", str(tmp_path / "cache"))
    write_gguf_header(tmp_path / "model.gguf", {"general.architecture": architecture, "general.name": "tiny"})
    with pytest.raises(HeadscoreError, match=message):
        resolve_model(str(tmp_path / "model.gguf"))
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
    write_gguf_header(tmp_path / "m.gguf", {"general.architecture": "llama", "general.name": "Mistral 7B"})
    assert gguf_architecture(tmp_path / "m.gguf") == "mistral"  # renamed as transformers' loader does


def test_the_default_gguf_reads_as_llama():
    from headscore.core.assets import MODEL_ALIASES, gguf_architecture, package_dir

    package, filename, requirement = MODEL_ALIASES["smollm2-135m"]
    assert gguf_architecture(package_dir(package, requirement) / filename) == "llama"


@torch.no_grad()
def test_ablation_masks_rows_of_the_scored_layers():
    """Head ablation on a hybrid: mask row i is model layer compressed_layers[i] (the sliding layer is kept)."""
    from headscore.evaluation.ablate import HeadAblation

    model = tiny_family("gemma3_text")
    seen: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.register_forward_hook(
            lambda module, args, out, index=index: seen.__setitem__(index, args[0]))
    ids = torch.randint(3, SMALL_VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(1, 4)
    mask[0, 2] = 0.0
    with HeadAblation(model, mask):
        model(ids)
    heads = {index: value.view(1, 12, 4, 8) for index, value in seen.items()}
    assert (heads[1][:, :, 2] == 0).all() and (heads[1][:, :, [0, 1, 3]] != 0).any()
    assert (heads[0] != 0).all()
    with pytest.raises(HeadscoreError, match="mask has 2 layers, the model 1"):
        HeadAblation(model, torch.ones(2, 4))


@pytest.mark.parametrize("family", [family for family in FAMILIES if family != "gpt_neox"])  # neox: no o_proj
def test_shared_ablation_prefill_equals_one_prefill_per_row(family):
    """`HeadAblation.prefill` on every llama-style family, hybrids (sliding layers unscored) and sinks
    included: the logits and cache of the prompt prefilled once per row with the row's mask."""
    from headscore.core.kv_cache import growing_cache
    from headscore.evaluation.ablate import HeadAblation

    model = tiny_family(family, attn_implementation="sdpa" if family not in ("gemma2", "gpt_oss") else "eager")
    geometry = Geometry.from_config(model.config)
    masks = torch.ones(3, geometry.layers, geometry.query_heads)
    masks[1, -1, 1] = 0.0  # parts from row 0 at the last scored layer
    masks[2, 0, 2] = 0.0  # at the first
    ids = torch.randint(3, SMALL_VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), HeadAblation(model, masks) as ablation:
        plain = DynamicCache(config=model.config)
        want = model(input_ids=ids.expand(3, -1), **with_cache(model, plain), use_cache=True,
                     logits_to_keep=1).logits[:, -1]
        shared = growing_cache(model.config)
        got = ablation.prefill(model, ids, shared)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got[0] - got[1]).abs().max() > 1e-4 and (got[0] - got[2]).abs().max() > 1e-4
    for a, b in zip(plain.layers, shared.layers, strict=True):
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-6)


def test_budgets_of_a_hybrid_cover_its_full_layers_and_record_them(tmp_path, random_scores):
    """allocate over a hybrid's geometry: one row per full-attention layer; the budgets file records which."""
    from headscore.compression.allocation import allocate
    from headscore.compression.budgets_file import read_budgets, write_budgets

    geometry = Geometry.from_config(AutoConfig.for_model("cohere2", **{**COMMON, "num_hidden_layers": 8},
                                                         sliding_window=WINDOW))
    assert geometry.compressed_layers == (3, 7) and geometry.layers == 2
    budgets = allocate("headkv", geometry, 32, scores=random_scores(2, 4))
    assert budgets.matrix.shape == (2, 2)
    write_budgets(tmp_path / "budgets.json", budgets)
    assert json.loads((tmp_path / "budgets.json").read_text())["geometry"]["compressed_layers"] == [3, 7]
    assert read_budgets(tmp_path / "budgets.json", geometry).geometry == geometry


@pytest.mark.parametrize("masked", [False, True])
@torch.no_grad()
def test_blocked_attention_equals_plain_attention(masked):
    """The prefill path for soft-capping and sinks, split into many query blocks, equals one plain softmax."""
    from headscore.core.attention import blocked_attention

    torch.manual_seed(7)
    query, key, value = torch.randn(1, 4, 9, 8) * 3, torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8)
    sinks = torch.randn(4)
    keep = torch.ones(9, 13, dtype=torch.bool).tril(4)  # the last 9 of 13 positions, causal
    if masked:
        keep &= ~torch.ones(9, 13, dtype=torch.bool).tril(4 - WINDOW // 2)  # a sliding window of 4
    got = blocked_attention(query, key, value, 0.3, mask=keep[None, None] if masked else None, softcap=2.0,
                            sinks=sinks, max_logits=4 * 13 * 2)  # two query rows per block
    logits = 2.0 * torch.tanh(query @ key.repeat_interleave(2, 1).transpose(-1, -2) * 0.3 / 2.0)
    logits = torch.cat([logits.masked_fill(~keep, float("-inf")), sinks.view(1, 4, 1, 1).expand(1, 4, 9, 1)], -1)
    want = torch.softmax(logits, -1)[..., :-1] @ value.repeat_interleave(2, 1)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-6, rtol=1e-5)


def all_sliding_mistral(window: int | None, vocab: int):
    """The tiny Mistral with `sliding_window=window` on every layer (Mistral-7B-v0.1's config; None: full
    attention), with the same weights whatever the window."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", vocab_size=vocab, **{**COMMON, "sliding_window": window})
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_an_all_sliding_mistral_is_full_attention_within_its_window(tokenizer, trials, tmp_path, no_plots):
    """Every layer sliding: within the window it is scored and compressed as the same model without a window
    (same head scores, kept entries and tokens); a prompt beyond it is one error line naming the window."""
    from headscore.compression.generation import generate_ids
    from headscore.evaluation.evaluate import EvaluateOptions, evaluate
    from headscore.evaluation.tasks import get_task
    from headscore.scoring.estimate import EstimateOptions, estimate

    vocab = len(tokenizer)
    sliding, full = all_sliding_mistral(256, vocab), all_sliding_mistral(None, vocab)
    assert all(torch.equal(a, b) for a, b in zip(sliding.parameters(), full.parameters(), strict=True))
    geometry = Geometry.from_config(sliding.config)
    assert geometry.sliding_window == 256 and geometry.compressed_layers is None
    assert geometry == dataclasses.replace(Geometry.from_config(full.config), sliding_window=256)
    for mode in ("teacher-forced", "decode"):
        options = EstimateOptions(rule="r2", mode=mode)
        for name, model in (("sliding", sliding), ("full", full)):
            estimate(model, tokenizer, trials, tmp_path / f"{mode}-{name}", model_name=name, options=options,
                     stop_after_failures=0)
        assert (tmp_path / f"{mode}-sliding" / "head_scores.json").read_text() == \
            (tmp_path / f"{mode}-full" / "head_scores.json").read_text()
        metadata = json.loads((tmp_path / f"{mode}-sliding" / "metadata.json").read_text())
        assert metadata["prefix_cache"]["enabled"] and metadata["geometry"]["sliding_window"] == 256
    ids = torch.randint(3, vocab, (1, 200), generator=torch.Generator().manual_seed(3))
    for method, params in (("snapkv", {"budget": 24, "window": 4}), ("full", {})):
        runs = [generate_ids(model, ids, make_press(method, geometry, **params), max_new_tokens=8)
                for model in (sliding, full)]
        assert runs[0][0] == runs[1][0] and runs[0][1].kept == runs[1][1].kept
    samples = get_task("niah", lengths=[200], depths=[50], num_needles=1, max_new_tokens=4).samples(tokenizer)
    options = EvaluateOptions(methods=["full", "snapkv"], budgets=[24])
    rows = [evaluate(model, tokenizer, samples, tmp_path / f"eval-{name}", options=options, model_name="m").rows
            for name, model in (("sliding", sliding), ("full", full))]
    assert [row["prediction"] for row in rows[0]] == [row["prediction"] for row in rows[1]]

    narrow = all_sliding_mistral(100, vocab)
    with pytest.raises(HeadscoreError, match=r"\(20[0-9] tokens\) exceed the model's sliding window of 100 tokens"):
        generate_ids(narrow, ids, make_press("snapkv", Geometry.from_config(narrow.config), budget=24),
                     max_new_tokens=8)
    with pytest.raises(HeadscoreError, match="sample niah-.*sliding window of 100 tokens") as error:
        evaluate(narrow, tokenizer, samples, tmp_path / "eval-narrow", options=options, model_name="m")
    assert "\n" not in str(error.value)
    with pytest.raises(HeadscoreError, match="trial .*sliding window of 100 tokens"):
        estimate(narrow, tokenizer, trials, tmp_path / "narrow", model_name="m",
                 options=EstimateOptions(rule="r2", mode="teacher-forced"))
