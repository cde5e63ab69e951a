"""Expert parallelism: each process holds ``num_experts / ep`` experts and tokens travel.

The single-device layer is unchanged: :func:`shard_experts` gives each :class:`moekit.MoE`
its local slice of experts and swaps in :class:`ExpertParallelDispatch`, which wraps the
ordinary plan (tokens sorted by expert) with two ``all_to_all_single`` exchanges (counts
first, then the rows), runs the local experts and sends the results back. The losses'
sums and the load statistics are all-reduced, so balancing sees the global batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.layout import ParallelLayout
from moekit.layers.dispatch import (
    DispatchPlan,
    capacity_keep,
    expert_capacity,
    plan_dispatch,
)
from moekit.layers.experts import GroupedExperts, ModuleExperts
from moekit.layers.moe import MoE
from moekit.layers.router import RouterOutput
from moekit.ops import combine_reference

EXPERT_FLAG = "_moekit_expert_shard"

@dataclass
class ExchangeStats:
    """What one expert-parallel layer call exchanged with the other processes: calls to
    ``all_to_all_single``, wall time inside them and bytes sent to *other* ranks. The
    dispatch returns it (``MoEStats.exchange``) after the forward; the backward's exchanges
    add to the same object when it runs."""

    seconds: float = 0.0
    bytes_sent: int = 0
    calls: int = 0


def _exchange(out: torch.Tensor, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
              stats: ExchangeStats) -> None:
    start = time.perf_counter()
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    stats.seconds += time.perf_counter() - start
    me = dist.get_rank(group)
    row = x[0].numel() * x.element_size() if x.shape[0] else 0
    stats.bytes_sent += row * (sum(in_splits) - in_splits[me])
    stats.calls += 1


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward sends the gradients back the way rows came."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats):
        ctx.splits, ctx.group, ctx.stats = (out_splits, in_splits), group, stats
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        _exchange(out, x.contiguous(), out_splits, in_splits, group, stats)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        gx = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        _exchange(gx, grad.contiguous(), in_splits, out_splits, ctx.group, ctx.stats)
        return gx, None, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; the backward sums the gradients too (each rank's copy of the
    result feeds its own loss)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


def _all_gather_rows(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``x`` (rows may differ in number) from ``group``, in rank order."""
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    most = int(max(s.item() for s in sizes))
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return [p[: int(s.item())] for p, s in zip(parts, sizes)]


