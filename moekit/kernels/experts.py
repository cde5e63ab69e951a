"""Wrappers of the experts' kernels over many rows: every SwiGLU expert over its own rows,
forward and backward, either with each weight read from memory once per pass (a few rows per
expert, ``cpu_gemv.c``) or as blocked matrix products with the experts shared among threads
(``blocked=True``: tens of rows per expert and up, ``cpu_blocks.c``); and the SwiGLU
activation in one pass. Tensors and scalars in, tensors out; every argument checked
before it reaches C."""

from __future__ import annotations

import ctypes

import torch

from moekit.kernels import checks as ck
from moekit.kernels.decode import _check_experts
from moekit.kernels.ffi import check_rc
from moekit.kernels.library import blocks_bf16


def _check_segments(x, tokens_per_expert, w1, w3, w2, blocked: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.dtype]:
    """Checked, contiguous ``x`` and ``tokens_per_expert``, the rows they cover, and the rows'
    dtype: float32, or bfloat16 for the blocked kernel where it is built (even widths; its
    weights bfloat16 or float32)."""
    dtype = ck.dtype_in("x", x, (torch.float32, torch.bfloat16) if blocked else (torch.float32,))
    wdtype = ck.dtype_in("w1", w1, (torch.bfloat16, torch.float32)) if dtype == torch.bfloat16 else dtype
    _check_experts(w1, w3, w2, one=False, dtype=wdtype)
    E, d, _ = w1.shape
    ck.tensor("x", x, dtype, shape=(None, d))
    if dtype == torch.bfloat16:
        if not blocks_bf16():
            raise ValueError("bfloat16 experts need the kernels' AVX-512 BF16 build, which this CPU or "
                             "compiler lacks (moekit.kernels.status() says which); use float32 or torch's products")
        sizes = {"d_model": d, "d_ff": w1.shape[2], "d_out": w2.shape[2], "w1's row stride": w1.stride(1),
                 "w2's row stride": w2.stride(1)}
        odd = [f"{name} {n}" for name, n in sizes.items() if n % 2]
        if odd:
            raise ValueError(f"bfloat16 experts take even widths and row strides (pairs of values), got {', '.join(odd)}")
    x = x.contiguous()
    counts = tokens_per_expert.contiguous() if isinstance(tokens_per_expert, torch.Tensor) else tokens_per_expert
    covered = sum(ck.counts("tokens_per_expert", counts, E, x.shape[0]))
    return x, counts, covered, dtype


def _weight_args(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype) -> tuple[int, ...]:
    """The experts' weights as the C functions take them (pointers, strides, widths), and for
    the bfloat16 kernel (rows of ``dtype`` bfloat16) its ``wf32``: float32 weights, rounded as
    it packs them, their gradients float32."""
    wf32 = (int(w1.dtype == torch.float32),) if dtype == torch.bfloat16 else ()
    return (w1.data_ptr(), w3.data_ptr(), w1.stride(0), w1.stride(1), w1.shape[2], w2.data_ptr(), w2.stride(0),
            w2.stride(1), w2.shape[2], *wf32)


def _blocks_name(blocked: bool, dtype: torch.dtype, suffix: str = "") -> str:
    if not blocked:
        return "moekit_swiglu_segments" + suffix
    return ("moekit_swiglu_blocks_bf16" if dtype == torch.bfloat16 else "moekit_swiglu_blocks") + suffix


