"""The softmax top-k router as an autograd Function over :func:`moekit.kernels.topk_softmax`
(softmax, top-k, renormalise and scale in one pass per row each way), with its torch-ops
reference beside it."""

from __future__ import annotations

import torch

from moekit import kernels
from moekit.ops._lib import lib


def topk_softmax_reference(logits: torch.Tensor, k: int, renormalize: bool, scale: float, with_lse: bool = False
                           ) -> tuple[torch.Tensor, ...]:
    """``(probs [T, E], weights [T, k], indices [T, k])``: the softmax, its k largest
    probabilities (divided by their sum where ``renormalize``, times ``scale``) and where they
    are; ``with_lse``: also each row's logsumexp ``[T]``."""
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)  # [T, E] -> [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = (probs, weights * scale if scale != 1.0 else weights, indices)
    return (*out, torch.logsumexp(logits, dim=-1)) if with_lse else out


class _TopKSoftmax(torch.autograd.Function):
    """The gradient reaches the logits from the probabilities (the losses), the weights and
    the logsumexp (the z-loss)."""

    @staticmethod
    def forward(ctx, logits, k, renormalize, scale):
        probs, weights, indices, lse = kernels.topk_softmax(lib(), logits, k, renormalize, scale, with_lse=True)
        ctx.save_for_backward(probs, indices, weights)
        ctx.args = (renormalize, scale)
        ctx.mark_non_differentiable(indices)
        return probs, weights, indices, lse

    @staticmethod
    def backward(ctx, dprobs, dweights, _, dlse):
        probs, indices, weights = ctx.saved_tensors
        renormalize, scale = ctx.args
        dlogits = kernels.topk_softmax_backward(lib(), probs, indices, weights, dprobs, dweights, renormalize, scale,
                                                dlse=dlse)
        return dlogits, None, None, None


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool, scale: float, with_lse: bool = False
                 ) -> tuple[torch.Tensor, ...]:
    """:func:`topk_softmax_reference` in the kernels (ties go to the lower index); the
    logsumexp comes with the softmax's own sums."""
    out = _TopKSoftmax.apply(logits, k, renormalize, scale)
    return out if with_lse else out[:3]
