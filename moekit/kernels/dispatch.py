"""Wrappers of the row-moving and routing kernels (``cpu_rows.c``): the plan (slots sorted by
expert), the gather into expert order and the weighted combine back, their backward passes
(float32 or bfloat16 on either side), and the softmax top-k router with its backward.
Tensors and scalars in, tensors out; every argument checked, index values included, before
it reaches C."""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from moekit.kernels import checks as ck
from moekit.kernels.ffi import check_rc, ptr


ROW_DTYPES = (torch.float32, torch.bfloat16)  # what the row kernels read and write


def _row_dtype(name: str, t) -> int:
    """1 where ``t`` (a tensor or a dtype) is bfloat16, 0 where float32; else a ValueError."""
    return int(ck.dtype_in(name, t, ROW_DTYPES) == torch.bfloat16)


def gather_rows(lib: ctypes.CDLL, src: torch.Tensor, idx: torch.Tensor, k: int,
                weight: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``out[i] = sum over j < k of weight[i k + j] * src[idx[i k + j]]``, skipping ``idx < 0``
    (``weight`` None: 1; a row with no source is 0). ``src [S, d]`` float32 or bfloat16, ``idx``
    int64 ``[n k]`` with values in ``[-1, S)``, ``weight`` float32 ``[n k]``. Returns ``[n, d]``
    in ``dtype`` (float32 or bfloat16; default ``src``'s), each row summed in float32."""
    src_bf16 = _row_dtype("src", src)
    dst_bf16 = _row_dtype("dtype", src.dtype if dtype is None else dtype)
    ck.tensor("src", src, src.dtype, shape=(None, None))
    ck.tensor("idx", idx, ck.I64)
    ck.positive("k", k)
    if idx.numel() % k:
        raise ValueError(f"idx must hold a multiple of k={k} values, got {idx.numel()}")
    src, idx = src.contiguous(), idx.contiguous()
    ck.indices("idx", idx, -1, src.shape[0])
    weight = ck.optional("weight", None if weight is None else weight.contiguous(), numel=idx.numel())
    n, d = idx.numel() // k, src.shape[1]
    out = src.new_empty(n, d, dtype=torch.bfloat16 if dst_bf16 else torch.float32)
    check_rc(lib.moekit_gather_rows(src.data_ptr(), src_bf16, d, idx.data_ptr(), ptr(weight), k, n, out.data_ptr(),
                                    dst_bf16, torch.get_num_threads()), "moekit_gather_rows")
    return out


def combine_backward(lib: ctypes.CDLL, dout: torch.Tensor, y: torch.Tensor, token_idx: torch.Tensor,
                     weight: torch.Tensor, need_dy: bool, need_dw: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``out[token_idx[i]] += weight[i] * y[i]``: ``dy [n, d]`` (``y``'s dtype) and
    ``dw [n]`` float32 (each ``None`` unless needed). ``dout [T, d]`` and ``y [n, d]`` float32 or
    bfloat16, ``token_idx`` int64 ``[n]`` with values in ``[-1, T)`` (-1: a padding row, whose
    ``dy`` and ``dw`` are 0), ``weight`` float32 ``[n]``."""
    y_bf16, dout_bf16 = _row_dtype("y", y), _row_dtype("dout", dout)
    ck.tensor("y", y, y.dtype, shape=(None, None))
    n, d = y.shape
    ck.tensor("dout", dout, dout.dtype, shape=(None, d))
    ck.tensor("token_idx", token_idx, ck.I64, shape=(n,))
    ck.tensor("weight", weight, shape=(n,))
    dout, y, token_idx, weight = dout.contiguous(), y.contiguous(), token_idx.contiguous(), weight.contiguous()
    ck.indices("token_idx", token_idx, -1, dout.shape[0])
    dy = y.new_empty(n, d) if need_dy else None
    dw = weight.new_empty(n) if need_dw else None
    check_rc(lib.moekit_combine_backward(dout.data_ptr(), dout_bf16, y.data_ptr(), y_bf16, d, token_idx.data_ptr(),
                                         weight.data_ptr(), n, ptr(dy), ptr(dw), torch.get_num_threads()),
             "moekit_combine_backward")
    return dy, dw


class SortedSlots(NamedTuple):
    """:func:`sort_slots`' answer; ``N`` slots exist, ``P`` rows in the padded layout."""

    counts: torch.Tensor
    """``[E]`` slots per expert."""
    slot_idx: torch.Tensor
    """``[N]`` the slots in expert order (slot order within an expert)."""
    token_idx: torch.Tensor
    """``[N]`` their tokens (slot // k)."""
    rows: torch.Tensor
    """``[N]`` their rows in the padded layout."""
    pos: torch.Tensor
    """``[S]`` the padded row of each slot, -1 where it does not exist."""
    row_token: torch.Tensor
    """``[P]`` the token of each padded row, -1 for padding."""
    row_slot: torch.Tensor
    """``[P]`` the slot of each padded row, -1 for padding."""
    padded_counts: torch.Tensor
    """``[E]`` rows per expert in the padded layout (``counts`` rounded up to the multiple)."""


def sort_slots(lib: ctypes.CDLL, expert: torch.Tensor, num_experts: int, k: int, multiple: int = 1) -> SortedSlots:
    """The router's slots sorted by expert (a stable counting sort), each expert's rows
    starting on a multiple of ``multiple`` in a padded layout (1: no padding). ``expert``:
    int64 ``[S]`` (``S = T k``), each slot's expert in ``[0, num_experts]``, ``num_experts``
    where the slot does not exist (dropped or masked)."""
    ck.tensor("expert", expert, ck.I64)
    ck.positive("num_experts", num_experts)
    ck.positive("k", k)
    ck.positive("multiple", multiple)
    expert = expert.contiguous().reshape(-1)
    if expert.numel() % k:
        raise ValueError(f"expert must hold a multiple of k={k} values, got {expert.numel()}")
    ck.indices("expert", expert, 0, num_experts + 1)
    S, E = expert.numel(), num_experts
    most = S + E * (multiple - 1)  # every expert's last segment padded by at most multiple - 1 rows
    counts, slots = torch.empty(E, dtype=torch.long), torch.empty(4 * S + 2 * most, dtype=torch.long)
    slot_idx, token_idx, rows, pos, row_token, row_slot = slots.split([S, S, S, S, most, most])
    P = lib.moekit_sort_slots(expert.data_ptr(), S, E, k, multiple, counts.data_ptr(), slot_idx.data_ptr(),
                              token_idx.data_ptr(), rows.data_ptr(), pos.data_ptr(), row_token.data_ptr(),
                              row_slot.data_ptr())
    if P < 0:
        raise MemoryError("moekit_sort_slots could not allocate its buffers")
    N = int(counts.sum())
    padded = (counts + multiple - 1) // multiple * multiple
    return SortedSlots(counts, slot_idx[:N], token_idx[:N], rows[:N], pos, row_token[:P], row_slot[:P], padded)


def topk_softmax(lib: ctypes.CDLL, logits: torch.Tensor, k: int, renormalize: bool, scale: float,
                 with_sums: bool = False) -> tuple[torch.Tensor, ...]:
    """The softmax top-k router on float32 ``logits [T, E]``: ``probs [T, E]``, ``weights
    [T, k]`` (the k largest probabilities, ties to the lower index, divided by their sum where
    ``renormalize``, times ``scale``) and ``indices`` int64 ``[T, k]``; ``with_sums``: also
    the losses' sums, computed with the softmax: each row's logsumexp ``[T]`` (the z-loss's),
    the probabilities' sum over rows ``[E]`` and the slots each expert got ``[E]`` (float32;
    the balancing loss's)."""
    ck.tensor("logits", logits, shape=(None, None))
    T, E = logits.shape
    ck.positive("k", k, E)
    logits = logits.contiguous()
    probs, weights = logits.new_empty(T, E), logits.new_empty(T, k)
    indices = torch.empty(T, k, dtype=torch.long)
    lse, psum, load = (logits.new_empty(T), logits.new_empty(E), logits.new_empty(E)) if with_sums else (None,) * 3
    check_rc(lib.moekit_topk_softmax(logits.data_ptr(), T, E, k, int(renormalize), scale, probs.data_ptr(),
                                     indices.data_ptr(), weights.data_ptr(), ptr(lse), ptr(psum), ptr(load),
                                     torch.get_num_threads()), "moekit_topk_softmax")
    return (probs, weights, indices, lse, psum, load) if with_sums else (probs, weights, indices)


def topk_softmax_backward(lib: ctypes.CDLL, probs: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                          dprobs: torch.Tensor | None, dweights: torch.Tensor | None, renormalize: bool,
                          scale: float, dlse: torch.Tensor | None = None, dpsum: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """The gradient of :func:`topk_softmax`'s outputs (``dlse``: the logsumexp's, ``[T]``;
    ``dpsum``: the probability sums', ``[E]``) back to the logits, ``[T, E]``."""
    ck.tensor("probs", probs, shape=(None, None), contiguous=True)
    T, E = probs.shape
    ck.tensor("indices", indices, ck.I64, shape=(T, None), contiguous=True)
    k = ck.positive("indices.shape[1]", indices.shape[1], E)
    ck.indices("indices", indices, 0, E)
    ck.tensor("weights", weights, shape=(T, k), contiguous=True)
    dprobs = ck.optional("dprobs", None if dprobs is None else dprobs.contiguous(), shape=(T, E))
    dweights = ck.optional("dweights", None if dweights is None else dweights.contiguous(), shape=(T, k))
    dlse = ck.optional("dlse", None if dlse is None else dlse.contiguous(), shape=(T,))
    dpsum = ck.optional("dpsum", None if dpsum is None else dpsum.contiguous(), shape=(E,))
    dlogits = probs.new_empty(T, E)
    check_rc(lib.moekit_topk_softmax_backward(probs.data_ptr(), indices.data_ptr(), weights.data_ptr(), ptr(dprobs),
                                              ptr(dweights), ptr(dlse), ptr(dpsum), T, E, k, int(renormalize), scale,
                                              dlogits.data_ptr(), torch.get_num_threads()),
             "moekit_topk_softmax_backward")
    return dlogits
