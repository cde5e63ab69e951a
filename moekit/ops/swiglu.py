"""All SwiGLU experts over expert-sorted rows, as autograd Functions with hand-written
backward passes, and the reference they are held to.

Rows arrive sorted by expert (``tokens_per_expert [E]`` rows each); the weights are
``w1``/``w3`` ``[E, d, f]`` (gate, up) and ``w2 [E, f, d_out]`` (down). Three ways, each
the fastest somewhere (which one runs is the experts module's choice, from its table):

- :func:`swiglu_kernel`: :func:`moekit.kernels.swiglu_segments`, which with a few rows per
  expert reads each weight once per pass, and with more (``blocked``) runs each expert's
  products on one thread, the experts shared among threads; each weight gradient written once.
- :func:`swiglu_grouped`: tens to hundreds of rows per expert; ``F.grouped_mm``'s matmuls
  with the activation and its gradient in one pass each, and no gradient computed that is
  not asked for.
- :func:`swiglu_segments`: long segments; a loop that keeps each expert's activations in
  cache and writes every weight gradient in place into one ``[E, ...]`` buffer.

:func:`swiglu_reference` is the obviously-correct loop over experts in torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit import kernels
from moekit.ops._lib import lib


def segments(tokens_per_expert: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of every non-empty segment (one host sync)."""
    out, start = [], 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        if n:
            out.append((e, start, start + n))
            start += n
    return out


def idle_runs(num_experts: int, segs: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """``(first, end)`` of each run of consecutive experts without rows, given the non-empty
    segments in expert order."""
    runs, nxt = [], 0
    for e, _, _ in segs + [(num_experts, 0, 0)]:
        if e > nxt:
            runs.append((nxt, e))
        nxt = e + 1
    return runs


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Segment-wise matmul with ``F.grouped_mm``: ``x [N, K]`` (sorted by expert) times
    ``w [E, K, M]``, segment ``e`` by ``w[e]``. Returns ``[N, M]``."""
    offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)  # [E] segment ends
    return F.grouped_mm(x, w, offs=offs)


def _act_kernels(*tensors: torch.Tensor) -> bool:
    """Whether the one-pass activation kernels take these: contiguous, on the CPU, all float32
    or all bfloat16, the kernels on (and outside ``torch.compile``)."""
    if any(t.dtype != tensors[0].dtype or not t.is_contiguous() for t in tensors):
        return False
    return kernels.for_tensors(*tensors, dtypes=(torch.float32, torch.bfloat16)) is not None


def silu_mul(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(g) * u``: in one kernel pass where the kernels take ``g`` (contiguous float32
    or bfloat16 on the CPU), else in torch ops. ``out`` may be ``g``."""
    if _act_kernels(g, u):
        return kernels.silu_mul(lib(), g, u, out=out)
    if out is None:
        return F.silu(g) * u
    if out is g:  # no grad: in place, no buffer
        return F.silu(g, inplace=True).mul_(u)
    return torch.mul(F.silu(g), u, out=out)


def _silu_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)`` of :func:`silu_mul` for ``dh`` (``dh`` may be overwritten)."""
    if _act_kernels(dh, g, u):
        return kernels.silu_mul_backward(lib(), dh, g, u)
    du = dh.mul(F.silu(g))
    return torch.ops.aten.silu_backward(dh.mul_(u), g), du


def swiglu_reference(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                     tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """``w2[e](silu(x w1[e]) * (x w3[e]))`` on each expert's rows, one expert at a time."""
    segs = segments(tokens_per_expert)
    outs = [(F.silu(x[a:b] @ w1[e]) * (x[a:b] @ w3[e])) @ w2[e] for e, a, b in segs]
    covered = segs[-1][2] if segs else 0
    outs.append(x.new_zeros(x.shape[0] - covered, w2.shape[-1]))
    return torch.cat(outs)


