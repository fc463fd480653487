"""torchrun: 2 CPU ranks (gloo) write the files of one process for estimate and evaluate, and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headscore.core.distributed import Ranks, from_env, rank_device
from headscore.core.errors import HeadscoreError
from headscore.core.journal import JOURNAL, RANKS_DIR, run_journaled

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random llama with SmolLM2's tokenizer, saved as a model folder (what `--model FOLDER` loads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from headscore.core.model import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # sharper attention: top-N choices are not near-ties
            layer.self_attn.q_proj.weight.mul_(6.0)
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trials_file(tmp_path_factory) -> Path:
    from headscore.scoring.trials import build_needle_trials, write_trials

    path = tmp_path_factory.mktemp("trials") / "trials.jsonl"
    write_trials(path, build_needle_trials("smollm2-135m", min_length=150, max_length=200, lengths=2, depths=1))
    return path


def headscore(*args: str, ranks: int = 1, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process (one thread each, as torchrun gives its workers), or under torchrun."""
    base = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        base.pop(name, None)
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    process = subprocess.Popen([sys.executable, *launcher, "-m", "headscore", *args], env=base, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def outputs(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes, with metadata.json's run timing and process count taken out."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            found[str(path.relative_to(folder))] = path.read_bytes()
    if "metadata.json" in found:
        metadata = json.loads(found["metadata.json"])
        for key in ("timing", "seconds_this_run", "processes"):
            metadata.pop(key, None)
        found["metadata.json"] = json.dumps(metadata).encode()
    return found


def journal_records(path: Path) -> list[dict]:
    """The journal's records with their timing removed (the only field that varies between runs)."""
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture
def one_thread():
    """Single-process references with one thread, as torchrun gives each worker (same float reductions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # torchrun with 2 ranks: several processes, each loading torch
def test_estimate_two_ranks_resume_and_equal_one_process(tiny_folder, trials_file, tmp_path, one_thread):
    from headscore.scoring.estimate import EstimateOptions, run_estimate

    run_estimate(str(tiny_folder), trials_file, tmp_path / "one", options=EstimateOptions(mode="teacher-forced"))
    one = outputs(tmp_path / "one")
    # an interrupted earlier 2-rank run: rank 0 finished one trial, rank 1 was cut off in the middle of a line
    two = tmp_path / "two"
    lines = (tmp_path / "one" / JOURNAL).read_text().splitlines(keepends=True)
    for rank, text in ((0, lines[0] + lines[1]), (1, lines[0] + lines[2][:30])):
        (two / RANKS_DIR / f"rank-{rank}").mkdir(parents=True)
        (two / RANKS_DIR / f"rank-{rank}" / JOURNAL).write_text(text)
    run = headscore("estimate", "--trials", str(trials_file), "--model", str(tiny_folder), "--mode",
                    "teacher-forced", "--out", str(two), ranks=2)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("model=") == 1  # only rank 0 prints the summary
    assert not (two / RANKS_DIR).exists()
    again = outputs(two)
    assert set(again) == {"head_scores.json", "trials.csv", "heatmap.png", "metadata.json", JOURNAL}
    for name in ("head_scores.json", "trials.csv", "heatmap.png", "metadata.json"):
        assert again[name] == one[name], name
    assert journal_records(two / JOURNAL) == journal_records(tmp_path / "one" / JOURNAL)
    kept = json.loads((two / JOURNAL).read_text().splitlines()[1])
    assert kept["seconds"] == json.loads(lines[1])["seconds"]  # the finished trial was kept, not run again
    assert json.loads((two / "metadata.json").read_text())["processes"] == 2


@pytest.mark.slow  # torchrun with 2 ranks: several processes, each loading torch
def test_evaluate_two_ranks_equal_one_process(tiny_folder, tmp_path, one_thread):
    from headscore.evaluation.evaluate import EvaluateOptions, run_evaluate

    options = ["--tasks", "niah,twohop", "--methods", "full,snapkv", "--budgets", "16", "--lengths", "160",
               "--depths", "0,100", "--samples-per-length", "1", "--num-needles", "1", "--template", "raw"]
    run_evaluate(str(tiny_folder), "niah,twohop", tmp_path / "one",
                 options=EvaluateOptions(methods=["full", "snapkv"], budgets=[16]),
                 task_options={"lengths": [160], "depths": [0.0, 100.0], "samples_per_length": 1,
                               "num_needles": 1, "template": "raw"})
    run = headscore("evaluate", "--model", str(tiny_folder), *options, "--out", str(tmp_path / "two"), ranks=2)
    assert run.returncode == 0, run.stderr
    one, two = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert set(two) == set(one) >= {"results.csv", "summary.md", "metadata.json", "score_vs_kv.png",
                                    "niah_snapkv_16.png", JOURNAL}
    assert two == one  # every file byte for byte (the journal too: evaluate records hold no timing)


def test_run_journaled_one_process_resumes_rank_journals(tmp_path):
    """A single process picks up what an interrupted multi-rank run finished, then folds the rank journals."""
    header = {"what": "squares"}
    (tmp_path / RANKS_DIR / "rank-1").mkdir(parents=True)
    (tmp_path / RANKS_DIR / "rank-1" / JOURNAL).write_text(
        json.dumps({"header": header}) + "\n" + json.dumps({"key": 3, "value": 9}) + "\n" + '{"key": 5, "va')
    calls = []

    def work(key):
        calls.append(key)
        return {"key": key, "value": key * key}

    seen = []
    records = run_journaled(tmp_path, header, [1, 3, 5], "key", work, lambda d, t, r: seen.append((d, t)))
    assert calls == [1, 5] and seen == [(1, 3), (2, 3), (3, 3)]
    assert [records[k]["value"] for k in (1, 3, 5)] == [1, 9, 25]
    assert not (tmp_path / RANKS_DIR).exists()
    lines = (tmp_path / JOURNAL).read_text().splitlines()
    assert [json.loads(line).get("key") for line in lines] == [None, 1, 3, 5]
    with pytest.raises(HeadscoreError, match="another run"):
        run_journaled(tmp_path, {"what": "cubes"}, [1], "key", work)

    def stop_at_two(records):
        if len(records) >= 2:
            raise HeadscoreError("enough")

    calls.clear()
    with pytest.raises(HeadscoreError, match="enough"):  # a check stops the run; the journal keeps the work
        run_journaled(tmp_path / "stop", header, [1, 2, 3, 4], "key", work, check=stop_at_two)
    assert calls == [1, 2]
    assert len((tmp_path / "stop" / JOURNAL).read_text().splitlines()) == 3


def test_ranks_from_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert from_env() == Ranks(0, 1, 0) and from_env().is_main
    assert rank_device("auto") == "auto" and rank_device("cuda") == "cuda"  # no launcher: nothing changes
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    where = from_env()
    assert (where.rank, where.world, where.local_rank, where.is_main) == (3, 4, 1, False)
    assert rank_device("cuda", where) == "cuda:1"
    assert rank_device("cpu", where) == "cpu" and rank_device("cuda:0", where) == "cuda:0"
    assert rank_device("auto", where) == ("cuda:1" if torch.cuda.is_available() else "cpu")
    items = list(range(10))
    parts = [Ranks(r, 4, r).part(items) for r in range(4)]
    assert sum(parts, []) == items and parts[3] == [7, 8, 9]  # contiguous ranges, in order
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(HeadscoreError, match="inconsistent"):
        from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(HeadscoreError, match="not an integer"):
        from_env()


@pytest.mark.slow  # torchrun with 2 ranks: several processes, each loading torch
def test_reproduce_under_torchrun(tiny_folder, tmp_path, one_thread):
    """`NPROC=2 make reproduce`: estimate and evaluate split over the ranks, the other stages on rank 0; the
    files equal a one-process study's."""
    from headscore.study.reproduce import run_study

    config = tmp_path / "tiny.yaml"
    config.write_text(f"""name: tiny
model: {tiny_folder}
needles: {{min_length: 150, max_length: 200, lengths: 1, depths: 1}}
estimate: {{r2_mode: teacher-forced, retrieval_mode: teacher-forced}}
allocate: {{budgets: [16], betas: [1.01]}}
evaluate: {{tasks: niah, methods: [full, snapkv, headkv-r2], budgets: [16], lengths: [160], depths: [0, 100],
           num_needles: 1, template: raw}}
""")
    stages = "needles,estimate,allocate,evaluate"
    run_study(config, results=tmp_path / "one", stages=stages.split(","), log=lambda line: None)
    run = headscore("reproduce", "--config", str(config), "--results", str(tmp_path / "two"), "--stages", stages,
                    ranks=2)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("[allocate] running") == 1  # rank 0 alone runs and logs the other stages
    one, two = outputs(tmp_path / "one" / "tiny"), outputs(tmp_path / "two" / "tiny")
    assert set(two) == set(one)
    stages_json = json.loads(two.pop("stages.json"))
    assert set(stages_json) == set(stages.split(","))
    for name in ("scores-r2/head_scores.json", "scores-retrieval/trials.csv", "budgets/budgets_B16_beta1.01.json",
                 "evaluate/results.csv", "evaluate/summary.md", "evaluate/score_vs_kv.png"):
        assert two[name] == one[name], name
