"""The softmax top-k router as an autograd Function over :func:`moekit.kernels.topk_softmax`
(softmax, top-k, renormalise and scale in one pass per row each way), with its torch-ops
reference beside it."""

from __future__ import annotations

import torch

from moekit import kernels
from moekit.ops._lib import lib


def topk_softmax_reference(logits: torch.Tensor, k: int, renormalize: bool, scale: float, with_sums: bool = False
                           ) -> tuple[torch.Tensor, ...]:
    """``(probs [T, E], weights [T, k], indices [T, k])``: the softmax, its k largest
    probabilities (divided by their sum where ``renormalize``, times ``scale``) and where they
    are; ``with_sums``: also each row's logsumexp ``[T]``, the probabilities' sum over rows
    ``[E]`` and the slots each expert got ``[E]`` (float32)."""
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)  # [T, E] -> [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = (probs, weights * scale if scale != 1.0 else weights, indices)
    if not with_sums:
        return out
    load = torch.bincount(indices.reshape(-1), minlength=logits.shape[-1]).to(logits.dtype)
    return (*out, torch.logsumexp(logits, dim=-1), probs.sum(0), load)


class _TopKSoftmax(torch.autograd.Function):
    """The gradient reaches the logits from the probabilities (the losses), the weights, the
    logsumexp (the z-loss) and the probabilities' sums (the balancing loss)."""

    @staticmethod
    def forward(ctx, logits, k, renormalize, scale):
        out = kernels.topk_softmax(lib(), logits, k, renormalize, scale, with_sums=True)
        probs, weights, indices = out[:3]
        ctx.save_for_backward(probs, indices, weights)
        ctx.args = (renormalize, scale)
        ctx.mark_non_differentiable(indices, out[5])
        return out

    @staticmethod
    def backward(ctx, dprobs, dweights, _, dlse, dpsum, __):
        probs, indices, weights = ctx.saved_tensors
        renormalize, scale = ctx.args
        dlogits = kernels.topk_softmax_backward(lib(), probs, indices, weights, dprobs, dweights, renormalize, scale,
                                                dlse=dlse, dpsum=dpsum)
        return dlogits, None, None, None


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool, scale: float, with_sums: bool = False
                 ) -> tuple[torch.Tensor, ...]:
    """:func:`topk_softmax_reference` in the kernels (ties go to the lower index); the losses'
    sums come with the softmax, where torch ops would take a dozen small calls and their
    backward (about 2% of a small MoE's training step: benchmarks/moe_vs_dense.py)."""
    out = _TopKSoftmax.apply(logits, k, renormalize, scale)
    return out if with_sums else out[:3]
