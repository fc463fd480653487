"""Head ablation: the o_proj mask removes exactly the chosen heads; head selection; the CLI end to end."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from headscore.core.errors import HeadscoreError
from headscore.core.prompts import encode_prompt
from headscore.evaluation.ablate import (
    HeadAblation,
    ablation_mask,
    curves,
    layer_groups,
    plan_conditions,
    select_heads,
    table_csv,
)


def o_proj_inputs(model, ids):
    """The input each layer's o_proj receives (after any pre-hooks), `[layers]` of `[batch, seq, heads*dim]`."""
    seen = []
    handles = [layer.self_attn.o_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
               for layer in model.model.layers]
    with torch.no_grad():
        logits = model(ids).logits
    for handle in handles:
        handle.remove()
    return seen, logits


def test_mask_zeros_exactly_the_chosen_heads(tiny_llama):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    plain, plain_logits = o_proj_inputs(model, ids)
    removed = torch.tensor([1, 3, 6])  # layer 0 heads 1 and 3, layer 1 head 2
    with HeadAblation(model, ablation_mask(removed, 2, 4)):
        hooked, hooked_logits = o_proj_inputs(model, ids)
    heads0 = hooked[0].view(1, 12, 4, 8)
    plain0 = plain[0].view(1, 12, 4, 8)
    assert torch.all(heads0[:, :, [1, 3]] == 0)
    assert torch.equal(heads0[:, :, [0, 2]], plain0[:, :, [0, 2]])  # layer 0 sees the same input otherwise
    assert plain0[:, :, [1, 3]].abs().sum() > 0
    assert torch.all(hooked[1].view(1, 12, 4, 8)[:, :, 2] == 0)
    assert hooked[1].view(1, 12, 4, 8)[:, :, [0, 1, 3]].abs().sum() > 0

    # reference: zero the o_proj weight columns of the removed heads in a copy of the model
    reference = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    with torch.no_grad():
        for flat in removed.tolist():
            layer, head = divmod(flat, 4)
            reference.model.layers[layer].self_attn.o_proj.weight[:, head * 8:(head + 1) * 8] = 0
        reference_logits = reference(ids).logits
    torch.testing.assert_close(hooked_logits, reference_logits)
    assert not torch.allclose(hooked_logits, plain_logits)
    assert torch.equal(o_proj_inputs(model, ids)[1], plain_logits)  # the hooks are gone after the block


def test_no_hooks_for_untouched_layers(tiny_llama):
    model = tiny_llama(layers=3, heads=4)
    with HeadAblation(model, ablation_mask(torch.tensor([5]), 3, 4)) as ablation:
        assert len(ablation.handles) == 1
    with pytest.raises(HeadscoreError, match="2 layers"):
        HeadAblation(model, torch.ones(2, 4))


def test_conditions_decoded_as_batch_rows_equal_plain_generation(tiny_llama, tokenizer):
    """Each row of a batched ablation (its own head mask) answers what `model.generate`
    answers with that mask alone, in batches of any size."""
    from headscore.evaluation.ablate import greedy_answers, run_ablation
    from headscore.evaluation.tasks import get_task

    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=8, vocab=len(tokenizer)).double()
    importance = torch.rand(2, 4, generator=torch.Generator().manual_seed(3))
    plan = plan_conditions(importance, [1, 3], [0])
    sample = get_task("niah", lengths=[120], depths=[50], num_needles=1, max_new_tokens=10).samples(tokenizer)[0]
    ids = torch.tensor([encode_prompt(tokenizer, sample.prompt, sample.template)["input_ids"]])
    masks = torch.stack([ablation_mask(c.heads, 2, 4) for c in plan])
    want = []
    for mask in masks:
        with torch.inference_mode(), HeadAblation(model, mask):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                 pad_token_id=0, temperature=None, top_p=None, top_k=None)
        want.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert greedy_answers(model, tokenizer, sample, masks) == want
    assert len(set(want)) > 1  # the masks change the answers
    batched = run_ablation(model, tokenizer, [sample], importance, plan)
    assert run_ablation(model, tokenizer, [sample], importance, plan, decode_batch=2) == batched
    assert [p["prediction"] for p in batched[1]] == want


def test_layer_groups_split_rows_where_masks_first_differ():
    mask = torch.ones(4, 3, 2)
    mask[1, 2, 0] = 0  # row 1 parts from row 0 at layer 2
    mask[2, 0, 1] = 0  # row 2 at layer 0
    mask[3] = mask[2]  # row 3 is row 2
    groups = layer_groups(mask, [0, 1, 2], 3)
    assert [len(set(g.tolist())) for g in groups] == [2, 2, 3]
    assert groups[1][0] == groups[1][1] != groups[1][2] == groups[1][3]
    assert groups[2][0] != groups[2][1] and groups[2][2] == groups[2][3]
    # a hybrid's unscored layers (decoder 0 and 2 here) follow the scored layers before them
    hybrid = layer_groups(mask[:, :2], [1, 3], 4)
    assert [len(set(g.tolist())) for g in hybrid] == [1, 2, 2, 2]


