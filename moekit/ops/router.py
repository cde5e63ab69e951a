"""The softmax top-k router as an autograd Function over :func:`moekit.kernels.topk_softmax`
(softmax, top-k, renormalise and scale in one pass per row each way), with its torch-ops
reference beside it."""

from __future__ import annotations

import torch

from moekit import kernels
from moekit.ops._lib import lib


def topk_softmax_reference(logits: torch.Tensor, k: int, renormalize: bool, scale: float, with_losses: bool = False
                           ) -> tuple[torch.Tensor, ...]:
    """``(probs [T, E], weights [T, k], indices [T, k])``: the softmax, its k largest
    probabilities (divided by their sum where ``renormalize``, times ``scale``) and where they
    are; ``with_losses``: also the balancing loss ``E * sum_e f_e P_e`` (f the slots each
    expert got per token, P the mean probability) and the z-loss ``mean(logsumexp^2)``, over
    all tokens (as :mod:`moekit.layers.losses` without masks)."""
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)  # [T, E] -> [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = (probs, weights * scale if scale != 1.0 else weights, indices)
    if not with_losses:
        return out
    T, E = logits.shape
    n = float(max(T, 1))
    load = torch.bincount(indices.reshape(-1), minlength=E).to(logits.dtype)
    balance = E * torch.sum((load / n) * (probs.sum(0) / n))
    return (*out, balance, torch.logsumexp(logits, dim=-1).square().mean())


class _TopKSoftmax(torch.autograd.Function):
    """The gradient reaches the logits from the probabilities, the weights and (``with_losses``)
    the two losses, through the kernel's sums: the logsumexp per row, the probabilities and
    slots per expert."""

    @staticmethod
    def forward(ctx, logits, k, renormalize, scale, with_losses):
        out = kernels.topk_softmax(lib(), logits, k, renormalize, scale, with_sums=with_losses)
        probs, weights, indices = out[:3]
        E, n = logits.shape[1], float(max(logits.shape[0], 1))
        balance = z = lse = load = None
        if with_losses:
            lse, psum, load = out[3:]
            balance = E * torch.dot(load, psum) / (n * n)
            z = torch.dot(lse, lse) / n
        ctx.save_for_backward(probs, indices, weights, lse, load)
        ctx.args = (renormalize, scale, E, n)
        ctx.mark_non_differentiable(indices)
        return probs, weights, indices, balance, z

    @staticmethod
    def backward(ctx, dprobs, dweights, _, dbalance, dz):
        probs, indices, weights, lse, load = ctx.saved_tensors
        renormalize, scale, E, n = ctx.args
        dpsum = None if dbalance is None else load * (dbalance * E / (n * n))  # d balance / d psum_e
        dlse = None if dz is None else lse * (dz * 2.0 / n)  # d z / d lse_t
        dlogits = kernels.topk_softmax_backward(lib(), probs, indices, weights, dprobs, dweights, renormalize, scale,
                                                dlse=dlse, dpsum=dpsum)
        return dlogits, None, None, None, None


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool, scale: float, with_losses: bool = False
                 ) -> tuple[torch.Tensor, ...]:
    """:func:`topk_softmax_reference` in the kernels (ties go to the lower index). The losses
    come from the softmax's own sums in two scalars, where torch ops take a few dozen small
    calls and their backward (benchmarks/moe_vs_dense.py --dtype bfloat16)."""
    out = _TopKSoftmax.apply(logits, k, renormalize, scale, with_losses)
    return out if with_losses else out[:3]
