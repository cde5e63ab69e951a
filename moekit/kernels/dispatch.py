"""Wrappers of the row-moving and routing kernels (``cpu_rows.c``): the gather into expert
order and the weighted combine back, their backward passes, and the softmax top-k router
with its backward. Tensors and scalars in, tensors out; every argument checked, index
values included, before it reaches C."""

from __future__ import annotations

import ctypes

import torch

from moekit.kernels import checks as ck
from moekit.kernels.ffi import check_rc, ptr


def gather_rows(lib: ctypes.CDLL, src: torch.Tensor, idx: torch.Tensor, k: int,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i] = sum over j < k of weight[i k + j] * src[idx[i k + j]]``, skipping ``idx < 0``
    (``weight`` None: 1; a row with no source is 0). ``src [S, d]``, ``idx`` int64 ``[n k]``
    with values in ``[-1, S)``, ``weight`` float32 ``[n k]``. Returns ``[n, d]``."""
    ck.tensor("src", src, shape=(None, None))
    ck.tensor("idx", idx, ck.I64)
    ck.positive("k", k)
    if idx.numel() % k:
        raise ValueError(f"idx must hold a multiple of k={k} values, got {idx.numel()}")
    src, idx = src.contiguous(), idx.contiguous()
    ck.indices("idx", idx, -1, src.shape[0])
    weight = ck.optional("weight", None if weight is None else weight.contiguous(), numel=idx.numel())
    n, d = idx.numel() // k, src.shape[1]
    out = src.new_empty(n, d)
    check_rc(lib.moekit_gather_rows(src.data_ptr(), d, idx.data_ptr(), ptr(weight), k, n, out.data_ptr(),
                                    torch.get_num_threads()), "moekit_gather_rows")
    return out


def combine_backward(lib: ctypes.CDLL, dout: torch.Tensor, y: torch.Tensor, token_idx: torch.Tensor,
                     weight: torch.Tensor, need_dy: bool, need_dw: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``out[token_idx[i]] += weight[i] * y[i]``: ``dy [n, d]`` and ``dw [n]``
    (each ``None`` unless needed). ``dout [T, d]``, ``y [n, d]``, ``token_idx`` int64 ``[n]``
    with values in ``[0, T)``, ``weight`` float32 ``[n]``."""
    ck.tensor("y", y, shape=(None, None))
    n, d = y.shape
    ck.tensor("dout", dout, shape=(None, d))
    ck.tensor("token_idx", token_idx, ck.I64, shape=(n,))
    ck.tensor("weight", weight, shape=(n,))
    dout, y, token_idx, weight = dout.contiguous(), y.contiguous(), token_idx.contiguous(), weight.contiguous()
    ck.indices("token_idx", token_idx, 0, dout.shape[0])
    dy = y.new_empty(n, d) if need_dy else None
    dw = y.new_empty(n) if need_dw else None
    check_rc(lib.moekit_combine_backward(dout.data_ptr(), y.data_ptr(), d, token_idx.data_ptr(), weight.data_ptr(), n,
                                         ptr(dy), ptr(dw), torch.get_num_threads()), "moekit_combine_backward")
    return dy, dw


def topk_softmax(lib: ctypes.CDLL, logits: torch.Tensor, k: int, renormalize: bool, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The softmax top-k router on float32 ``logits [T, E]``: ``probs [T, E]``, ``weights
    [T, k]`` (the k largest probabilities, ties to the lower index, divided by their sum where
    ``renormalize``, times ``scale``) and ``indices`` int64 ``[T, k]``."""
    ck.tensor("logits", logits, shape=(None, None))
    T, E = logits.shape
    ck.positive("k", k, E)
    logits = logits.contiguous()
    probs, weights = logits.new_empty(T, E), logits.new_empty(T, k)
    indices = torch.empty(T, k, dtype=torch.long)
    check_rc(lib.moekit_topk_softmax(logits.data_ptr(), T, E, k, int(renormalize), scale, probs.data_ptr(),
                                     indices.data_ptr(), weights.data_ptr(), torch.get_num_threads()),
             "moekit_topk_softmax")
    return probs, weights, indices


def topk_softmax_backward(lib: ctypes.CDLL, probs: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                          dprobs: torch.Tensor | None, dweights: torch.Tensor | None, renormalize: bool,
                          scale: float) -> torch.Tensor:
    """The gradient of :func:`topk_softmax`'s outputs back to the logits, ``[T, E]``."""
    ck.tensor("probs", probs, shape=(None, None), contiguous=True)
    T, E = probs.shape
    ck.tensor("indices", indices, ck.I64, shape=(T, None), contiguous=True)
    k = ck.positive("indices.shape[1]", indices.shape[1], E)
    ck.indices("indices", indices, 0, E)
    ck.tensor("weights", weights, shape=(T, k), contiguous=True)
    dprobs = ck.optional("dprobs", None if dprobs is None else dprobs.contiguous(), shape=(T, E))
    dweights = ck.optional("dweights", None if dweights is None else dweights.contiguous(), shape=(T, k))
    dlogits = probs.new_empty(T, E)
    check_rc(lib.moekit_topk_softmax_backward(probs.data_ptr(), indices.data_ptr(), weights.data_ptr(), ptr(dprobs),
                                              ptr(dweights), T, E, k, int(renormalize), scale, dlogits.data_ptr(),
                                              torch.get_num_threads()), "moekit_topk_softmax_backward")
    return dlogits