def test_shared_prefill_equals_the_prompt_prefilled_per_row(tiny_llama):
    """`HeadAblation.prefill` runs each layer once per distinct mask prefix and still gives the logits and cache
    of the prompt prefilled once per row with the row's mask (float64: equal but for the rounding a different
    matmul split may bring; on SmolLM2 the default study's ablation is bit-identical)."""
    from transformers import DynamicCache

    from headscore.core.kv_cache import growing_cache
    from headscore.core.model import with_cache

    model = tiny_llama(layers=4, heads=4, kv_heads=2, head_dim=8).double()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    removed = [[], [13], [14], [2, 13], [2, 13]]  # rows 0-2 share layers 0-2; rows 3, 4 are one group
    masks = torch.stack([ablation_mask(torch.tensor(r, dtype=torch.long), 4, 4) for r in removed])
    widths = []
    counters = [layer.self_attn.q_proj.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[0]))
                for layer in model.model.layers]
    with torch.inference_mode(), HeadAblation(model, masks) as ablation:
        plain = DynamicCache(config=model.config)
        want = model(input_ids=ids.expand(5, -1), **with_cache(model, plain), use_cache=True,
                     logits_to_keep=1).logits[:, -1]
        del widths[:]
        shared = growing_cache(model.config)
        got = ablation.prefill(model, ids, shared)
    for counter in counters:
        counter.remove()
    assert widths == [2, 2, 2, 4]  # the layer passes each group of rows ran
    exact = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(got, want, **exact)
    assert (got[0] - got[1]).abs().max() > 1e-6 and torch.equal(got[3], got[4])
    for a, b in zip(plain.layers, shared.layers, strict=True):
        torch.testing.assert_close(b.keys, a.keys, **exact)
        torch.testing.assert_close(b.values, a.values, **exact)
    assert len(ablation.factors) == 2 and not ablation.handles  # row masks restored, hooks removed on exit


def test_select_top_lowest_random():
    importance = torch.tensor([[0.10, 0.40, 0.05], [0.20, 0.01, 0.24]])  # flat: 0..5
    assert sorted(select_heads(importance, 2, "top").tolist()) == [1, 5]
    assert sorted(select_heads(importance, 3, "lowest").tolist()) == [0, 2, 4]
    assert select_heads(importance, 0, "top").numel() == 0
    first, again = select_heads(importance, 4, "random", seed=3), select_heads(importance, 4, "random", seed=3)
    assert torch.equal(first, again) and len(set(first.tolist())) == 4 and first.max() < 6
    draws = {tuple(select_heads(importance, 3, "random", seed=s).tolist()) for s in range(10)}
    assert len(draws) > 1
    with pytest.raises(HeadscoreError, match="cannot remove 7 heads"):
        select_heads(importance, 7, "top")
    with pytest.raises(HeadscoreError, match="unknown ablation condition"):
        select_heads(importance, 1, "middle")


def test_ties_are_not_taken_from_the_first_layers():
    importance = torch.zeros(10, 10)
    importance[0, 0] = 1.0
    lowest = select_heads(importance, 20, "lowest")
    assert 0 not in lowest.tolist()
    assert len({h // 10 for h in lowest.tolist()}) > 3  # spread over layers, not layers 0-1
    assert torch.equal(lowest, select_heads(importance, 20, "lowest"))
    assert select_heads(importance, 1, "top").tolist() == [0]


def test_plan_table_and_curves():
    importance = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    plan = plan_conditions(importance, [1, 2], [0, 1])
    assert [(c.condition, c.k, c.seed) for c in plan] == [
        ("none", 0, None), ("top", 1, None), ("random", 1, 0), ("random", 1, 1), ("lowest", 1, None),
        ("top", 2, None), ("random", 2, 0), ("random", 2, 1), ("lowest", 2, None)]
    rows = [{"condition": c.condition, "k": c.k, "seed": c.seed, "accuracy": a, "n": 4}
            for c, a in zip(plan, [1.0, 0.5, 0.75, 1.0, 1.0, 0.25, 0.5, 1.0, 1.0], strict=True)]
    lines = list(csv.DictReader(table_csv(rows).splitlines()))
    assert lines[0] == {"condition": "none", "k": "0", "seed": "", "accuracy": "1.000000", "n": "4"}
    assert lines[2]["seed"] == "0"
    lines_curves = curves(rows)
    assert lines_curves["top"] == ([0.0, 1.0, 2.0], [1.0, 0.5, 0.25], None)
    xs, means, spread = lines_curves["random"]
    assert means == [1.0, 0.875, 0.75] and spread == [0.0, 0.125, 0.25]


@pytest.fixture
def one_thread():
    """One torch thread for the run: on a busy 2-core machine two threads spin and slow generation ~8x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_cli_end_to_end_on_smollm2(tmp_path, one_thread, random_scores):
    from typer.testing import CliRunner

    from headscore.cli import app
    from headscore.scoring.head_scores import write_head_scores

    scores = tmp_path / "head_scores.json"
    write_head_scores(scores, random_scores(30, 9, trials=2, seed=0))
    out = tmp_path / "ablation"
    args = ["ablate", "--scores", str(scores), "--out", str(out), "--ks", "20", "--seeds", "0",
            "--conditions", "top,random", "--lengths", "300", "--depths", "50", "--num-needles", "2",
            "--max-new-tokens", "24"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "ablation.csv").read_text().splitlines()))
    assert [(r["condition"], r["k"], r["seed"], r["n"]) for r in rows] == [
        ("none", "0", "", "2"), ("top", "20", "", "2"), ("random", "20", "0", "2")]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    assert float(rows[0]["accuracy"]) > 0.5  # the unablated model finds the needle at 300 tokens
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["geometry"]["layers"] == 30 and len(metadata["heads_removed"]["top-k20"]) == 20
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6

    bad = tmp_path / "bad.json"
    write_head_scores(bad, random_scores(2, 4, trials=1, seed=1))
    mismatch = "are for 2 layers × 4 query heads, but the model has 30 layers × 9 query heads"
    for extra, message in (([], mismatch), (["--ks", "300"], "outside 1..270")):
        scores_file = bad if not extra else scores
        result = CliRunner().invoke(app, ["ablate", "--scores", str(scores_file), "--out", str(tmp_path / "x"),
                                          *extra])
        assert isinstance(result.exception, HeadscoreError) and message in str(result.exception)
    assert not (tmp_path / "x").exists()
