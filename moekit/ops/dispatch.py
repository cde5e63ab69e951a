"""The dispatch's row movement as autograd Functions over :mod:`moekit.kernels.dispatch`: the
gather of tokens into expert order and the weighted combine back into token order, each one
pass per direction (no scatter, no zero-fill, no atomics; float32 or bfloat16 rows, with
padding rows between the experts' segments where the experts want them), with the torch-ops
references (``index_select``, ``index_add_``) beside them."""

from __future__ import annotations

import torch

from moekit import kernels
from moekit.ops._lib import lib


def gather_rows_reference(x: torch.Tensor, token_idx: torch.Tensor) -> torch.Tensor:
    """``x[token_idx]``: ``[T, d] -> [N, d]``."""
    return x.index_select(0, token_idx)


class _GatherRows(torch.autograd.Function):
    """``x_sorted = x[token_idx]`` in ``dtype`` (rows with ``token_idx < 0``: zero); the
    backward sums each token's rows of the gradient (``pos``: its slots' sorted rows, ``k``
    per token, -1 where dropped) in ``x``'s dtype."""

    @staticmethod
    def forward(ctx, x, token_idx, pos, k, dtype):
        ctx.save_for_backward(pos)
        ctx.k, ctx.dtype = k, x.dtype
        return kernels.gather_rows(lib(), x, token_idx, 1, dtype=dtype)

    @staticmethod
    def backward(ctx, dx_sorted):
        (pos,) = ctx.saved_tensors
        return kernels.gather_rows(lib(), dx_sorted, pos, ctx.k, dtype=ctx.dtype), None, None, None, None


def gather_rows(x: torch.Tensor, token_idx: torch.Tensor, pos: torch.Tensor, k: int,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`gather_rows_reference` in the kernels, the rows in ``dtype`` (float32 or
    bfloat16; default ``x``'s), and zero where ``token_idx`` is -1 (padding). ``pos`` (int64
    ``[T k]``): the sorted row of each slot, -1 where dropped (the backward gathers through it)."""
    return _GatherRows.apply(x, token_idx, pos, k, x.dtype if dtype is None else dtype)


def combine_reference(y_sorted: torch.Tensor, weights: torch.Tensor, token_idx: torch.Tensor,
                      slot_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``out[t] = sum of weight * y`` over the sorted rows of token ``t``: ``y_sorted
    [N, d_out]``, ``weights [T, k]``, ``token_idx``/``slot_idx`` ``[N]`` -> ``[T, d_out]``."""
    w = weights.reshape(-1).index_select(0, slot_idx).to(y_sorted.dtype)  # [T, k] -> [N]
    out = y_sorted.new_zeros(num_tokens, y_sorted.shape[-1])
    return out.index_add_(0, token_idx, y_sorted * w.unsqueeze(-1))  # [N, d_out] -> [T, d_out]


class _Combine(torch.autograd.Function):
    """``out[t] = sum over j of weights[t, j] * y_sorted[pos[t k + j]]`` in ``dtype``;
    gradients for ``y_sorted`` (0 on padding rows, ``token_idx`` -1) and ``weights`` (``[T, k]``;
    0 for dropped slots)."""

    @staticmethod
    def forward(ctx, y_sorted, weights, token_idx, slot_idx, pos, dtype):
        ctx.save_for_backward(y_sorted, weights, token_idx, slot_idx, pos)
        return kernels.gather_rows(lib(), y_sorted, pos, weights.shape[1], weights.reshape(-1), dtype=dtype)

    @staticmethod
    def backward(ctx, dout):
        y_sorted, weights, token_idx, slot_idx, pos = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[:2]
        w_sorted = weights.reshape(-1).index_select(0, slot_idx.clamp(min=0))  # [N]; padding rows' unused
        dy, dw_sorted = kernels.combine_backward(lib(), dout, y_sorted, token_idx, w_sorted, need_y, need_w)
        dw = None
        if need_w:  # each slot's from its sorted row: [N] -> [T k], 0 where dropped
            dw = kernels.gather_rows(lib(), dw_sorted.unsqueeze(1), pos, 1).view_as(weights)
        return dy, dw, None, None, None, None


def combine(y_sorted: torch.Tensor, weights: torch.Tensor, token_idx: torch.Tensor, slot_idx: torch.Tensor,
            pos: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`combine_reference` in the kernels, out in ``dtype`` (float32 or bfloat16; default
    ``y_sorted``'s), each row summed in float32. ``pos`` as for :func:`gather_rows`; rows of
    ``y_sorted`` that no slot points at (padding: ``token_idx`` and ``slot_idx`` -1) are skipped."""
    return _Combine.apply(y_sorted, weights, token_idx, slot_idx, pos, y_sorted.dtype if dtype is None else dtype)
