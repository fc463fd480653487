"""The study command: reproduce."""

from __future__ import annotations

from pathlib import Path

import typer

from headscore.cli.app import command, console, names, stdout
from headscore.study.stages import STAGES


@command("reproduce")
def reproduce_command(
    config: Path = typer.Option(Path("configs/smollm2-135m.yaml"), "--config", "-c", help="Study config (YAML) "
                                "in configs/: smollm2-135m (default, ~30 min on a 2-core CPU), quick (~5 min "
                                "smoke test), llama3-8b-instruct and mistral-7b-instruct (GPU, hub)."),
    results: Path = typer.Option(Path("results"), help="Results root: the study goes to RESULTS/<config name>/."),
    stages: str = typer.Option(",".join(STAGES), help="Comma-separated stages to run, in pipeline order."),
    force: bool = typer.Option(False, "--force", help="Rerun stages already done with the same config."),
) -> None:
    """Run the whole study from a config (needles, estimate, stability, allocate, evaluate, tune, ablation, latency)
    and write report.md with every figure. Rerunning continues an interrupted study."""
    from headscore.study.reproduce import run_study

    report = run_study(config, results=results, stages=names(stages),
                       force=force, log=lambda line: console.print(line, markup=False, highlight=False))
    stdout.print(f"report: {report}")