class _SwiGLUSegments(torch.autograd.Function):
    """Forward and backward segment by segment for the products, every weight gradient
    written once, in place, into a full ``[E, ...]`` buffer (autograd over per-expert views
    would build one full-size gradient per expert), and the activation and its gradient in
    one call each over all rows (one parallel region, not one per expert). Saves the gate
    and up pre-activations and the hidden product."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, segs):
        n, f = x.shape[0], w1.shape[-1]
        gate, up = x.new_empty(n, f), x.new_empty(n, f)
        out = x.new_empty(n, w2.shape[-1])
        covered = segs[-1][2] if segs else 0
        for e, a, b in segs:
            torch.mm(x[a:b], w1[e], out=gate[a:b])
            torch.mm(x[a:b], w3[e], out=up[a:b])
        hidden = silu_mul(gate[:covered], up[:covered])  # [covered, f]
        for e, a, b in segs:
            torch.mm(hidden[a:b], w2[e], out=out[a:b])
        if covered < n:
            out[covered:] = 0
        ctx.save_for_backward(x, w1, w3, w2, gate, up, hidden)
        ctx.segs = segs
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w1, w3, w2, gate, up, hidden = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        segs = ctx.segs
        covered = segs[-1][2] if segs else 0
        # every row belongs to one segment, so dx is fully written; only experts without
        # rows need zero weight gradients
        dx = torch.empty_like(x) if need_x else None
        dw1 = torch.empty_like(w1) if need_w1 else None
        dw3 = torch.empty_like(w3) if need_w3 else None
        dw2 = torch.empty_like(w2) if need_w2 else None
        for a, b in idle_runs(w1.shape[0], segs):  # slices: a memset each, no index_put
            for dw in (dw1, dw3, dw2):
                if dw is not None:
                    dw[a:b].zero_()
        if dx is not None and covered < x.shape[0]:
            dx[covered:] = 0
        dy = dy.contiguous()
        if need_w2:
            for e, a, b in segs:
                torch.mm(hidden[a:b].t(), dy[a:b], out=dw2[e])  # [f, n] @ [n, d]
        if not (need_x or need_w1 or need_w3):
            return dx, dw1, dw3, dw2, None
        dh = x.new_empty(covered, hidden.shape[1])
        for e, a, b in segs:
            torch.mm(dy[a:b], w2[e].t(), out=dh[a:b])  # [n, d] -> [n, f]
        dg, du = _silu_mul_backward(dh, gate[:covered], up[:covered])
        for e, a, b in segs:
            if need_w1:
                torch.mm(x[a:b].t(), dg[a:b], out=dw1[e])
            if need_w3:
                torch.mm(x[a:b].t(), du[a:b], out=dw3[e])
            if need_x:
                torch.mm(dg[a:b], w1[e].t(), out=dx[a:b])
                dx[a:b].addmm_(du[a:b], w3[e].t())
        return dx, dw1, dw3, dw2, None


def swiglu_segments(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                    tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu_reference` segment by segment with a hand-written backward."""
    return _SwiGLUSegments.apply(x, w1, w3, w2, segments(tokens_per_expert))


class _SwiGLUKernel(torch.autograd.Function):
    """:func:`moekit.kernels.swiglu_segments` forward (keeping the gate and up
    pre-activations) and :func:`~moekit.kernels.swiglu_segments_backward`, either kernel
    (``blocked``), each weight gradient written once, idle experts' as zeros."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, tokens_per_expert, blocked):
        x = x.contiguous()
        gate, up = x.new_empty(x.shape[0], w1.shape[-1]), x.new_empty(x.shape[0], w1.shape[-1])
        out = kernels.swiglu_segments(lib(), x, tokens_per_expert, w1, w3, w2, save=(gate, up), blocked=blocked)
        ctx.save_for_backward(x, tokens_per_expert, w1, w3, w2, gate, up)
        ctx.blocked = blocked
        return out

    @staticmethod
    def backward(ctx, dy):
        grads = kernels.swiglu_segments_backward(lib(), *ctx.saved_tensors, dy, blocked=ctx.blocked)
        return *(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None


def swiglu_kernel(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                  tokens_per_expert: torch.Tensor, blocked: bool = False) -> torch.Tensor:
    """:func:`swiglu_reference` in :mod:`moekit.kernels` (on the CPU; it computes all three
    weight gradients): each weight read once per pass (a few rows per expert, float32), or
    ``blocked``, each expert's products on one thread with the experts shared among threads
    (tens of rows per expert and up; float32, or bfloat16 rows with bfloat16 or float32
    weights where the AVX-512 BF16 kernel is built, the gradients in the weights' dtype)."""
    return _SwiGLUKernel.apply(x, w1, w3, w2, tokens_per_expert, blocked)


class _SwiGLUGrouped(torch.autograd.Function):
    """``F.grouped_mm``'s matmuls, as autograd over them runs them, with the activation and
    its gradient in one pass each (where autograd takes silu, mul and four more passes back)
    and no gradient computed that is not needed."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, tokens_per_expert):
        offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)  # [E] segment ends
        gate, up = F.grouped_mm(x, w1, offs=offs), F.grouped_mm(x, w3, offs=offs)  # [N, d] -> [N, f]
        hidden = silu_mul(gate, up)
        ctx.save_for_backward(x, w1, w3, w2, gate, up, hidden, offs)
        return F.grouped_mm(hidden, w2, offs=offs)  # [N, f] -> [N, d]

    @staticmethod
    def backward(ctx, dy):
        x, w1, w3, w2, gate, up, hidden, offs = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        dy = dy.contiguous()
        # weight gradients: [K, N] @ [N, M] per segment (grouped over the row dimension)
        dw2 = F.grouped_mm(hidden.t(), dy, offs=offs) if need_w2 else None  # [E, f, d]
        dx = dw1 = dw3 = None
        if need_x or need_w1 or need_w3:  # all of these go through the hidden layer's gradient
            dg, du = _silu_mul_backward(F.grouped_mm(dy, w2.transpose(1, 2), offs=offs), gate, up)
            dw1 = F.grouped_mm(x.t(), dg, offs=offs) if need_w1 else None  # [E, d, f]
            dw3 = F.grouped_mm(x.t(), du, offs=offs) if need_w3 else None
            if need_x:
                dx = F.grouped_mm(dg, w1.transpose(1, 2), offs=offs)  # [N, f] -> [N, d]
                dx += F.grouped_mm(du, w3.transpose(1, 2), offs=offs)
        return dx, dw1, dw3, dw2, None


def swiglu_grouped(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu_reference` with ``F.grouped_mm`` and a hand-written backward (inputs that
    ``F.grouped_mm`` takes: 16-byte aligned rows)."""
    return _SwiGLUGrouped.apply(x, w1, w3, w2, tokens_per_expert)
