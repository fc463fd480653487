"""The command line as a whole: every command's --help renders (markup shown as written), the deprecated
spellings still work with one deprecation line, and the shared options take the library's defaults."""

from __future__ import annotations

import inspect

import pytest
import typer
from typer.testing import CliRunner

from headscore.cli import app
from headscore.cli.app import Alias, rewrite_aliases
from headscore.cli.options import parse_named_scores
from headscore.core import defaults
from headscore.core.errors import HeadscoreError

WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # one help text per line
COMMANDS = sorted(command.name for command in typer.main.get_command(app).commands.values())


def test_every_command_is_listed():
    assert COMMANDS == sorted(["allocate", "ablate", "build-needles", "compare", "compress", "estimate", "evaluate",
                               "merge", "reproduce", "tune"])


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_renders(command):
    args = ["--help"] if command is None else [command, "--help"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "Traceback" not in result.output


def test_help_shows_brackets_as_written():
    """Rich markup is escaped: `[/INST]` does not crash evaluate's help, `[min, max]` is not eaten."""
    evaluate = CliRunner().invoke(app, ["evaluate", "--help"], env=WIDE)
    assert evaluate.exit_code == 0 and "llama2 ([INST] ... [/INST])" in evaluate.output
    needles = CliRunner().invoke(app, ["build-needles", "--help"], env=WIDE)
    assert "evenly spaced over [min, max]" in needles.output


def test_deprecated_aliases_are_hidden():
    estimate = CliRunner().invoke(app, ["estimate", "--help"], env=WIDE).output
    assert "--trials" in estimate and "--rule" in estimate
    assert "--needles" not in estimate and "--method" not in estimate
    evaluate = CliRunner().invoke(app, ["evaluate", "--help"], env=WIDE).output
    assert "--betas" in evaluate and "--scores-r" not in evaluate and "--beta " not in evaluate


def test_rewrite_aliases_prints_one_line_per_old_spelling(capsys):
    aliases = {"--needles": Alias("--trials"), "--scores-r": Alias("--scores", lambda v: f"r={v}")}
    args = ["--needles", "t.jsonl", "--scores-r=a.json", "--scores-r", "b.json", "--needles=u", "--", "--needles"]
    assert rewrite_aliases("estimate", args, aliases) == [
        "--trials", "t.jsonl", "--scores", "r=a.json", "--scores", "r=b.json", "--trials=u", "--", "--needles"]
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["headscore: warning: estimate --needles is deprecated and goes in the next release; use --trials",
                     "headscore: warning: estimate --scores-r is deprecated and goes in the next release; use "
                     "--scores"]


@pytest.mark.parametrize("old,new", [
    (["allocate", "--method", "uniform", "--budget", "64", "--beta", "1.5"],
     ["allocate", "--allocation", "uniform", "--budgets", "64", "--betas", "1.5"]),
])
def test_old_spellings_give_the_same_result(tmp_path, old, new):
    """The old spelling runs the same command (one deprecation line per old option on stderr)."""
    runner = CliRunner()
    geometry = ["--layers", "2", "--heads", "4", "--kv-heads", "2"]
    before = runner.invoke(app, [*old, *geometry, "--out", str(tmp_path / "old.json")])
    after = runner.invoke(app, [*new, *geometry, "--out", str(tmp_path / "new.json")])
    assert before.exit_code == 0 and after.exit_code == 0, before.output + after.output
    assert (tmp_path / "old.json").read_text().split('"versions"')[0] == \
        (tmp_path / "new.json").read_text().split('"versions"')[0]
    warnings = [line for line in before.stderr.splitlines() if "deprecated" in line]
    assert len(warnings) == 3 and not any("deprecated" in line for line in after.stderr.splitlines())


def test_named_scores():
    assert parse_named_scores(["r=a.json", "er = b.json"]) == {"r": "a.json", "er": "b.json"}
    with pytest.raises(HeadscoreError, match="not NAME=FILE"):
        parse_named_scores(["a.json"])
    with pytest.raises(HeadscoreError, match="given twice"):
        parse_named_scores(["r=a.json", "r=b.json"])


def test_shared_options_take_the_library_defaults():
    """The CLI's defaults are the library's (one source): the press parameters and HeadKV's β and budget."""
    from headscore.compression.allocation import AdaAllocation, PyramidAllocation, allocate
    from headscore.compression.presses import Press, ScoredPress
    from headscore.compression.scorers import SnapKVScorer, StreamingScorer
    from headscore.evaluation.evaluate import EvaluateOptions
    from headscore.evaluation.tune import TuneOptions

    command = typer.main.get_command(app)
    compress = {p.name: p.default for p in command.commands["compress"].params}
    assert compress["window"] == Press.window == defaults.WINDOW
    assert compress["kernel"] == SnapKVScorer.kernel and compress["alpha"] == AdaAllocation.alpha
    assert compress["sinks"] == StreamingScorer.sinks and compress["pyramid_beta"] == PyramidAllocation.pyramid_beta
    assert list(compress["budgets"]) == [str(ScoredPress.budget)]
    assert list(compress["betas"]) == [f"{inspect.signature(allocate).parameters['beta'].default:g}"]
    evaluate = {p.name: p.default for p in command.commands["evaluate"].params}
    assert [int(b) for b in evaluate["budgets"]] == list(EvaluateOptions.budgets)
    assert evaluate["methods"].split(",") == list(EvaluateOptions.methods)
    tune = {p.name: p.default for p in command.commands["tune"].params}
    assert [float(b) for b in tune["betas"]] == list(TuneOptions.betas)
    assert tune["baselines"].split(",") == list(TuneOptions.baselines)


def test_old_spellings_reach_the_command(tmp_path):
    """estimate --needles and compress --budgets FILE (now --budget-file) still reach their commands, with one
    deprecation line each."""
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", "--needles", str(tmp_path / "absent.jsonl"), "--method", "r2",
                                 "--out", str(tmp_path / "e")])
    assert isinstance(result.exception, HeadscoreError) and "absent.jsonl" in str(result.exception)
    assert [line for line in result.stderr.splitlines() if "deprecated" in line] == [
        "headscore: warning: estimate --needles is deprecated and goes in the next release; use --trials",
        "headscore: warning: estimate --method is deprecated and goes in the next release; use --rule"]
    budgets = tmp_path / "budgets.json"
    budgets.write_text("{}")
    result = runner.invoke(app, ["compress", "--context-file", str(tmp_path / "absent.txt"), "--question", "Q?",
                                 "--budgets", str(budgets)])
    assert isinstance(result.exception, HeadscoreError) and "context file not found" in str(result.exception)
    assert "compress --budgets FILE is deprecated" in result.stderr and result.stderr.count("deprecated") == 1


def test_in_process_runner_matches_the_entry_point(tmp_path, headscore_cli):
    """The `headscore_cli` fixture (most CLI tests run through it) gives what a real `python -m headscore`
    gives: exit status, stdout and the one stderr line."""
    import subprocess
    import sys

    args = ["compare", str(tmp_path / "a.json"), "--plot", "x.txt"]
    real = subprocess.run([sys.executable, "-m", "headscore", *args], capture_output=True, text=True, cwd=tmp_path)
    ours = headscore_cli(*args, cwd=tmp_path)
    assert real.returncode == ours.returncode == 2
    assert (ours.stdout, ours.stderr) == (real.stdout, real.stderr)
    assert ours.stderr.startswith("headscore: error: ") and ours.stderr.count("\n") == 1
