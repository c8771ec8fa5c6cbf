"""Data-parallel training under `torchrun`: who am I, and the few collectives the loop needs.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process,
so the training loop reads the same either way.

Gradients are averaged by DistributedDataParallel over NCCL on CUDA (gloo on CPU). The loop's own
collectives (a few numbers at log time, the stop flag every step, the state gathered into a
checkpoint) carry host values, so under NCCL they go over a second, gloo group of CPU tensors:
they wait for the other processes, never for the GPU's queue.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Dist:
    rank: int = 0  # this process among all of them
    world: int = 1  # number of processes
    local_rank: int = 0  # this process on its node: picks the GPU, and who downloads for the node
    group: Any = None  # the gloo group of the host-side collectives (None: the default group)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a few numbers over all ranks."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (e.g. one rank received SIGTERM)."""
        return bool(self.sum([float(flag)])[0]) if self.enabled else flag

    def gather_rows(self, t: Tensor, dim: int) -> Tensor:
        """Concatenate every rank's tensor along `dim`, in rank order (same on every rank), on CPU."""
        t = t.detach().cpu().contiguous()
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=dim)


def torchrun_ranks() -> Dist:
    """This process's place among torchrun's (RANK, WORLD_SIZE, LOCAL_RANK); joins nothing yet."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def setup(ddp: Dist, device: torch.device) -> None:
    """Join the process group torchrun describes, if any: NCCL for a CUDA device, gloo for CPU."""
    if not ddp.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        ddp.group = dist.new_group(backend="gloo")
    else:
        dist.init_process_group(backend="gloo")


def teardown(finished: bool = True) -> None:
    """Leave the process group.

    On a normal finish every rank first waits for the others at a barrier and frees the DDP reducer,
    which holds the group: a rank that tore its group down and exited while a peer was still using
    the connection died with SIGABRT ("terminate called without an active exception") about one run
    in fifteen on a loaded 2-core machine. After an error, skip the barrier: a peer may never get there.
    """
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
        gc.collect()
    dist.destroy_process_group()
