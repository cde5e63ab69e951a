"""Wrappers of the low-precision kernels (``cpu_lowp.c``): row products and the one-token
decode steps with weights stored as ``bf16``, ``int8`` or ``int4`` codes (the formats of
:mod:`moekit.ops.lowp`). Tensors in, tensors out, every argument checked before it reaches C."""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from moekit.kernels import checks as ck
from moekit.kernels.decode import check_caches, check_position
from moekit.kernels.ffi import check_rc, ptr

FORMAT_CODES = {"bf16": 0, "int8": 1, "int4": 2}
LOWP_MAX_ROWS = 64  # rows of x one call takes (the C side's activation scales)
_CODE_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}


class LowpWeights(NamedTuple):
    """Rows ``[..., N, K]`` of weights in ``fmt``, checked: ``codes`` (bf16 ``[..., N, K]``, int8
    ``[..., N, K]``, int4 ``[..., N, K/2]``), ``scale`` (int8 ``[..., N]``, int4
    ``[..., N, K/group_size]``, bf16 ``None``), both contiguous on the CPU."""

    fmt: str
    codes: torch.Tensor
    scale: torch.Tensor | None
    group_size: int
    N: int
    K: int


def lowp_weights(name: str, fmt: str, codes: torch.Tensor, scale: torch.Tensor | None, group_size: int,
                 lead: tuple[int, ...] = ()) -> LowpWeights:
    """``codes`` and ``scale`` checked as :class:`LowpWeights` with leading dimensions ``lead``
    (e.g. ``(E,)`` for every expert's rows); a ValueError names what is wrong."""
    if fmt not in FORMAT_CODES:
        raise ValueError(f"no kernel for weight format {fmt!r}; kernels: {sorted(FORMAT_CODES)}")
    dtype = _CODE_DTYPES[fmt]
    dims = len(lead) + 2
    if (not isinstance(codes, torch.Tensor) or codes.dtype != dtype or codes.dim() != dims or not codes.is_contiguous()
            or codes.device.type != "cpu" or tuple(codes.shape[:-2]) != tuple(lead)):
        got = f"{codes.dtype} {list(codes.shape)}" if isinstance(codes, torch.Tensor) else type(codes).__name__
        want = "[" + ", ".join([*map(str, lead), "N", "K/2" if fmt == "int4" else "K"]) + "]"
        raise ValueError(f"{name}: {fmt} codes must be a contiguous {want} {dtype} CPU tensor, got {got}")
    N, K = codes.shape[-2], codes.shape[-1] * (2 if fmt == "int4" else 1)
    if fmt == "int8":
        ck.tensor(f"{name} scale", scale, shape=(*lead, N), contiguous=True)
    elif fmt == "int4":
        if group_size <= 0 or group_size > 1024 or group_size % 2 or K % group_size:
            raise ValueError(f"{name}: group_size {group_size} must be even, at most 1024, and divide the width {K}")
        ck.tensor(f"{name} scale", scale, shape=(*lead, N, K // group_size), contiguous=True)
    else:
        scale = None
    return LowpWeights(fmt, codes, scale, group_size, N, K)


def rows_lowp(lib: ctypes.CDLL, fmt: str, w: torch.Tensor, scale: torch.Tensor | None, group_size: int,
              x: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, accumulate: bool = False,
              norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """``out = alpha * v @ W.T (+ out)`` for the rows ``v`` of ``x [M, K]`` float32 (with
    ``norm_weight``: each row RMS-normalised times ``norm_weight``, epsilon ``eps``) and
    ``W [N, K]`` stored as ``fmt`` (``w``: bf16 ``[N, K]``, int8 ``[N, K]`` or packed int4
    ``[N, K/2]``; ``scale``: ``[N]`` (int8) or ``[N, K/group_size]`` (int4)). ``out [M, N]``
    float32. Returns ``out``."""
    W = lowp_weights("w", fmt, w, scale, group_size)
    ck.tensor("x", x, shape=(None, W.K))
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    M = x.shape[0]
    if not 1 <= M <= LOWP_MAX_ROWS:
        raise ValueError(f"x has {M} rows; rows_lowp takes 1 to {LOWP_MAX_ROWS} a call")
    ck.tensor("out", out, numel=M * W.N)
    ck.optional("norm_weight", norm_weight, numel=W.K)
    check_rc(lib.moekit_rows_lowp(FORMAT_CODES[fmt], w.data_ptr(), ptr(W.scale), W.N, W.K, group_size, x.data_ptr(),
                                  M, out.data_ptr(), alpha, int(accumulate), ptr(norm_weight), eps,
                                  torch.get_num_threads()), "moekit_rows_lowp")
    return out


class LowpMoETokenStep:
    """:class:`moekit.kernels.MoETokenStep` with the experts in a low-precision format, for up
    to :attr:`max_rows` tokens at once: ``step(x)`` does, in place, ``x[b] += sum over token
    b's chosen experts of w * w2_e @ (silu(w1_e @ h) * (w3_e @ h))``, ``h`` the RMS-normalised
    ``x[b]`` (``norm_weight``, ``eps``; ``None``: ``x[b]``), each chosen expert's weights read
    once for all the tokens that chose it. The router stays float32 (``gate_weight [E, d]``,
    ``gate_bias``; the k largest logits; softmax over them when ``renormalize``, else their
    probabilities; times ``scale``). ``w1``/``w3``: every expert's rows ``[E, f, d]`` and ``w2``
    ``[E, d, f]`` as :class:`LowpWeights` of one format and group. Returns each token's chosen
    experts and their weights (``k`` per token, token after token). Holds its own references
    to every tensor."""

    max_rows = 64  # tokens a call takes (MOE_MAX_ROWS in cpu_lowp.c)

    def __init__(self, lib: ctypes.CDLL, norm_weight: torch.Tensor | None, eps: float, gate_weight: torch.Tensor,
                 gate_bias: torch.Tensor | None, top_k: int, renormalize: bool, scale: float, w1: LowpWeights,
                 w3: LowpWeights, w2: LowpWeights):
        ck.tensor("gate_weight", gate_weight, shape=(None, None), contiguous=True)
        E, d = gate_weight.shape
        ck.optional("gate_bias", gate_bias, numel=E)
        ck.optional("norm_weight", norm_weight, numel=d)
        ck.positive("top_k", top_k, E)
        if len({w1.fmt, w3.fmt, w2.fmt}) != 1 or len({w1.group_size, w3.group_size, w2.group_size}) != 1:
            raise ValueError("w1, w3 and w2 must share one format and group size")
        f = w1.N
        for name, w, shape in (("w1", w1, (E, f, d)), ("w3", w3, (E, f, d)), ("w2", w2, (E, d, f))):
            if (w.codes.shape[0], w.N, w.K) != shape:
                raise ValueError(f"{name} must hold rows {list(shape)} for a gate of shape {[E, d]}, got "
                                 f"{[w.codes.shape[0], w.N, w.K]}")
        self._keep = (norm_weight, gate_weight, gate_bias, w1, w3, w2)
        self._fn, self.d, self.top_k = lib.moekit_moe_token_lowp, d, top_k
        self._fmt = (FORMAT_CODES[w1.fmt], w1.group_size)
        self._rest = (ptr(norm_weight), eps, gate_weight.data_ptr(), ptr(gate_bias), E, top_k, int(renormalize),
                      scale, *(p for w in (w1, w3, w2) for p in (w.codes.data_ptr(), ptr(w.scale))), f)
        self._chosen = (ctypes.c_long * (self.max_rows * top_k))()
        self._weights = (ctypes.c_float * (self.max_rows * top_k))()

    def __call__(self, x: torch.Tensor) -> tuple[list[int], list[float]]:
        """``x``: ``[B, d]`` or ``[d]`` contiguous float32, ``B <= max_rows``, updated in place."""
        ck.tensor("x", x)
        B = x.numel() // self.d if self.d else 0
        if not x.is_contiguous() or x.shape[-1] != self.d or not 1 <= B <= self.max_rows:
            raise ValueError(f"x must be a contiguous [B, {self.d}] float32 tensor with 1 <= B <= {self.max_rows}, "
                             f"got {list(x.shape)}")
        check_rc(self._fn(*self._fmt, x.data_ptr(), B, self.d, *self._rest, self._chosen, self._weights,
                          torch.get_num_threads()), "moekit_moe_token_lowp")
        n = B * self.top_k
        return list(self._chosen[:n]), list(self._weights[:n])


class LowpAttentionStep:
    """:class:`moekit.kernels.AttentionStep` with the projections in a low-precision format:
    ``w_qkv`` rows ``[(H + 2 Hkv) hd, d]`` and ``w_o`` rows ``[d, H hd]`` as
    :class:`LowpWeights` of one format and group; biases, norm and caches float32 as there."""

    def __init__(self, lib: ctypes.CDLL, norm_weight: torch.Tensor, eps: float, w_qkv: LowpWeights,
                 b_qkv: torch.Tensor | None, heads: tuple[int, int, int], k_cache: torch.Tensor,
                 v_cache: torch.Tensor, w_o: LowpWeights, b_o: torch.Tensor | None):
        H, Hkv, hd = (ck.positive(n, v) for n, v in zip(("H", "Hkv", "hd"), heads))
        if hd % 2 or H % Hkv:
            raise ValueError(f"heads must have an even head size and H a multiple of Hkv, got {heads}")
        if w_qkv.fmt != w_o.fmt or w_qkv.group_size != w_o.group_size:
            raise ValueError("w_qkv and w_o must share one format and group size")
        d = w_qkv.K
        if w_qkv.N != (H + 2 * Hkv) * hd or (w_o.N, w_o.K) != (d, H * hd):
            raise ValueError(f"w_qkv must hold rows {[(H + 2 * Hkv) * hd, d]} and w_o rows {[d, H * hd]}, got "
                             f"{[w_qkv.N, w_qkv.K]} and {[w_o.N, w_o.K]}")
        ck.tensor("norm_weight", norm_weight, numel=d)
        ck.optional("b_qkv", b_qkv, numel=(H + 2 * Hkv) * hd)
        ck.optional("b_o", b_o, numel=d)
        check_caches(k_cache, v_cache, Hkv, hd)
        self._keep = (norm_weight, w_qkv, b_qkv, k_cache, v_cache, w_o, b_o)
        self._fn = lib.moekit_attention_token_lowp
        self.d, self.hd, self.rows = d, hd, k_cache.shape[1]
        self._fmt = (FORMAT_CODES[w_qkv.fmt], w_qkv.group_size)
        self._qkv = (norm_weight.data_ptr(), eps, w_qkv.codes.data_ptr(), ptr(w_qkv.scale), ptr(b_qkv), H, Hkv, hd)
        self._cache = (k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0))
        self._out = (w_o.codes.data_ptr(), ptr(w_o.scale), ptr(b_o))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, start: int) -> None:
        check_position(x, cos, sin, pos, start, self.d, self.hd, self.rows)
        check_rc(self._fn(*self._fmt, x.data_ptr(), self.d, *self._qkv, cos.data_ptr(), sin.data_ptr(), *self._cache,
                          pos, start, *self._out, torch.get_num_threads()), "moekit_attention_token_lowp")
