"""Sampling split across processes: `accelerate launch -m lcmtool sample ...` or `torchrun ... -m lcmtool sample ...`.

Each rank takes a contiguous share of the job list (accelerate's split_between_processes: images of one prompt stay
together, so its text is encoded once), computed from the full list before anything is written, so every image
belongs to exactly one rank whatever the others have finished. Records travel to rank 0 after every batch
(accelerate's gather_object), which alone prints --json lines. One process (no launcher): no process group at all.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Shard:
    rank: int = 0
    world: int = 1
    device: str | None = None  # the launcher's device for this rank (cuda:LOCAL_RANK), None: the config's
    state: Any = None          # accelerate's PartialState when world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def split(self, items: list) -> list:
        if self.world == 1:
            return list(items)
        with self.state.split_between_processes(list(items)) as mine:
            return list(mine)

    def gather(self, records: list) -> list:
        """Every rank's `records`, concatenated in rank order (on every rank); a collective: all ranks call it."""
        if self.world == 1:
            return list(records)
        from accelerate.utils import gather_object

        return list(gather_object(list(records)))

    def most(self, n: int) -> int:
        """The largest `n` over the ranks (a collective)."""
        return max(self.gather([n])) if self.world > 1 else n

    def done(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


def _destroy_group() -> None:
    """At exit: the process group torn down while the interpreter still runs. Left to interpreter teardown, gloo's
    threads now and then abort the process ("terminate called without an active exception", exit -6) after every
    image was written. A second registration finds no group and does nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def shard_for(device: str) -> Shard:
    """This process's share: world 1 unless a launcher (torchrun, accelerate launch) set WORLD_SIZE > 1."""
    if launched_world() <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    atexit.register(_destroy_group)
    dev = None if cpu else str(state.device)
    return Shard(state.process_index, state.num_processes, dev, state)
