"""Balancing and stability losses: pure functions of a router's output.

None of them multiplies by its coefficient; :class:`moekit.MoE` does, from its config.
Shapes: ``T`` tokens, ``E`` experts, ``k`` slots per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _token_mask(padding_mask: torch.Tensor | None, T: int, device) -> torch.Tensor | None:
    if padding_mask is None:
        return None
    m = padding_mask.reshape(-1).to(device=device, dtype=torch.float32)
    if m.numel() != T:
        raise ValueError(f"padding_mask must hold one entry per token ({T}), got {padding_mask.numel()}")
    return m


def load_balancing_loss(
    probs: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    padding_mask: torch.Tensor | None = None,
    slot_mask: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Switch/GShard load-balancing loss, ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of tokens routed to expert ``e`` (summed over the k slots, so
    ``sum_e f_e = k``), ``P_e`` the mean router probability of ``e``. It equals
    transformers' ``load_balancing_loss_func`` for one layer: ``k`` when routing is
    perfectly balanced, up to ``k * E`` when it collapses onto k experts.

    Args:
        probs: ``[T, E]`` router probabilities (float32).
        indices: ``[T, k]`` chosen experts.
        padding_mask: ``[T]`` (or any shape with T entries), 1/True for real tokens.
        slot_mask: ``[T, k]`` bool, slots that exist (expert choice).
        reduce: applied to the per-expert sums and the token count before they become
            means (expert parallelism passes an all-reduce, so ``f`` and ``P`` are means
            over the global batch).
    """
    T = probs.shape[0]
    m = _token_mask(padding_mask, T, probs.device)
    slot_w = torch.ones(indices.shape, device=probs.device)
    if slot_mask is not None:
        slot_w = slot_w * slot_mask
    if m is not None:
        slot_w = slot_w * m.unsqueeze(-1)
        probs_sum = (probs * m.unsqueeze(-1)).sum(0)
        n = m.sum().clamp_min(1.0)
    else:
        probs_sum = probs.sum(0)
        n = torch.tensor(float(max(T, 1)), device=probs.device)
    counts = torch.zeros(num_experts, device=probs.device).scatter_add_(0, indices.reshape(-1), slot_w.reshape(-1))
    if reduce is not None:
        counts, probs_sum, n = reduce(torch.cat([counts, probs_sum, n.reshape(1)])).split([num_experts, num_experts, 1])
        n = n[0]
    return num_experts * torch.sum((counts / n) * (probs_sum / n))


def z_loss(
    logits: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022): mean over tokens of ``logsumexp(logits)^2``.
    Keeps router logits small, which keeps the float32 softmax well conditioned.
    ``reduce`` (an all-reduce under expert parallelism) makes it the global batch's mean."""
    z = torch.logsumexp(logits.float(), dim=-1) ** 2  # [T]
    m = _token_mask(padding_mask, logits.shape[0], logits.device)
    if reduce is None:
        return z.mean() if m is None else (z * m).sum() / m.sum().clamp_min(1.0)
    total = (z.sum() if m is None else (z * m).sum()).reshape(1)
    count = z.new_tensor([float(z.shape[0])]) if m is None else m.sum().reshape(1).to(z.dtype)
    total, count = reduce(torch.cat([total, count])).unbind(0)
    return total / count.clamp_min(1.0)


def sequence_balance_loss(
    probs: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences.

    Per sequence of length S: ``f_e = E / (k S) * count_e`` and ``P_e = mean_t p'_{t,e}``
    with ``p'`` the scores normalised per token; loss ``sum_e f_e P_e``, which is 1 when
    the sequence is balanced.

    Args:
        probs: ``[B, S, E]`` per-token normalised scores.
        indices: ``[B, S, k]`` chosen experts.
        padding_mask: ``[B, S]`` 1/True for real tokens.
    """
    B, S, _ = probs.shape
    k = indices.shape[-1]
    m = torch.ones(B, S, device=probs.device) if padding_mask is None else padding_mask.reshape(B, S).float()
    length = m.sum(1).clamp_min(1.0)  # [B]
    counts = torch.zeros(B, num_experts, device=probs.device)
    counts.scatter_add_(1, indices.reshape(B, S * k), m.repeat_interleave(k, dim=1))  # [B, E]
    f = counts * num_experts / (k * length.unsqueeze(1))
    p = (probs * m.unsqueeze(-1)).sum(1) / length.unsqueeze(1)  # [B, E]
    return (f * p).sum(1).mean()


def expert_weighted_loss(
    weights: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The mixture objective of Jacobs et al. 1991: each expert is judged on its own
    output, and the per-expert losses are weighted by the gate.

    ``mean_t sum_j weights[t, j] * losses[t, j]``. Unlike "combine the outputs, then one
    loss", experts do not compensate for each other's errors, so they compete for inputs
    and specialise. Use with ``MoE(..., return_expert_outputs=True)``.

    Args:
        weights: ``[T, k]`` gate weights of the chosen experts (``MoEOutput.routing.weights``).
        losses: ``[T, k]`` loss of each chosen expert's own output for its token.
        mask: ``[T, k]`` bool, slots that were computed (``MoEOutput.expert_mask``).
    """
    if weights.shape != losses.shape:
        raise ValueError(f"weights and losses must have the same shape, got {tuple(weights.shape)} and {tuple(losses.shape)}")
    terms = weights.to(losses.dtype) * losses
    if mask is not None:
        terms = terms * mask
    return terms.sum(-1).mean()