def swiglu_segments(lib: ctypes.CDLL, x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor,
                    w3: torch.Tensor, w2: torch.Tensor, save: tuple[torch.Tensor, torch.Tensor] | None = None,
                    blocked: bool = False) -> torch.Tensor:
    """Every SwiGLU expert (``w1``/``w3`` ``[E, d, f]`` laid out alike, ``w2 [E, f, d_out]``,
    unit stride in a row) over its rows of ``x [N, d]`` (sorted by expert,
    ``tokens_per_expert`` int64 ``[E]`` rows each), each weight read from memory once.
    ``save``: two contiguous ``[N, f]`` tensors that receive the gate and up pre-activations,
    for :func:`swiglu_segments_backward` (called with the same ``blocked``). ``blocked``: each
    expert's products on one thread, blocked and packed, the experts shared among the threads;
    float32, or bfloat16 rows where :func:`~moekit.kernels.library.blocks_bf16` (float32 sums,
    each product rounded once, as torch's bfloat16 products), with bfloat16 weights or float32
    ones (a model's float32 weights under autocast: rounded to bfloat16 as they are packed,
    as a cast would, and their gradients float32).
    Returns ``[N, d_out]`` (zero past the counts' sum)."""
    x, counts, covered, dtype = _check_segments(x, tokens_per_expert, w1, w3, w2, blocked)
    N, f = x.shape[0], w1.shape[2]
    gate = up = None
    if save is not None:
        gate = ck.tensor("save[0]", save[0], dtype, shape=(N, f), contiguous=True).data_ptr()
        up = ck.tensor("save[1]", save[1], dtype, shape=(N, f), contiguous=True).data_ptr()
    out = x.new_empty(N, w2.shape[2])
    name = _blocks_name(blocked, dtype)
    weights = _weight_args(w1, w3, w2, dtype)
    check_rc(getattr(lib, name)(x.data_ptr(), x.shape[1], counts.data_ptr(), counts.shape[0], *weights,
                                out.data_ptr(), gate, up, torch.get_num_threads()), name)
    if covered < N:
        out[covered:] = 0
    return out


def swiglu_segments_backward(lib: ctypes.CDLL, x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor,
                             w3: torch.Tensor, w2: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor,
                             blocked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`swiglu_segments` (run with ``save=(gate, up)``) for the
    output's gradient ``dy [N, d_out]``: ``dx`` and the three weight gradients (contiguous,
    zero for experts without rows, in the weights' dtype), each weight read once and each
    gradient written once. Rows past ``tokens_per_expert.sum()`` get a zero ``dx``."""
    x, counts, covered, dtype = _check_segments(x, tokens_per_expert, w1, w3, w2, blocked)
    N, f = x.shape[0], w1.shape[2]
    ck.tensor("gate", gate, dtype, shape=(N, f), contiguous=True)
    ck.tensor("up", up, dtype, shape=(N, f), contiguous=True)
    ck.tensor("dy", dy, dtype, shape=(N, w2.shape[2]))
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    dw1, dw3, dw2 = (torch.empty(w.shape, dtype=w.dtype) for w in (w1, w3, w2))
    name = _blocks_name(blocked, dtype, "_backward")
    weights = _weight_args(w1, w3, w2, dtype)
    check_rc(getattr(lib, name)(
        x.data_ptr(), x.shape[1], counts.data_ptr(), counts.shape[0], *weights, gate.data_ptr(), up.data_ptr(),
        dy.data_ptr(), dx.data_ptr(), dw1.data_ptr(), dw3.data_ptr(), dw2.data_ptr(), torch.get_num_threads()), name)
    if covered < N:
        dx[covered:] = 0
    return dx, dw1, dw3, dw2


def silu_mul(lib: ctypes.CDLL, g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(g) * u`` (the SwiGLU's hidden activation) in one pass; contiguous tensors of one
    shape, all float32 or all bfloat16 (computed in float32, rounded once), ``out`` may be
    ``g``. Returns ``out`` (new where not given)."""
    dtype = ck.dtype_in("g", g, (torch.float32, torch.bfloat16))
    ck.tensor("g", g, dtype, contiguous=True)
    ck.tensor("u", u, dtype, shape=tuple(g.shape), contiguous=True)
    out = torch.empty_like(g) if out is None else ck.tensor("out", out, dtype, shape=tuple(g.shape), contiguous=True)
    fn = lib.moekit_silu_mul if dtype == torch.float32 else lib.moekit_silu_mul_bf16
    fn(g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), torch.get_num_threads())
    return out


def silu_mul_backward(lib: ctypes.CDLL, dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`silu_mul` for ``dh`` (contiguous, the shape and dtype of ``g``
    and ``u``): ``(dg, du)``, in one pass."""
    dtype = ck.dtype_in("g", g, (torch.float32, torch.bfloat16))
    ck.tensor("g", g, dtype, contiguous=True)
    ck.tensor("u", u, dtype, shape=tuple(g.shape), contiguous=True)
    ck.tensor("dh", dh, dtype, shape=tuple(g.shape), contiguous=True)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    fn = lib.moekit_silu_mul_backward if dtype == torch.float32 else lib.moekit_silu_mul_backward_bf16
    fn(dh.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), g.numel(), torch.get_num_threads())
    return dg, du
