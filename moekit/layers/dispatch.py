"""Dispatch: sort (token, slot) pairs by expert, apply capacity, run the experts, combine.

The fast path flattens the router's ``[T, k]`` choice into ``T*k`` slots, drops the slots
that capacity or the router's mask rule out by giving them a sentinel expert ``E`` (they
sort last and are cut off), sorts the rest by expert with one stable argsort, gathers the
tokens into expert order, calls the experts once on the contiguous segments and
scatter-adds the weighted outputs back to their tokens. :func:`choose_path` decides how:
on the CPU (float32, or bfloat16 rows under autocast) the sort is one counting-sort kernel
and the gather and the combine (and their backward passes) run as the ops
:func:`moekit.ops.gather_rows` and :func:`moekit.ops.combine`, one pass each, the gather
writing the experts' rows in their dtype and padded layout (:func:`rows_layout`); elsewhere
(no compiler, GPU, ``torch.compile``) as their torch-ops references, with the same results;
a handful of tokens in inference skip the sort.

Expert parallelism later inserts its all-to-all between :func:`plan_dispatch` (tokens
sorted by expert) and the experts; nothing here knows about processes.

:func:`reference_dispatch` is the slow, obviously-correct version the tests hold the fast
path to: every expert runs on every token and a dense ``[T, E]`` combine matrix selects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moekit import kernels, ops
from moekit.layers.router import RouterOutput
from moekit.layers.thresholds import threshold


@dataclass
class DispatchPlan:
    """Where each expert-sorted row comes from.

    Attributes:
        token_idx: ``[N]`` token of each sorted row.
        slot_idx: ``[N]`` flat slot ``t * k + j`` of each sorted row.
        tokens_per_expert: ``[E]`` int64 rows per expert (after capacity).
        dropped_tokens: int64 scalar, slots the capacity limit dropped.
        exchange: what a dispatch across processes exchanged (expert parallelism's
            ``ExchangeStats``), else ``None``.
        rows: ``[N]`` the row of each sorted slot in the expert outputs where the experts
            ran on segments padded with zero rows (:func:`rows_layout`), else ``None`` (row i).
    """

    token_idx: torch.Tensor
    slot_idx: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_tokens: torch.Tensor
    exchange: object | None = None
    rows: torch.Tensor | None = None


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor * T * k / E)``: the most slots one expert accepts."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep(
    expert_of_slot: torch.Tensor, weight_of_slot: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Which slots fit: per expert, the ``capacity`` slots of highest router weight
    (batch-prioritised routing, Riquelme et al. 2021); ties go to the earlier slot.

    Args:
        expert_of_slot: ``[S]`` expert per slot; the value ``num_experts`` marks a slot
            that does not exist (it is never kept).
        weight_of_slot: ``[S]`` router weight per slot.

    Returns:
        ``[S]`` bool.
    """
    by_weight = torch.argsort(weight_of_slot.detach(), descending=True, stable=True)  # [S]
    experts = expert_of_slot[by_weight]
    by_expert = torch.argsort(experts, stable=True)  # groups by expert, weight order kept inside
    order = by_weight[by_expert]  # [S] slots grouped by expert, best first
    counts = torch.bincount(expert_of_slot, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts  # [E+1] first sorted position of each expert
    sorted_experts = expert_of_slot[order]
    rank = torch.arange(order.numel(), device=order.device) - starts[sorted_experts]
    keep_sorted = (rank < capacity) & (sorted_experts < num_experts)
    return torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)


def slot_experts(
    indices: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's expert, ``[T*k]``, with ``num_experts`` where the slot does not exist (the
    router's mask or the capacity rule it out), and the slots capacity dropped (int64 scalar).
    Arguments as for :func:`plan_dispatch`."""
    experts = indices.reshape(-1)  # [T, k] -> [T*k]
    dropped = torch.zeros((), dtype=torch.long, device=indices.device)
    if mask is not None:
        experts = experts.masked_fill(~mask.reshape(-1), num_experts)
    if capacity is not None:
        keep = capacity_keep(experts, weights.reshape(-1), num_experts, capacity)
        valid = experts < num_experts
        dropped = (valid & ~keep).sum()
        experts = experts.masked_fill(~keep, num_experts)
    return experts, dropped


def plan_dispatch(
    indices: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    mask: torch.Tensor | None = None,
) -> DispatchPlan:
    """Sort the router's ``[T, k]`` choice by expert (torch ops; the kernels' path sorts with
    :func:`moekit.kernels.sort_slots`, tested equal).

    Args:
        indices: ``[T, k]`` expert per slot.
        weights: ``[T, k]`` router weight per slot (used for capacity priority).
        num_experts: E.
        capacity: most slots per expert, ``None`` for dropless.
        mask: ``[T, k]`` bool, slots that exist (``None``: all).
    """
    k = indices.shape[1]
    experts, dropped = slot_experts(indices, weights, num_experts, capacity, mask)
    num_slots = experts.numel()
    counts = torch.bincount(experts, minlength=num_experts + 1)  # [E+1], last = sentinel
    order = torch.argsort(experts, stable=True)  # [T*k] slots grouped by expert
    if mask is not None or capacity is not None:
        order = order[: num_slots - int(counts[num_experts])]
    return DispatchPlan(
        token_idx=torch.div(order, k, rounding_mode="floor"),
        slot_idx=order,
        tokens_per_expert=counts[:num_experts],
        dropped_tokens=dropped,
    )


def rows_layout(x: torch.Tensor, experts: nn.Module) -> tuple[torch.dtype, int]:
    """The dtype the experts compute in (autocast's on the CPU where the row kernels take it,
    else ``x``'s) and the multiple their segments are padded to (the experts'
    ``row_multiple``, 1 where they have none): the kernels' gather writes the experts' rows in
    that dtype and layout at once, with no cast or padding pass of its own."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) in kernels.ROW_DTYPES:
        dtype = torch.get_autocast_dtype(x.device.type)
    row_multiple = getattr(experts, "row_multiple", None)
    return dtype, row_multiple(dtype, x.device) if row_multiple is not None else 1


