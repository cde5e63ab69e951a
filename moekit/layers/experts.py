"""Experts: ``x_sorted [N, d_model], tokens_per_expert [E] -> y_sorted [N, d_out]``.

Tokens arrive sorted by expert, so expert ``e`` owns one contiguous segment of rows. The
built-in experts keep all weights in 3-D tensors (``w1``/``w3``: ``[E, d_model, d_ff]``,
``w2``: ``[E, d_ff, d_model]``, Mixtral's roles) and run every segment in one
``torch.nn.functional.grouped_mm`` call where it exists and the inputs qualify (CUDA,
bfloat16), else in a loop over the non-empty segments (CPU, where the loop was measured
faster: see :func:`grouped_mm_qualifies`). On a GPU many small fine-grained experts then
cost one kernel launch per matmul, not one per expert.

On the CPU in float32 the SwiGLU experts pick their path by the rows per expert (the
thresholds below, each measured): up to 8, moekit's kernels that read each weight once per
pass (inference and training); in inference above that, grouped_mm below 32 and a segment
loop from 32; in training from 9 to 255, grouped_mm's matmuls with the one-pass activation
and a hand-written backward, from 256 a segment loop with its own backward that writes every
weight gradient in place.

``expert_forward(e, x)`` is the obviously-correct single-expert computation the
reference path and the tests use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit import kernels
from moekit.config import MoEConfig
from moekit.registry import register_expert

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


# CPU inference: below this many rows per expert on average, grouped_mm's C++ loop beats
# the Python loop's per-segment overhead (measured with benchmarks/moe_layer.py).
CPU_LOOP_MIN_ROWS_PER_EXPERT = 32
# CPU training: from this many rows per expert on average, the segment-wise SwiGLU with its
# hand-written backward beats grouped_mm (measured: about 5-10% at 512-1024 rows, 10-25%
# slower at 64-128 rows).
CPU_SEGMENT_BACKWARD_MIN_ROWS = 256
# CPU, float32: up to this many rows per expert on average, moekit.kernels' swiglu_segments
# (each weight read from memory once for all of an expert's rows) beats grouped_mm. Inference,
# measured apart (d_model 512; 8 experts d_ff 1792 and 64 experts d_ff 224): 1.1-1.5x at 2-4
# rows, 1.2-1.6x at 8, 1.15-1.45x at 12, from 0.9x at 16.
CPU_KERNEL_MAX_ROWS_PER_EXPERT = 8
# Training: the same forward (keeping the gate and up pre-activations) and its backward (each
# weight read once, each weight gradient written once with streaming stores, idle experts'
# zeros included) against grouped_mm's autograd, with the interleaved timing of
# benchmarks/moe_layer.py: 1.4-2x at 1-2 rows, 1.1-1.4x at 4, 1.05-1.2x at 8, 0.9x at 16.
CPU_KERNEL_TRAIN_MAX_ROWS_PER_EXPERT = 8
# Between the two, float32 training runs grouped_mm's matmuls with the one-pass activation
# and a hand-written backward (_SwiGLUGrouped): 1.00-1.05x autograd over grouped_mm at 32-128
# rows per expert, where the weights' memory traffic dominates (measured apart, interleaved).


def grouped_mm_qualifies(x: torch.Tensor, w: torch.Tensor, needs_grad: bool) -> bool:
    """Whether ``F.grouped_mm`` can take ``x [N, K] @ w [E, K, M]`` here and is worth it.

    It needs 16-byte aligned rows (widths a multiple of 4 float32 or 8 bfloat16 values). On
    CUDA its kernels take bfloat16 on sm80+; on CPU float32 and bfloat16. With gradients it
    is always used on CPU: its backward writes each weight gradient once, where a loop's
    per-expert views of a 3-D weight cost a full-size gradient each. Without gradients, a
    per-segment loop is faster once segments are long (one segment's activation stays in
    cache and buffers are reused), grouped_mm when there are many short segments
    (fine-grained experts, few tokens).
    """
    if not _HAS_GROUPED_MM or x.dtype != w.dtype:
        return False
    align = 16 // x.element_size()  # rows must start on 16-byte boundaries, on CPU and CUDA alike
    if x.shape[-1] % align or w.shape[-1] % align:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x.dtype == torch.float32 and torch.compiler.is_compiling():
        return False  # torch.compile's fake kernel for grouped_mm accepts bfloat16 only
    return needs_grad or x.shape[0] < CPU_LOOP_MIN_ROWS_PER_EXPERT * w.shape[0]


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Segment-wise matmul with ``F.grouped_mm``: rows of segment ``e`` of ``x`` times ``w[e]``.

    Args:
        x: ``[N, K]`` rows sorted by expert.
        w: ``[E, K, M]`` one matrix per expert.
        tokens_per_expert: ``[E]`` segment lengths, summing to ``N``.

    Returns:
        ``[N, M]``.
    """
    offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)  # [E] segment ends
    return F.grouped_mm(x, w, offs=offs)


