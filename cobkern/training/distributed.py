"""Data parallelism for the trainer: the process's place in a ``torchrun`` job, and the
collectives the loop needs (sums, gathers, buffer broadcast, an in-sync check).

One class, :class:`DistContext`, describes a (possibly one-process) job from the
``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` environment; every collective is a no-op in a
one-process run, so the training loop has no separate single-process branch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, TrainConfig

__all__ = ["DistContext", "broadcast_buffers", "ranks_in_sync"]


class DistContext:
    """This process's place in a (possibly one-process) data-parallel job."""

    def __init__(self, config: TrainConfig) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = config.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device {config.device!r} requested but CUDA is not available")
            self.device = torch.device("cuda", self.local_rank) if self.world > 1 or want == \
                "cuda" else torch.device(want)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            self.owns_group = True
        self.active = self.world > 1 and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a one-process run)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them at the start of each forward pass, so after a step every rank holds
    the statistics of its own shard: evaluating then would score each test shard with other
    statistics than the model rank 0 saves. Training is unaffected (the next forward
    broadcasts the same values)."""
    for b in model.buffers():
        dist.broadcast(b, 0)


@torch.no_grad()
def ranks_in_sync(model: nn.Module, d: DistContext) -> bool:
    """Whether every rank holds bit-identical parameters and floating-point buffers
    (compared by all-gathered sums)."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    probe = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(
        flat.numel(), device=flat.device, dtype=flat.dtype).remainder(97)).sum()]).double()
    gathered = [torch.empty_like(probe) for _ in range(d.world)]
    dist.all_gather(gathered, probe)
    return all(torch.equal(g, gathered[0]) for g in gathered)