def choose_path(x: torch.Tensor, routing: RouterOutput, capacity: int | None) -> str:
    """How :func:`dispatch` runs: ``"unsorted"`` (inference on up to ``unsorted_max_slots``
    slots, no capacity or mask: each chosen expert on its token's row), ``"kernels"`` (the
    sort, gather and combine kernels: float32 or bfloat16 rows on the CPU, float32 router
    weights), else ``"torch"`` (their references)."""
    if (routing.indices.numel() <= threshold("unsorted_max_slots") and capacity is None and routing.mask is None
            and not (torch.is_grad_enabled() and (x.requires_grad or routing.weights.requires_grad))):
        return "unsorted"
    ok = kernels.for_tensors(x, dtypes=kernels.ROW_DTYPES) is not None and kernels.for_tensors(routing.weights)
    return "kernels" if ok else "torch"


def dispatch(
    x: torch.Tensor, routing: RouterOutput, experts: nn.Module, capacity: int | None = None
) -> tuple[torch.Tensor, DispatchPlan, torch.Tensor | None]:
    """Fast path. ``x`` is ``[T, d_model]``; returns the combined output ``[T, d_out]`` (in
    the experts' dtype, as autocast gives a product's), the plan, and the unweighted expert
    outputs in expert order ``[N, d_out]``, or ``[P, d_out]`` with padding rows where
    ``plan.rows`` says where each slot's row is (``None`` on the unsorted inference path)."""
    num_experts = routing.logits.shape[-1]
    path = choose_path(x, routing, capacity)
    if path == "unsorted":
        return _dispatch_few(x, routing, experts, num_experts)
    if path == "torch":
        plan = plan_dispatch(routing.indices, routing.weights, num_experts, capacity, routing.mask)
        x_sorted = ops.gather_rows_reference(x, plan.token_idx)  # [T, d] -> [N, d]
        y_sorted = experts(x_sorted, plan.tokens_per_expert)  # [N, d] -> [N, d_out]
        return _combine_ops(y_sorted, routing.weights, plan, x.shape[0]), plan, y_sorted
    k = routing.indices.shape[1]
    experts_of_slots, dropped = slot_experts(routing.indices, routing.weights, num_experts, capacity, routing.mask)
    dtype, multiple = rows_layout(x, experts)
    s = kernels.sort_slots(kernels.load(), experts_of_slots, num_experts, k, multiple)
    plan = DispatchPlan(s.token_idx, s.slot_idx, s.counts, dropped, rows=s.rows if multiple > 1 else None)
    x_rows = ops.gather_rows(x, s.row_token, s.pos, k, dtype=dtype)  # [T, d] -> [P, d], padding rows zero
    y_rows = experts(x_rows, s.padded_counts)  # [P, d] -> [P, d_out]
    if multiple == 1 and kernels.for_tensors(y_rows, dtypes=kernels.ROW_DTYPES) is None:  # experts' own dtype
        return _combine_ops(y_rows, routing.weights, plan, x.shape[0]), plan, y_rows
    out = ops.combine(y_rows, routing.weights, s.row_token, s.row_slot, s.pos)  # [P, d_out] -> [T, d_out]
    return out, plan, y_rows