def segments(tokens_per_expert: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of every non-empty segment (one host sync)."""
    out, start = [], 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        if n:
            out.append((e, start, start + n))
            start += n
    return out


def _activation_kernels(x: torch.Tensor):
    """The built kernels where :func:`moekit.kernels.silu_mul` (and its backward) can take the
    SwiGLU activation of rows like ``x`` (float32 on the CPU), else ``None``."""
    return kernels.load() if kernels.tensors_ok(x) else None


def _idle_runs(num_experts: int, segs: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """``(first, end)`` of each run of consecutive experts without rows, given the non-empty
    segments in expert order."""
    runs, nxt = [], 0
    for e, _, _ in segs + [(num_experts, 0, 0)]:
        if e > nxt:
            runs.append((nxt, e))
        nxt = e + 1
    return runs


class _SwiGLUSegments(torch.autograd.Function):
    """All SwiGLU experts over expert-sorted rows, with a hand-written backward.

    Forward and backward run segment by segment, so each expert's activations are
    touched while they are in cache, and every weight gradient is written once, in place,
    into a full ``[E, ...]`` buffer (autograd over per-expert views would build one
    full-size gradient per expert, and over grouped_mm it runs the activation on all rows
    at once). Saves the gate and up pre-activations and the hidden product, as autograd
    would.
    """

    @staticmethod
    def forward(ctx, x, w1, w3, w2, segs):
        n, f = x.shape[0], w1.shape[-1]
        gate, up, hidden = x.new_empty(n, f), x.new_empty(n, f), x.new_empty(n, f)
        out = x.new_empty(n, w2.shape[-1])
        lib = _activation_kernels(x)
        for e, a, b in segs:
            torch.mm(x[a:b], w1[e], out=gate[a:b])
            torch.mm(x[a:b], w3[e], out=up[a:b])
            if lib is not None:
                kernels.silu_mul(lib, gate[a:b], up[a:b], out=hidden[a:b])
            else:
                torch.mul(F.silu(gate[a:b]), up[a:b], out=hidden[a:b])
            torch.mm(hidden[a:b], w2[e], out=out[a:b])
        ctx.save_for_backward(x, w1, w3, w2, gate, up, hidden)
        ctx.segs = segs
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w1, w3, w2, gate, up, hidden = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        # every row belongs to one segment, so dx is fully written; only experts without
        # rows need zero weight gradients
        dx = torch.empty_like(x) if need_x else None
        dw1 = torch.empty_like(w1) if need_w1 else None
        dw3 = torch.empty_like(w3) if need_w3 else None
        dw2 = torch.empty_like(w2) if need_w2 else None
        for a, b in _idle_runs(w1.shape[0], ctx.segs):  # slices: a memset each, no index_put
            for dw in (dw1, dw3, dw2):
                if dw is not None:
                    dw[a:b].zero_()
        covered = ctx.segs[-1][2] if ctx.segs else 0
        if dx is not None and covered < x.shape[0]:
            dx[covered:] = 0
        dy = dy.contiguous()
        lib = _activation_kernels(x)
        for e, a, b in ctx.segs:
            g, u, dys, xs = gate[a:b], up[a:b], dy[a:b], x[a:b]
            if need_w2:
                torch.mm(hidden[a:b].t(), dys, out=dw2[e])  # [f, n] @ [n, d]
            dh = dys @ w2[e].t()  # [n, d] -> [n, f]
            if lib is not None:
                dg, du = kernels.silu_mul_backward(lib, dh, g, u)
            else:
                du = dh.mul(F.silu(g))
                dg = torch.ops.aten.silu_backward(dh.mul_(u), g)
            if need_w1:
                torch.mm(xs.t(), dg, out=dw1[e])
            if need_w3:
                torch.mm(xs.t(), du, out=dw3[e])
            if need_x:
                torch.mm(dg, w1[e].t(), out=dx[a:b])
                dx[a:b].addmm_(du, w3[e].t())
        return dx, dw1, dw3, dw2, None


class _SwiGLUKernel(torch.autograd.Function):
    """Training with a few rows per expert: :func:`moekit.kernels.swiglu_segments` forward
    (keeping the gate and up pre-activations) and :func:`~moekit.kernels.swiglu_segments_backward`,
    each weight read once per pass and each weight gradient written once, idle experts' as
    zeros."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, tokens_per_expert, lib):
        x = x.contiguous()
        gate, up = x.new_empty(x.shape[0], w1.shape[-1]), x.new_empty(x.shape[0], w1.shape[-1])
        out = kernels.swiglu_segments(lib, x, tokens_per_expert, w1, w3, w2, save=(gate, up))
        ctx.save_for_backward(x, tokens_per_expert, w1, w3, w2, gate, up)
        ctx.lib = lib
        return out

    @staticmethod
    def backward(ctx, dy):
        grads = kernels.swiglu_segments_backward(ctx.lib, *ctx.saved_tensors, dy)
        return *(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None


class _SwiGLUGrouped(torch.autograd.Function):
    """Training at tens to hundreds of rows per expert: ``F.grouped_mm``'s matmuls, as
    autograd over :meth:`SwiGLUExperts.grouped` runs them, with the activation and its
    gradient in one pass each (:func:`moekit.kernels.silu_mul`, where autograd takes silu,
    mul and four more passes back) and no gradient computed that is not needed."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, tokens_per_expert, lib):
        offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)  # [E] segment ends
        gate, up = F.grouped_mm(x, w1, offs=offs), F.grouped_mm(x, w3, offs=offs)  # [N, d] -> [N, f]
        hidden = kernels.silu_mul(lib, gate, up)
        ctx.save_for_backward(x, w1, w3, w2, gate, up, hidden, offs)
        ctx.lib = lib
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
            dg, du = kernels.silu_mul_backward(ctx.lib, F.grouped_mm(dy, w2.transpose(1, 2), offs=offs), gate, up)
            dw1 = F.grouped_mm(x.t(), dg, offs=offs) if need_w1 else None  # [E, d, f]
            dw3 = F.grouped_mm(x.t(), du, offs=offs) if need_w3 else None
            if need_x:
                dx = F.grouped_mm(dg, w1.transpose(1, 2), offs=offs)  # [N, f] -> [N, d]
                dx += F.grouped_mm(du, w3.transpose(1, 2), offs=offs)
        return dx, dw1, dw3, dw2, None, None


def _init_uniform(t: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)  # the default of nn.Linear
    nn.init.uniform_(t, -bound, bound)


class GroupedExperts(nn.Module):
    """Base of the built-in experts: E feed-forward networks in 3-D weight tensors.

    Subclasses give ``weights()``, ``grouped(x, tokens_per_expert)`` (all segments at
    once, for ``F.grouped_mm``) and ``segment(w, x, out)`` (one expert's rows; writes into
    ``out`` when given, which the no-grad path uses to avoid allocations).

    ``use_grouped_mm``: ``None`` (auto: where :func:`grouped_mm_qualifies`), ``True`` or
    ``False`` to force a path (tests and benchmarks).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.d_out = d_model
        self.use_grouped_mm: bool | None = None

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [N, d_model]`` sorted by expert, ``tokens_per_expert [E]`` -> ``[N, d_model]``.

        Under ``torch.autocast`` the rows and weights are cast to the autocast dtype once
        and the experts run in it (autocast cannot reach the ``out=`` matmuls and the
        hand-written backward); the weights and their gradients stay in their own dtype.
        """
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return self.run(x.to(dtype), tokens_per_expert, tuple(w.to(dtype) for w in self.weights()))
        return self.run(x, tokens_per_expert, self.weights())

    def run(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The computation of :meth:`forward` with the given (possibly cast) weights."""
        needs_grad = self.needs_grad(x)
        grouped = self.use_grouped_mm
        if grouped is None:
            grouped = grouped_mm_qualifies(x, weights[0], needs_grad)
        if grouped and _HAS_GROUPED_MM:
            return self.grouped(weights, x, tokens_per_expert)
        if not needs_grad:
            out = x.new_empty(x.shape[0], self.d_out)
            for e, a, b in segments(tokens_per_expert):
                self.segment([w[e] for w in weights], x[a:b], out[a:b])
            return out
        # unbind: one backward node stacks the per-expert gradients, where indexing w[e]
        # would materialise a full-size gradient per expert
        per_expert = list(zip(*(w.unbind(0) for w in weights)))
        outs = [self.segment(per_expert[e], x[a:b]) for e, a, b in segments(tokens_per_expert)]
        return torch.cat(outs) if outs else x.new_zeros(0, self.d_out)

    def needs_grad(self, x: torch.Tensor) -> bool:
        """Whether this call builds an autograd graph (input or weights need gradients)."""
        return torch.is_grad_enabled() and (x.requires_grad or self.w1.requires_grad)

    def weights(self) -> tuple[torch.Tensor, ...]:
        """The 3-D weight tensors in the order :meth:`segment` takes one slice of each."""
        raise NotImplementedError

    def grouped(self, w: tuple[torch.Tensor, ...], x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """All experts (weights ``w``) over all rows at once with ``F.grouped_mm``."""
        raise NotImplementedError

    def segment(self, w: tuple[torch.Tensor, ...], x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """One expert (its weight slices ``w``) on its rows ``x``."""
        raise NotImplementedError

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def expert_add_(self, e: int, x: torch.Tensor, out: torch.Tensor, weight: float) -> None:
        """No grad: ``out += weight * expert_e(x)`` (the few-token inference path)."""
        out.add_(self.expert_forward(e, x), alpha=weight)


@register_expert("swiglu")
class SwiGLUExperts(GroupedExperts):
    """``w2(silu(x w1) * (x w3))`` per expert (Mixtral, Llama)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__(num_experts, d_model, d_ff)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.fused_gate_up: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_uniform(self.w1, self.d_model)
        _init_uniform(self.w3, self.d_model)
        _init_uniform(self.w2, self.d_ff)

    def run(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.use_grouped_mm is None and x.device.type == "cpu":
            if self.needs_grad(x):
                if x.shape[0] >= CPU_SEGMENT_BACKWARD_MIN_ROWS * self.num_experts:
                    return _SwiGLUSegments.apply(x, *weights, segments(tokens_per_expert))
                lib = self._segment_kernels_for(x, CPU_KERNEL_TRAIN_MAX_ROWS_PER_EXPERT)
                if lib is not None and all(w.requires_grad for w in weights):  # it writes all three
                    return _SwiGLUKernel.apply(x, *weights, tokens_per_expert, lib)
                lib = _activation_kernels(x)
                if lib is not None and x.shape[0] and grouped_mm_qualifies(x, weights[0], True):
                    return _SwiGLUGrouped.apply(x, *weights, tokens_per_expert, lib)
            else:
                lib = self._segment_kernels_for(x, CPU_KERNEL_MAX_ROWS_PER_EXPERT)
                if lib is not None:
                    return kernels.swiglu_segments(lib, x, tokens_per_expert, self.w1, self.w3, self.w2)
                if self._fused_is_live(weights[0]):
                    return self._fused_run(x, tokens_per_expert)
        return super().run(x, tokens_per_expert, weights)

    def _segment_kernels_for(self, x: torch.Tensor, max_rows_per_expert: int):
        """The built kernels where :func:`moekit.kernels.swiglu_segments` (and in training its
        backward) should run these rows (up to ``max_rows_per_expert`` float32 rows per expert
        on average, weights it can read), else ``None``."""
        if (x.shape[0] <= max_rows_per_expert * self.num_experts and kernels.tensors_ok(x)
                and self.d_out == self.d_model and kernels.swiglu_ok(self)):
            return kernels.load()
        return None

    def _fused_is_live(self, w1: torch.Tensor) -> bool:
        """Whether :meth:`fuse_gate_up` ran and ``w1`` (as this call sees it) still views it."""
        fused = self.fused_gate_up
        return fused is not None and w1.data_ptr() == fused.data_ptr() and not torch.is_grad_enabled()

    def _fused_run(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """No grad, fused weights: one gate/up matmul per expert, grouped or in a loop."""
        if grouped_mm_qualifies(x, self.fused_gate_up, False):
            gate, up = grouped_matmul(x, self.fused_gate_up, tokens_per_expert).chunk(2, dim=-1)  # [N, 2f] -> 2 x [N, f]
            return grouped_matmul(F.silu(gate) * up, self.w2, tokens_per_expert)
        out = x.new_empty(x.shape[0], self.d_out)
        for e, a, b in segments(tokens_per_expert):
            gate, up = (x[a:b] @ self.fused_gate_up[e]).chunk(2, dim=-1)  # [n, d] -> 2 x [n, f]
            torch.mm(F.silu(gate, inplace=True).mul_(up), self.w2[e], out=out[a:b])
        return out

    def grouped(self, w, x, tokens_per_expert):
        gate = grouped_matmul(x, w[0], tokens_per_expert)  # [N, d] -> [N, f]
        up = grouped_matmul(x, w[1], tokens_per_expert)
        return grouped_matmul(F.silu(gate) * up, w[2], tokens_per_expert)  # [N, f] -> [N, d]

    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.w1, self.w3, self.w2

    def segment(self, w, x, out=None):
        w1, w3, w2 = w
        if out is None:
            return (F.silu(x @ w1) * (x @ w3)) @ w2
        lib = _activation_kernels(x)
        if lib is not None:  # no grad: reuse buffers, one pass for the activation
            gate = x @ w1
            hidden = kernels.silu_mul(lib, gate, x @ w3, out=gate)
        else:
            hidden = F.silu(x @ w1, inplace=True).mul_(x @ w3)
        return torch.mm(hidden, w2, out=out)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self._fused_is_live(self.w1):
            gate, up = (x @ self.fused_gate_up[e]).chunk(2, dim=-1)  # [n, d] -> [n, 2f] -> 2 x [n, f]
            return (F.silu(gate) * up) @ self.w2[e]
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]

    def expert_add_(self, e: int, x: torch.Tensor, out: torch.Tensor, weight: float) -> None:
        lib = self._kernels_for(x, out) if x.shape[0] == 1 else None
        if lib is not None:  # one row: the whole expert in one C call
            kernels.swiglu_add(lib, x[0], self.w1[e], self.w3[e], self.w2[e], out[0], weight)
            return
        if self._fused_is_live(self.w1):
            gate, up = (x @ self.fused_gate_up[e]).chunk(2, dim=-1)  # [n, d] -> [n, 2f] -> 2 x [n, f]
        else:
            gate, up = x @ self.w1[e], x @ self.w3[e]
        out.addmm_(F.silu(gate).mul_(up), self.w2[e], alpha=weight)  # the down projection adds in, scaled

    def _kernels_for(self, x: torch.Tensor, out: torch.Tensor):
        """The built kernels where :func:`moekit.kernels.swiglu_add` can run this row (float32
        on the CPU, contiguous, no autograd, weights it can read), else ``None``."""
        if (x.dtype == out.dtype == torch.float32 and x.device.type == "cpu"
                and x.is_contiguous() and out.is_contiguous()
                and not torch.is_grad_enabled() and kernels.swiglu_ok(self)):
            return kernels.load()
        return None

    @torch.no_grad()
    def fuse_gate_up(self) -> None:
        """Inference: store ``w1`` and ``w3`` side by side in one ``[E, d_model, 2 d_ff]``
        tensor, so that a token's gate and up projections are one matmul (decoding reads the
        weights faster in one long call than in two short ones). ``w1``/``w3`` stay the same
        parameters, now views of the fused tensor; every path still reads them."""
        fused = torch.cat([self.w1, self.w3], dim=-1)  # 2 x [E, d, f] -> [E, d, 2f]
        self.w1.data, self.w3.data = fused[..., : self.d_ff], fused[..., self.d_ff :]
        self.fused_gate_up = fused


@register_expert("gelu")
class GELUExperts(GroupedExperts):
    """``w2(gelu(x w1))`` per expert (Switch, GShard)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__(num_experts, d_model, d_ff)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_uniform(self.w1, self.d_model)
        _init_uniform(self.w2, self.d_ff)

    def grouped(self, w, x, tokens_per_expert):
        hidden = F.gelu(grouped_matmul(x, w[0], tokens_per_expert))  # [N, d] -> [N, f]
        return grouped_matmul(hidden, w[1], tokens_per_expert)  # [N, f] -> [N, d]

    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.w1, self.w2

    def segment(self, w, x, out=None):
        w1, w2 = w
        hidden = F.gelu(x @ w1)
        return hidden @ w2 if out is None else torch.mm(hidden, w2, out=out)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x @ self.w1[e]) @ self.w2[e]


class ModuleExperts(nn.Module):
    """Arbitrary ``nn.Module`` experts, each mapping ``[n, d_model] -> [n, d_out]``.

    The generic path for MoE outside language models: an MLP, a CNN head over reshaped
    input, a whole small model. Runs a Python loop over the experts that received tokens.
    """

    def __init__(self, experts: list[nn.Module], d_model: int, d_out: int | None = None):
        super().__init__()
        if len(experts) < 1:
            raise ValueError("experts must hold at least one nn.Module, got an empty list")
        for i, m in enumerate(experts):
            if not isinstance(m, nn.Module):
                raise ValueError(f"experts[{i}] must be an nn.Module, got {type(m).__name__}")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)
        self.d_model = d_model
        self.d_out = d_out if d_out is not None else self._probe_width()

    def _probe_width(self) -> int:
        m = self.experts[0]
        was_training = m.training
        p = next(m.parameters(), None)
        probe = torch.zeros(2, self.d_model, device=p.device if p is not None else None,
                            dtype=p.dtype if p is not None and p.is_floating_point() else None)
        try:
            with torch.no_grad():
                out = m.eval()(probe)
        except Exception as exc:  # the expert cannot take [n, d_model]: say so now, not mid-training
            raise ValueError(
                f"experts[0] must map [n, d_model={self.d_model}] -> [n, d_out]; calling it on a "
                f"[2, {self.d_model}] input failed: {exc}"
            ) from exc
        finally:
            m.train(was_training)
        if out.dim() != 2 or out.shape[0] != 2:
            raise ValueError(f"experts[0] must return [n, d_out] for [n, d_model] input, got shape {tuple(out.shape)}")
        return int(out.shape[1])

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        outs = [self.experts[e](x[a:b]) for e, a, b in segments(tokens_per_expert)]
        if not outs:
            return x.new_zeros(0, self.d_out)
        return torch.cat(outs)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[e](x)


class FeedForward(nn.Module):
    """A dense feed-forward block (``nn.Linear`` weights, Llama layout): the shared
    experts of an MoE layer and the FFN of a dense baseline."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "swiglu"):
        super().__init__()
        if kind not in ("swiglu", "gelu"):
            raise ValueError(f"kind must be 'swiglu' or 'gelu', got {kind!r}")
        self.kind = kind
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False) if kind == "swiglu" else None
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SharedExperts(nn.Module):
    """Always-active experts (DeepSeek-MoE, Qwen2-MoE). ``n`` shared experts of width ``f``
    are one FFN of width ``n * f``; an optional sigmoid gate scales their output per token."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.ffn = FeedForward(config.d_model, config.shared_width, config.expert)
        self.gate = nn.Linear(config.d_model, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ffn(x)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y


def build_experts(config: MoEConfig) -> GroupedExperts:
    from moekit.registry import EXPERTS

    return EXPERTS[config.expert](config.num_experts, config.d_model, config.d_ff)
