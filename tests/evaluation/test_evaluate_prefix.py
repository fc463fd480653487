"""evaluate with the shared prefix cache: the prefill state and the generated tokens are those of full prefills."""

from __future__ import annotations

import pytest
import torch

from headscore.compression.attention import HEADWISE_ATTENTION
from headscore.compression.generation import prefill
from headscore.core.attention import use_attention
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry
from headscore.core.prefix_cache import PrefixCache, PrefixOptions, plan_prefixes
from headscore.core.prompts import encode_prompt
from headscore.evaluation.evaluate import EvaluateOptions, evaluate
from headscore.evaluation.tasks import get_task
from headscore.scoring.head_scores import HeadScores, write_head_scores


@pytest.fixture(scope="module")
def tokenizer():
    from headscore.core.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture
def model(tiny_llama, tokenizer):
    """Sharpened attention: SnapKV's top-k choices are not near-ties that float rounding could flip."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=len(tokenizer), seed=5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    return model


def samples(tokenizer, template="raw"):
    niah = get_task("niah", lengths=[160, 220], depths=[0, 50, 100], template=template, max_new_tokens=6)
    multikey = get_task("multikey", lengths=[200], samples_per_length=2, template=template, max_new_tokens=6)
    return niah.samples(tokenizer) + multikey.samples(tokenizer)


def prompt_ids(tokenizer, sample) -> torch.Tensor:
    return torch.tensor(encode_prompt(tokenizer, sample.prompt, sample.template)["input_ids"])


@torch.no_grad()
def test_prefill_on_a_shared_prefix_equals_the_full_prefill(model, tokenizer, suffix_passes):
    chosen = samples(tokenizer)
    ids = [prompt_ids(tokenizer, s) for s in chosen]
    plan = plan_prefixes(ids, min_suffix=8)
    assert sum(plan.shared) > 0.3 * sum(len(i) for i in ids)
    prefixes = PrefixCache(model, plan.prefixes, chunk=32)
    for index in plan.order[:6]:
        full = prefill(model, ids[index][None], window=8)
        with use_attention(model, HEADWISE_ATTENTION), prefixes.reuse(ids[index], plan.shared[index]) as (cache,
                                                                                                     start):
            shared = prefill(model, ids[index][None], 8, cache, start)
        assert shared.length == full.length == len(ids[index])
        for name in ("keys", "values"):
            for ours, theirs in zip(getattr(shared, name), getattr(full, name), strict=True):
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        for slot, (ours, theirs) in enumerate(zip(shared.layers, full.layers, strict=True)):  # what scorers read
            torch.testing.assert_close(ours.queries, theirs.queries, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(shared.layer_inputs(slot, 2).window_attention(),
                                       full.layer_inputs(slot, 2).window_attention(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shared.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert any(keys > queries > 1 for queries, keys in suffix_passes)  # suffixes skipped their masked half
    with prefixes.reuse(ids[0], len(ids[0]) - 3) as (cache, start), \
            pytest.raises(HeadscoreError, match="fewer than the observation window"):
        prefill(model, ids[0][None], 8, cache, start)


@pytest.mark.parametrize("template", ["raw", "chat"])
def test_evaluate_results_are_identical_with_and_without_the_prefix_cache(model, tokenizer, tmp_path, template,
                                                                         suffix_passes):
    geometry = Geometry.from_config(model.config)
    scores = tmp_path / "r2.json"
    write_head_scores(scores, HeadScores.from_tensor(
        torch.rand(4, geometry.layers, geometry.query_heads, generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64)))
    options = EvaluateOptions(methods=["full", "snapkv", "pyramidkv", "headkv-r2"], budgets=[16, 32],
                              scores={"r2": str(scores)})
    chosen = samples(tokenizer, template)
    shared = evaluate(model, tokenizer, chosen, tmp_path / "shared", options=options, model_name="tiny",
                      figures=False)  # rows and results.csv are compared: the heatmaps would take half the time
    assert suffix_passes  # the prompts' suffixes attended without their masked half
    plain = evaluate(model, tokenizer, chosen, tmp_path / "plain", options=options, model_name="tiny",
                     prefix=PrefixOptions(enabled=False), figures=False)
    assert [r["prediction"] for r in shared.rows] == [r["prediction"] for r in plain.rows]
    assert (tmp_path / "shared" / "results.csv").read_bytes() == (tmp_path / "plain" / "results.csv").read_bytes()
    assert len({r["prediction"] for r in shared.rows}) > 3  # the answers are not all alike