def _combine_ops(y_sorted: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """:func:`moekit.ops.combine_reference` of a plan."""
    return ops.combine_reference(y_sorted, weights, plan.token_idx, plan.slot_idx, num_tokens)


def add_chosen_experts(
    x: torch.Tensor,
    experts: nn.Module,
    experts_of: list[list[int]],
    weight_of: list[list[float]],
    out: torch.Tensor,
    scale: float = 1.0,
    in_place: bool = True,
) -> None:
    """No grad: ``out[t] += scale * w * expert_e(x[t])`` for each chosen ``(e, w)`` of each row
    ``t``, one row at a time. ``in_place``: through the experts' ``expert_add_`` where they
    have one (the down projection adds straight into ``out``), else ``expert_forward``."""
    add = getattr(experts, "expert_add_", None) if in_place else None
    for t, (chosen, weights) in enumerate(zip(experts_of, weight_of)):
        row, acc = (x, out) if x.shape[0] == 1 else (x[t : t + 1], out[t : t + 1])
        for e, w in zip(chosen, weights):
            if add is not None:
                add(e, row, acc, w * scale)
            else:  # any experts module: its expert_forward
                acc.add_(experts.expert_forward(e, row), alpha=w * scale)


def _dispatch_few(
    x: torch.Tensor, routing: RouterOutput, experts: nn.Module, num_experts: int
) -> tuple[torch.Tensor, DispatchPlan, None]:
    """Inference on a handful of tokens: run each chosen expert on its token's row in place,
    without sorting. Same result as :func:`dispatch` (tested)."""
    T, k = routing.indices.shape
    experts_of = routing.indices.tolist()
    weight_of = routing.weights.tolist()
    autocast = torch.is_autocast_enabled(x.device.type)
    # the experts' outputs come in autocast's dtype there, and it does not cast in-place ops:
    # under autocast each output is added as it comes, else expert_add_ adds straight into out
    out = x.new_zeros(T, experts.d_out, dtype=torch.get_autocast_dtype(x.device.type) if autocast else None)
    add_chosen_experts(x, experts, experts_of, weight_of, out, in_place=not autocast)
    # the plan from the Python lists (a few slots sort faster here than in tensor ops), made
    # as one tensor: [counts (E) | slot order (T*k) | token of each slot (T*k) | dropped (1)]
    flat = [e for row in experts_of for e in row]
    order = sorted(range(T * k), key=flat.__getitem__)  # stable: slot order within an expert
    counts = [0] * num_experts
    for e in flat:
        counts[e] += 1
    packed = torch.tensor(counts + order + [s // k for s in order] + [0], device=x.device)
    E, n = num_experts, T * k
    plan = DispatchPlan(
        token_idx=packed[E + n : E + 2 * n],
        slot_idx=packed[E : E + n],
        tokens_per_expert=packed[:E],
        dropped_tokens=packed[-1],
    )
    return out, plan, None


def reference_dispatch(
    x: torch.Tensor, routing: RouterOutput, experts: nn.Module, capacity: int | None = None
) -> tuple[torch.Tensor, DispatchPlan, torch.Tensor]:
    """Slow, obviously-correct dispatch: each expert runs on *every* token, and a dense
    ``[T, E]`` combine matrix (zero where a token does not go) picks the outputs.
    Capacity is applied by a per-expert Python loop over the assigned slots."""
    T, k = routing.indices.shape
    num_experts = routing.logits.shape[-1]
    exists = torch.ones(T, k, dtype=torch.bool) if routing.mask is None else routing.mask.cpu()
    idx, wts, ok = routing.indices.tolist(), routing.weights.detach().tolist(), exists.tolist()
    kept_slots: list[list[int]] = []  # per expert, kept flat slots in slot order
    dropped = 0
    for e in range(num_experts):
        slots = [t * k + j for t in range(T) for j in range(k) if idx[t][j] == e and ok[t][j]]
        if capacity is not None and len(slots) > capacity:
            best = sorted(slots, key=lambda s: (-wts[s // k][s % k], s))[:capacity]
            dropped += len(slots) - capacity
            slots = sorted(best)
        kept_slots.append(slots)
    keep = torch.zeros(T * k, dtype=torch.bool)
    for slots in kept_slots:
        keep[slots] = True
    keep = keep.view(T, k).to(x.device)
    combine = torch.zeros(T, num_experts, dtype=routing.weights.dtype, device=x.device)
    combine = combine.scatter_add(1, routing.indices, routing.weights * keep)  # [T, E]
    out = None
    for e in range(num_experts):
        y = experts.expert_forward(e, x)  # [T, d_out], every token
        term = combine[:, e : e + 1].to(y.dtype) * y
        out = term if out is None else out + term
    slot_idx = torch.tensor([s for slots in kept_slots for s in slots], dtype=torch.long, device=x.device)
    token_idx = torch.div(slot_idx, k, rounding_mode="floor")
    y_sorted = torch.cat(
        [experts.expert_forward(e, x[token_idx.new_tensor(slots) // k]) for e, slots in enumerate(kept_slots)]
    )
    plan = DispatchPlan(
        token_idx=token_idx,
        slot_idx=slot_idx,
        tokens_per_expert=torch.tensor([len(s) for s in kept_slots], device=x.device),
        dropped_tokens=torch.tensor(dropped, device=x.device),
    )
    return out, plan, y_sorted
