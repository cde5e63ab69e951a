"""Process layout for expert and data parallelism on ``torch.distributed``.

``world = ep * dp`` processes. Ranks ``d*ep .. d*ep + ep - 1`` form expert-parallel group
``d``: together they hold every expert once (``num_experts / ep`` each) and exchange tokens.
Ranks with the same position ``i`` in their expert group hold the same experts: they form a
replica group, across which those experts' gradients are reduced. Everything else is
replicated on every rank and reduced across the world.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelLayout:
    """This process's place in an ``ep x dp`` layout and its process groups."""

    world: int
    rank: int
    ep: int
    ep_group: Any
    replica_group: Any

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """``[start, end)`` of the global expert ids this rank holds."""
        n = num_experts // self.ep
        return self.ep_rank * n, (self.ep_rank + 1) * n


def init_layout(ep: int) -> ParallelLayout:
    """Build the groups of an ``ep``-way expert-parallel layout over the initialised world.

    Every rank must call this with the same ``ep`` (it creates process groups collectively).
    Raises ValueError, on every rank, when ``ep`` does not divide the world size.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: launch with torchrun (or init_process_group first)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(ep, int) or ep < 1 or world % ep:
        raise ValueError(f"parallel.ep must divide the world size {world} (allowed: "
                         f"{[d for d in range(1, world + 1) if world % d == 0]}), got {ep!r}")
    ep_group = replica_group = None
    for d in range(world // ep):  # every rank creates every group, in the same order
        g = dist.new_group([d * ep + i for i in range(ep)])
        if rank // ep == d:
            ep_group = g
    for i in range(ep):
        g = dist.new_group([i + d * ep for d in range(world // ep)])
        if rank % ep == i:
            replica_group = g
    return ParallelLayout(world, rank, ep, ep_group, replica_group)


def comm_device(group=None) -> torch.device:
    """Where small bookkeeping tensors for collectives live: the current GPU under NCCL
    (which takes CUDA tensors only), else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_config(config: dict, what: str = "config") -> None:
    """Raise ValueError on every rank unless all ranks hold the same ``config`` (compared by
    a hash of its JSON), naming the ranks that differ from rank 0."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).digest()[:8]
    mine = torch.tensor(list(digest), dtype=torch.int64, device=comm_device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    differ = [r for r, h in enumerate(every) if not torch.equal(h, every[0])]
    if differ:
        raise ValueError(f"ranks {differ} were started with a different {what} than rank 0; every rank must use "
                         "the same one")