class ExpertParallelDispatch:
    """A drop-in for :func:`moekit.layers.dispatch.dispatch` under expert parallelism."""

    def __init__(self, layout: ParallelLayout, num_experts: int, capacity_factor: float | None):
        self.layout, self.E = layout, num_experts
        self.E_local = num_experts // layout.ep
        self.capacity_factor = capacity_factor

    def _capacity_mask(self, routing: RouterOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Which slots fit, decided over the whole expert group's batch (the ranks' tokens in
        rank order), as one process would decide on their concatenation."""
        T, k = routing.indices.shape
        experts = routing.indices.reshape(-1)
        if routing.mask is not None:
            experts = experts.masked_fill(~routing.mask.reshape(-1), self.E)
        weights = routing.weights.detach().reshape(-1).float()
        group = self.layout.ep_group
        all_experts = _all_gather_rows(experts, group)
        all_weights = _all_gather_rows(weights, group)
        total_tokens = sum(e.numel() for e in all_experts) // k
        capacity = expert_capacity(total_tokens, k, self.E, self.capacity_factor)
        keep = capacity_keep(torch.cat(all_experts), torch.cat(all_weights), self.E, capacity)
        start = sum(e.numel() for e in all_experts[: self.layout.ep_rank])
        keep = keep[start : start + T * k]
        dropped = ((experts < self.E) & ~keep).sum()
        return keep.view(T, k), dropped

    def __call__(self, x: torch.Tensor, routing: RouterOutput, experts: nn.Module, capacity: int | None = None):
        """``x`` ``[T, d]`` -> (output ``[T, d_out]``, plan with global loads, expert outputs in
        this rank's sorted order). ``capacity`` (computed by the layer from the local batch)
        is ignored: capacity is decided over the expert group's batch."""
        lay, group = self.layout, self.layout.ep_group
        mask, dropped = routing.mask, torch.zeros((), dtype=torch.long, device=x.device)
        if self.capacity_factor is not None and capacity is not None:
            mask, dropped = self._capacity_mask(routing)
        plan = plan_dispatch(routing.indices, routing.weights, self.E, None, mask)
        x_sorted = x.index_select(0, plan.token_idx)  # [T, d] -> [N, d] by global expert
        send = plan.tokens_per_expert.view(lay.ep, self.E_local).contiguous()  # [dest rank, local expert]
        recv = torch.empty_like(send)  # [source rank, local expert]
        dist.all_to_all_single(recv, send, group=group)
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        stats = ExchangeStats()
        rows = _AllToAll.apply(x_sorted, recv_splits, send_splits, group, stats)  # grouped by source, then expert
        order = _expert_major(recv)  # -> grouped by local expert, then source
        y_local = experts(rows.index_select(0, order), recv.sum(0))
        y_rows = y_local.index_select(0, torch.argsort(order))  # back to [source][expert]
        y_sorted = _AllToAll.apply(y_rows, send_splits, recv_splits, group, stats)  # back in this rank's sorted order
        out = combine_reference(y_sorted, routing.weights, plan.token_idx, plan.slot_idx, x.shape[0])  # single-device combine
        load = plan.tokens_per_expert.clone()
        dist.all_reduce(load)  # statistics over the world's batch
        dropped = dropped.clone()
        dist.all_reduce(dropped)
        return out, DispatchPlan(plan.token_idx, plan.slot_idx, load, dropped, exchange=stats), y_sorted


def _expert_major(counts: torch.Tensor) -> torch.Tensor:
    """Row order that regroups rows laid out ``[source][expert]`` (``counts`` ``[S, E]``) as
    ``[expert][source]``."""
    S, E = counts.shape
    starts = (torch.cumsum(counts.reshape(-1), 0) - counts.reshape(-1)).view(S, E)
    pieces = [torch.arange(int(starts[s, e]), int(starts[s, e] + counts[s, e])) for e in range(E) for s in range(S)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _local_experts(experts: nn.Module, start: int, end: int) -> nn.Module:
    """A new experts module holding experts ``start..end-1`` (copies of their weights)."""
    if isinstance(experts, GroupedExperts):
        local = type(experts)(end - start, experts.d_model, experts.d_ff)
        with torch.no_grad():
            for name, p in experts.named_parameters():
                getattr(local, name).copy_(p[start:end])
        return local
    if isinstance(experts, ModuleExperts):
        local = ModuleExperts(list(experts.experts[start:end]), experts.d_model, experts.d_out)
        return local
    raise TypeError(f"cannot shard experts of type {type(experts).__name__}")


def shard_experts(model: nn.Module, layout: ParallelLayout) -> nn.Module:
    """Make every :class:`MoE` in ``model`` expert-parallel over ``layout`` (in place):
    keep this rank's experts, exchange tokens with :class:`ExpertParallelDispatch`, and
    all-reduce the balancing losses' sums and the aux-loss-free bias loads over the world.
    Returns ``model``."""
    for m in model.modules():
        if not isinstance(m, MoE):
            continue
        cfg = m.config
        if cfg.num_experts % layout.ep:
            raise ValueError(f"num_experts ({cfg.num_experts}) must be divisible by parallel.ep ({layout.ep})")
        if not m.router.token_choice:
            raise ValueError(f"router {cfg.router!r} is not token-choice; expert parallelism supports token-choice "
                             "routers (topk, switch, noisy_topk, sampling, sigmoid_bias, hash, sinkhorn)")
        start, end = layout.expert_range(cfg.num_experts)
        m.experts = _local_experts(m.experts, start, end)
        for p in m.experts.parameters():
            setattr(p, EXPERT_FLAG, True)
        m.dispatcher = ExpertParallelDispatch(layout, cfg.num_experts, cfg.capacity_factor)
        m.reduce = all_reduce_sum
        if hasattr(m.router, "load_reduce"):
            m.router.load_reduce = all_reduce_sum
    return model


def reduce_gradients(model: nn.Module, layout: ParallelLayout, experts_only: bool = False) -> None:
    """After ``backward``: average replicated parameters' gradients over the world, and sum
    each expert shard's gradients over its replica group divided by the world size (the
    expert already summed the contributions of its expert group's ranks), so every
    gradient equals one process's on the global batch with a mean loss.
    ``experts_only``: the replicated ones were averaged already (by DDP)."""
    world = layout.world
    for p in model.parameters():
        if not p.requires_grad or (experts_only and not getattr(p, EXPERT_FLAG, False)):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # an expert that got no token: every rank must still reduce
        dist.all_reduce(p.grad, group=layout.replica_group if getattr(p, EXPERT_FLAG, False) else None)
        p.grad.div_(world)


def gather_experts_state(model: nn.Module, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """The full single-process state dict (every expert), assembled on every rank from the
    expert group's shards: what a checkpoint stores, whatever the layout."""
    params = dict(model.named_parameters())
    state = {}
    for name, t in model.state_dict().items():
        param = params.get(name)
        state[name] = gather_shards(t, layout) if param is not None and getattr(param, EXPERT_FLAG, False) else t
    return state


def gather_shards(t: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """The full-size tensor (all experts) from each expert-group rank's shard ``t``."""
    parts = [torch.empty_like(t) for _ in range(layout.ep)]
    dist.all_gather(parts, t.contiguous(), group=layout.ep_group)
    return torch.cat(parts)
