"""The router's kernels as autograd Functions, each with its torch-ops reference beside it:
the gate's logits over :func:`moekit.kernels.router_logits` (reference: ``F.linear``) and the
softmax top-k over :func:`moekit.kernels.topk_softmax` (softmax, top-k, renormalise and scale
in one pass per row each way)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def router_logits_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The gate's logits ``[T, E]`` for ``x [T, d]``, ``weight [E, d]``, ``bias [E]`` or None."""
    return F.linear(x, weight, bias)


class _RouterLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return kernels.router_logits(lib(), x, weight, bias)

    @staticmethod
    def backward(ctx, dlogits):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        return kernels.router_logits_backward(lib(), x, weight, dlogits, need_x, need_w, need_b and ctx.has_bias)


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`router_logits_reference` in the kernels (float32 on the CPU)."""
    return _RouterLogits.apply(x, weight, bias)
