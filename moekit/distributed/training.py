"""What a training run needs to run under ``torchrun``: process group, layout, the rows of
each batch this rank trains on, gradient reduction and clipping over the layout, and
checkpoints that hold the full (single-process) state whatever the layout, so a run can
resume with a different number of processes."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.ep import (
    EXPERT_FLAG,
    gather_experts_state,
    gather_shards,
    reduce_gradients,
    shard_experts,
)
from moekit.distributed.layout import (
    ParallelLayout,
    check_same_config,
    comm_device,
    init_layout,
)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def launched_distributed() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class DistributedRun:
    """This rank's part of a multi-process run (see the module docstring)."""

    def __init__(self, config_dict: dict, ep: int, device: torch.device):
        if device.type == "cuda":  # one GPU per process: torchrun's LOCAL_RANK
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=10))
        self.layout: ParallelLayout = init_layout(ep)
        check_same_config(config_dict)
        self.rank, self.world = self.layout.rank, self.layout.world
        self.main = self.rank == 0

    def shard(self, model: nn.Module) -> nn.Module:
        return shard_experts(model, self.layout)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch ``[B, ...]`` (``B`` divisible by the world)."""
        if x.shape[0] % self.world:
            raise ValueError(f"train.batch_size ({x.shape[0]}) must be divisible by the number of processes ({self.world})")
        n = x.shape[0] // self.world
        return x[self.rank * n : (self.rank + 1) * n]

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=comm_device())
        dist.all_reduce(t)
        return float(t) / self.world

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel`` over the replicated parameters (it averages their
        gradients during backward); the expert shards are left to :meth:`reduce_gradients`,
        since their replicas live only in their replica group."""
        from torch.nn.parallel import DistributedDataParallel

        experts = [n for n, p in model.named_parameters() if getattr(p, EXPERT_FLAG, False)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        try:  # buffers (RoPE tables, router biases) are computed alike on every rank: no sync per forward
            return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
        except TypeError:  # torch before forward_sync_buffers
            return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    def reduce_gradients(self, model: nn.Module) -> None:
        """The expert shards' gradients (DDP has averaged the rest)."""
        reduce_gradients(model, self.layout, experts_only=True)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to the global gradient norm: replicated gradients counted once, each expert
        shard's once (summed over the expert group)."""
        params = [p for p in model.parameters() if p.grad is not None]
        shared = sum((p.grad.double() ** 2).sum() for p in params if not getattr(p, EXPERT_FLAG, False))
        experts = sum((p.grad.double() ** 2).sum() for p in params if getattr(p, EXPERT_FLAG, False))
        device = params[0].device if params else comm_device()
        experts = torch.as_tensor(experts, dtype=torch.float64, device=device).clone()
        dist.all_reduce(experts, group=self.layout.ep_group)
        norm = torch.sqrt(torch.as_tensor(shared, dtype=torch.float64, device=device) + experts)
        if max_norm < float("inf") and norm > max_norm:
            for p in params:
                p.grad.mul_(max_norm / (float(norm) + 1e-6))
        return norm.float()

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return gather_experts_state(model, self.layout)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
        """``{param name: {state key: tensor}}`` with expert shards gathered to full size."""
        out = {}
        for name, p in model.named_parameters():
            state = optimizer.state.get(p, {})
            entry = {}
            for key, value in state.items():
                if getattr(p, EXPERT_FLAG, False) and torch.is_tensor(value) and value.dim() > 0:
                    value = gather_shards(value, self.layout)
                entry[key] = value
            out[name] = entry
        return out

    def expert_slice(self, p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full-size tensor of expert parameter ``p`` (a tensor of any
        other parameter unchanged)."""
        if not getattr(p, EXPERT_FLAG, False) or full.dim() == 0:
            return full
        n = p.shape[0]
        return full[self.layout.ep_rank * n : (self.layout.ep_rank + 1) * n]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
