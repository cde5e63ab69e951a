"""Wrapper of the low-precision row products (``cpu_lowp.c``): tensors in, tensors out,
every argument checked before it reaches C."""

from __future__ import annotations

import ctypes

import torch

from moekit.kernels import checks as ck
from moekit.kernels.ffi import check_rc

FORMAT_CODES = {"bf16": 0, "int8": 1, "int4": 2}
LOWP_MAX_ROWS = 64  # rows of x one call takes (the C side's activation scales)


def rows_lowp(lib: ctypes.CDLL, fmt: str, w: torch.Tensor, scale: torch.Tensor | None, group_size: int,
              x: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, accumulate: bool = False) -> torch.Tensor:
    """``out = alpha * x @ W.T (+ out)`` for ``x [M, K]`` float32 and ``W [N, K]`` stored as
    ``fmt`` (``w``: bf16 ``[N, K]``, int8 ``[N, K]`` or packed int4 ``[N, K/2]``; ``scale``:
    ``[N]`` (int8) or ``[N, K/group_size]`` (int4)). ``out [M, N]`` float32. Returns ``out``."""
    if fmt not in FORMAT_CODES:
        raise ValueError(f"no kernel for weight format {fmt!r}; kernels: {sorted(FORMAT_CODES)}")
    dtype = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[fmt]
    if w.dtype != dtype or w.dim() != 2 or not w.is_contiguous() or w.device.type != "cpu":
        raise ValueError(f"{fmt} weights must be a contiguous 2-D {dtype} CPU tensor, got {w.dtype} {list(w.shape)}")
    N, K = w.shape[0], w.shape[1] * (2 if fmt == "int4" else 1)
    ck.tensor("x", x, shape=(None, K))
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    M = x.shape[0]
    if M > LOWP_MAX_ROWS:
        raise ValueError(f"x has {M} rows; rows_lowp takes at most {LOWP_MAX_ROWS} a call")
    ck.tensor("out", out, numel=M * N)
    if fmt == "int8":
        ck.tensor("scale", scale, numel=N)
    elif fmt == "int4":
        if group_size <= 0 or group_size > 1024 or group_size % 2 or K % group_size:
            raise ValueError(f"group_size {group_size} must be even, at most 1024, and divide the width {K}")
        ck.tensor("scale", scale, numel=N * (K // group_size))
    check_rc(lib.moekit_rows_lowp(FORMAT_CODES[fmt], w.data_ptr(), None if scale is None else scale.data_ptr(), N, K,
                                  group_size, x.data_ptr(), M, out.data_ptr(), alpha, int(accumulate),
                                  torch.get_num_threads()), "moekit_rows_lowp")
    return out
