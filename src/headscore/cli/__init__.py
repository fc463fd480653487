"""The `headscore` command line: parse options, call the library, render with rich. No logic here.

One module per command group (scoring, compression, evaluation, study) registers its commands on `app.app`;
`options` holds the option definitions they share, built from the library's defaults.
"""

from __future__ import annotations

import sys

# the library is imported inside each command (only light modules here): `headscore --help` stays fast
from headscore.cli import compression, evaluation, scoring, study  # noqa: F401  (registers the commands)
from headscore.cli.app import app
from headscore.core.errors import HeadscoreError

__all__ = ["app", "main"]


def _rank_tag() -> str:
    """'[rank K] ' under torchrun (which rank's line it is), '' in one process or with a broken environment."""
    from headscore.core.distributed import from_env

    try:
        where = from_env()
    except HeadscoreError:
        return ""
    return f"[rank {where.rank}] " if where.distributed else ""


def main() -> None:
    """Console entry point: a HeadscoreError becomes one line on stderr and exit status 2."""
    try:
        app(prog_name="headscore")
    except HeadscoreError as error:
        print(f"headscore: error: {_rank_tag()}{error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"headscore: {_rank_tag()}interrupted; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
    finally:
        # only a command that loaded the distributed helper can have started a process group (--help did not)
        distributed = sys.modules.get("headscore.core.distributed")
        if distributed is not None:
            distributed.shutdown()
