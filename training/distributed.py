"""Data-parallel training under `torchrun`: who am I, and the few collectives the loop needs.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process,
so the training loop reads the same either way.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Dist:
    rank: int = 0  # this process among all of them
    world: int = 1  # number of processes
    local_rank: int = 0  # this process on its node: picks the GPU

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
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (e.g. one rank received SIGTERM)."""
        return bool(self.sum([float(flag)])[0]) if self.enabled else flag

    def gather_rows(self, t: Tensor, dim: int) -> Tensor:
        """Concatenate every rank's tensor along `dim`, in rank order (same on every rank)."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)

    @property
    def device(self) -> torch.device:
        # gloo reduces CPU tensors; nccl needs CUDA ones.
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def setup() -> Dist:
    """Join the process group torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local_rank)


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
