"""The softmax top-k router as an autograd Function over :func:`moekit.kernels.topk_softmax`
(softmax, top-k, renormalise and scale in one pass per row each way), with its torch-ops
reference beside it."""

from __future__ import annotations

import torch

from moekit import kernels
from moekit.ops._lib import lib


def topk_softmax_reference(logits: torch.Tensor, k: int, renormalize: bool, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs [T, E], weights [T, k], indices [T, k])``: the softmax, its k largest
    probabilities (divided by their sum where ``renormalize``, times ``scale``) and where they are."""
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)  # [T, E] -> [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights * scale if scale != 1.0 else weights, indices


class _TopKSoftmax(torch.autograd.Function):
    """The gradient reaches the logits from the probabilities (the losses) and the weights."""

    @staticmethod
    def forward(ctx, logits, k, renormalize, scale):
        probs, weights, indices = kernels.topk_softmax(lib(), logits, k, renormalize, scale)
        ctx.save_for_backward(probs, indices, weights)
        ctx.args = (renormalize, scale)
        ctx.mark_non_differentiable(indices)
        return probs, weights, indices

    @staticmethod
    def backward(ctx, dprobs, dweights, _):
        probs, indices, weights = ctx.saved_tensors
        renormalize, scale = ctx.args
        dlogits = kernels.topk_softmax_backward(lib(), probs, indices, weights, dprobs, dweights, renormalize, scale)
        return dlogits, None, None, None


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`topk_softmax_reference` in the kernels (ties go to the lower index)."""
    return _TopKSoftmax.apply(logits, k, renormalize, scale)
