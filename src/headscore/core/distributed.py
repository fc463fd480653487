"""Processes launched by torchrun / accelerate launch / Slurm (through torchrun): rank, world size, barriers.

Without a launcher (no WORLD_SIZE, or WORLD_SIZE=1) every function here is a no-op and nothing changes. Under a
launcher, `ranks()` starts the process group once (gloo: the ranks only ever wait for each other at barriers, so
no tensors cross the network and no GPU memory goes to communicators; see docs/scaling.md), `part` gives a rank
its share of the work, and `shutdown()` ends the group (the CLI calls it on exit).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

from headscore.core.errors import HeadscoreError
from headscore.core.model import resolve_device

T = TypeVar("T")

# Ranks wait at barriers while others finish their share or run a rank-0-only stage (reproduce's ablation, a
# long job on a large model): the default 30-minute timeout would abort healthy runs. A rank that dies ends the
# others through the launcher (torchrun stops every worker when one fails), not through this timeout.
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: `rank` of `world` processes, `local_rank` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the merged outputs and runs the single-process stages."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        """Wait until every rank gets here (no-op in a single process)."""
        if self.distributed:
            dist.barrier()

    def part(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items` (`contiguous_part`): the one rank -> work mapping of estimate and
        evaluate."""
        return contiguous_part(items, self.rank, self.world)


def contiguous_part(items: Sequence[T], index: int, count: int) -> list[T]:
    """The `index`-th of `count` contiguous, near-equal ranges of `items` (ranks and `--shard`: work comes in
    prefix-sharing order, so each part's prompts still share their beginnings)."""
    return list(items[index * len(items) // count:(index + 1) * len(items) // count])


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise HeadscoreError(f"environment variable {name}={value!r} is not an integer") from None


def from_env() -> Ranks:
    """Rank, world size and local rank from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise HeadscoreError(f"RANK={rank} and WORLD_SIZE={world} from the environment are inconsistent")
    return Ranks(rank=rank, world=world, local_rank=local)


def ranks() -> Ranks:
    """This process's `Ranks`; under a launcher, starts the (gloo) process group the first time it is called."""
    found = from_env()
    if found.distributed and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise HeadscoreError("WORLD_SIZE > 1 but MASTER_ADDR is not set: start the ranks with torchrun, "
                                 "accelerate launch or srun ... torchrun")
        dist.init_process_group("gloo", rank=found.rank, world_size=found.world, timeout=BARRIER_TIMEOUT)
    return found


def shutdown() -> None:
    """End the process group if one was started (all ranks must call it)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, found: Ranks | None = None) -> str:
    """The device this rank runs on, given the requested one.

    One process: `device` unchanged (`load_model` resolves `auto`). Several ranks: `cuda`, and `auto` with CUDA
    available (`core.model.resolve_device`), become `cuda:LOCAL_RANK`; `auto` without CUDA is `cpu`; an explicit
    `cuda:K` or `cpu` is kept as asked.
    """
    found = found or from_env()
    if not found.distributed:
        return device
    resolved = resolve_device(device)
    return f"cuda:{found.local_rank}" if resolved == "cuda" else resolved
