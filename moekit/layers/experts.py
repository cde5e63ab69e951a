"""Experts: ``x_sorted [N, d_model], tokens_per_expert [E] -> y_sorted [N, d_out]``.

Tokens arrive sorted by expert, so expert ``e`` owns one contiguous segment of rows. The
built-in experts keep all weights in 3-D tensors (``w1``/``w3``: ``[E, d_model, d_ff]``,
``w2``: ``[E, d_ff, d_model]``, Mixtral's roles) and run every segment in one
``torch.nn.functional.grouped_mm`` call where it qualifies (:func:`grouped_mm_qualifies`),
else in a loop over the non-empty segments. On a GPU many small fine-grained experts then
cost one kernel launch per matmul, not one per expert.

Which way a call runs is decided in one place, :meth:`SwiGLUExperts.choose_path` (and the
base class's for other kinds), from the rows per expert and the rows of
:data:`moekit.layers.thresholds.THRESHOLDS`; the paths themselves are ops
(:mod:`moekit.ops.swiglu`) or plain torch. ``expert_forward(e, x)`` is the
obviously-correct single-expert computation the reference path and the tests use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit import kernels, ops
from moekit.config import MoEConfig
from moekit.layers.lora import adapted_linear, expert_projection, swiglu_with_adapters
from moekit.layers.thresholds import threshold
from moekit.ops.swiglu import grouped_matmul, segments
from moekit.registry import register_expert

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")

__all__ = ["GELUExperts", "GroupedExperts", "ModuleExperts", "SharedExperts", "SwiGLUExperts", "FeedForward",
           "build_experts", "grouped_matmul", "grouped_mm_qualifies", "segments", "swiglu", "swiglu_add_"]


def grouped_mm_qualifies(x: torch.Tensor, w: torch.Tensor, needs_grad: bool) -> bool:
    """Whether ``F.grouped_mm`` can take ``x [N, K] @ w [E, K, M]`` here and is worth it.

    It needs 16-byte aligned rows (widths a multiple of 4 float32 or 8 bfloat16 values). On
    CUDA its kernels take bfloat16 on sm80+; on CPU float32 and bfloat16. With gradients it
    is always used on CPU: its backward writes each weight gradient once, where a loop's
    per-expert views of a 3-D weight cost a full-size gradient each. Without gradients, a
    per-segment loop is faster once segments are long (``loop_inference_min_rows``).
    """
    if not _HAS_GROUPED_MM or x.dtype != w.dtype or not rows_aligned(x, x.shape[-1], w.shape[-1]):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x.dtype == torch.float32 and torch.compiler.is_compiling():
        return False  # torch.compile's fake kernel for grouped_mm accepts bfloat16 only
    return needs_grad or x.shape[0] < threshold("loop_inference_min_rows") * w.shape[0]


def rows_aligned(x: torch.Tensor, *widths: int) -> bool:
    """Whether rows of these widths in ``x``'s dtype start on 16-byte boundaries, as
    ``F.grouped_mm`` needs on CPU and CUDA alike."""
    align = 16 // x.element_size()
    return all(w % align == 0 for w in widths)


def padded_segments(tokens_per_expert: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's segment rounded up to a multiple of ``multiple`` rows: where each row of
    the sorted rows goes in the padded layout, and the padded counts.

    oneDNN, which runs bfloat16 and float16 matrix products on the CPU, builds a kernel for
    every new shape (longer than the product itself takes): segment lengths that change with
    every batch's routing would pay that on every product. Padded to a multiple of
    64 the shapes repeat and the built kernels are reused (benchmarks/moe_vs_dense.py
    --dtype bfloat16)."""
    counts = tokens_per_expert.to(torch.int64)
    padded = (counts + multiple - 1) // multiple * multiple
    shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)
    rows = torch.arange(int(counts.sum()), device=counts.device) + torch.repeat_interleave(shift, counts)
    return rows, padded


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
                x = x.to(dtype)
                return self.run(x, tokens_per_expert, self.autocast_weights(x))
        return self.run(x, tokens_per_expert, self.weights())

    def autocast_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The weights as the experts take them under autocast, for rows ``x`` already in the
        autocast dtype: cast to it (one cast per step, its backward casting the gradients back)."""
        return tuple(w.to(x.dtype) for w in self.weights())

    def choose_path(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> str:
        """The path :meth:`run` takes for rows ``x`` and (possibly cast) ``weights``:
        ``"grouped"`` (one ``F.grouped_mm`` per matmul) or ``"loop"`` (one expert at a time).
        ``use_grouped_mm`` forces one of them."""
        grouped = self.use_grouped_mm
        if grouped is None:
            grouped = grouped_mm_qualifies(x, weights[0], self.needs_grad(x))
        return "grouped" if grouped and _HAS_GROUPED_MM else "loop"

    def row_multiple(self, dtype: torch.dtype, device: torch.device) -> int:
        """The multiple of rows each expert's segment is padded to (with zero rows) for rows of
        ``dtype`` on ``device``: ``lowp_segment_rows`` for bfloat16 and float16 on the CPU
        (:func:`padded_segments` says why), else 1. The dispatch's gather writes that layout
        at once (:func:`moekit.layers.dispatch.rows_layout`); :meth:`run` pads the rest."""
        if torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            return threshold("lowp_segment_rows")
        return 1

    def run(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The computation of :meth:`forward` with the given (possibly cast) weights, along
        the path :meth:`choose_path` picks; on segments padded with zero rows to a multiple of
        :meth:`row_multiple` where they are not already."""
        path = self.choose_path(x, weights)
        multiple = self.row_multiple(x.dtype, x.device)
        if multiple <= 1 or not bool((tokens_per_expert % multiple).any()):
            return self.run_path(path, x, tokens_per_expert, weights)
        rows, counts = padded_segments(tokens_per_expert, multiple)
        padded = x.new_zeros(int(counts.sum()), x.shape[1]).index_copy(0, rows, x[: rows.numel()])
        out = self.run_path(path, padded, counts, weights).index_select(0, rows)
        if out.shape[0] < x.shape[0]:  # rows past the counts' sum: zero, as on every path
            out = torch.cat([out, out.new_zeros(x.shape[0] - out.shape[0], out.shape[1])])
        return out

    def run_path(self, path: str, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                 weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run ``path`` (one of :meth:`choose_path`'s answers)."""
        if path == "grouped":
            return self.grouped(weights, x, tokens_per_expert)
        if path != "loop":
            raise ValueError(f"unknown path {path!r} for {type(self).__name__}")
        if not self.needs_grad(x):
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

    @classmethod
    def params_per_expert(cls, d_model: int, d_ff: int) -> int:
        """Parameters of one expert (what ``count_params`` multiplies); by default counted on
        a one-expert instance built on the meta device (no memory)."""
        with torch.device("meta"):
            return sum(p.numel() for p in cls(1, d_model, d_ff).parameters())

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


def swiglu(w: tuple[torch.Tensor, ...], x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One SwiGLU expert ``w = (w1 [d, f], w3 [d, f], w2 [f, d_out])`` on rows ``x [n, d]``;
    writes into ``out`` when given (no grad: one buffer for the activation)."""
    w1, w3, w2 = w
    if out is None:
        return (F.silu(x @ w1) * (x @ w3)) @ w2
    gate = x @ w1
    return torch.mm(ops.silu_mul(gate, x @ w3, out=gate), w2, out=out)


def swiglu_add_(w: tuple[torch.Tensor, ...], x: torch.Tensor, out: torch.Tensor, weight: float,
                layout: tuple[torch.Tensor, ...] | None = None) -> None:
    """No grad: ``out += weight * swiglu(w, x)``; one row in one C call where the kernels read
    the weights (``layout``: the 3-D tensors ``w`` are slices of, whose layout the kernel
    checks; default ``w`` itself), else the down projection adds straight into ``out``."""
    w1, w3, w2 = w
    if _one_row_kernel(x, out, layout if layout is not None else tuple(t.unsqueeze(0) for t in w)):
        kernels.swiglu_add(kernels.load(), x[0], w1, w3, w2, out[0], weight)
        return
    out.addmm_(F.silu(x @ w1).mul_(x @ w3), w2, alpha=weight)


def _one_row_kernel(x: torch.Tensor, out: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> bool:
    """Whether :func:`moekit.kernels.swiglu_add` runs this one row: float32 on the CPU,
    contiguous, no autograd, weights it reads."""
    return (x.shape[0] == 1 and kernels.for_tensors(x, out) is not None and x.is_contiguous()
            and out.is_contiguous() and not torch.is_grad_enabled() and kernels.swiglu_ok(*weights))


@register_expert("swiglu")
class SwiGLUExperts(GroupedExperts):
    """``w2(silu(x w1) * (x w3))`` per expert (Mixtral, Llama)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__(num_experts, d_model, d_ff)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.fused_gate_up: torch.Tensor | None = None
        self.adapters = nn.ModuleDict()  # LoRA on w1/w3/w2 (moekit.adapt.lora); empty: none
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_uniform(self.w1, self.d_model)
        _init_uniform(self.w3, self.d_model)
        _init_uniform(self.w2, self.d_ff)

    @staticmethod
    def params_per_expert(d_model: int, d_ff: int) -> int:
        """Parameters of one expert (gate, up and down projections)."""
        return 3 * d_model * d_ff

    def choose_path(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> str:
        """The path :meth:`run` takes, from the rows per expert (float32 on the CPU, no path
        forced by ``use_grouped_mm``; else the base class's choice):

        - ``"kernel"``: up to ``kernel_max_rows`` rows per expert, weights the kernels read,
          where the row kernel has its AVX-512 loops; in training all three weights must want
          gradients (the kernel writes all three).
        - ``"blocks"``: more rows, up to ``blocks_max_rows_avx512`` per expert where the
          AVX-512 loops are built (else ``blocks_max_rows``, any count), the same conditions:
          the blocked kernel, each expert's products on one thread.
        - bfloat16 rows (autocast), bfloat16 or float32 weights: ``"blocks"`` at every row count
          where the bfloat16 blocked kernel is built, the same conditions; inference on bfloat16
          weights up to ``blocks_bf16_inference_max_d_ff`` (:meth:`_bf16_kernel_takes`).
        - else in training: ``"segments_op"`` from ``segments_training_min_rows``, else
          ``"grouped_op"`` where ``F.grouped_mm`` takes the rows.
        - inference: ``"fused"`` when :meth:`fuse_gate_up` ran.
        - else ``"grouped"`` or ``"loop"`` (:meth:`GroupedExperts.choose_path`).

        With LoRA adapters: ``"lora_grouped"`` where ``F.grouped_mm`` takes the rows, the
        weights and the adapters' rank, else ``"lora_loop"`` (the reference, a segment at a time).
        """
        if self.adapters:
            grouped = self.use_grouped_mm
            if grouped is None:
                rank = next(iter(self.adapters.values())).rank
                grouped = grouped_mm_qualifies(x, weights[0], True) and rows_aligned(x, rank)
            return "lora_grouped" if grouped and _HAS_GROUPED_MM else "lora_loop"
        if self._bf16_kernel_takes(x.dtype, x.device, weights, self.needs_grad(x)):
            return "blocks"
        if self.use_grouped_mm is None and x.device.type == "cpu":
            rows, kernels_on = x.shape[0], kernels.for_tensors(x) is not None
            readable = kernels_on and kernels.swiglu_ok(*weights)
            avx512 = kernels.few_rows_vectorised()
            few = avx512 and rows <= threshold("kernel_max_rows") * self.num_experts
            kernel_ok = readable and few and self.d_out == self.d_model
            most = threshold("blocks_max_rows_avx512" if avx512 else "blocks_max_rows")
            blocks_ok = readable and not few and rows <= most * self.num_experts
            if self.needs_grad(x):
                all_grads = all(w.requires_grad for w in weights)  # the kernels write all three
                if kernel_ok and all_grads:
                    return "kernel"
                if blocks_ok and all_grads:
                    return "blocks"
                if rows >= threshold("segments_training_min_rows") * self.num_experts:
                    return "segments_op"
                if kernels_on and rows and grouped_mm_qualifies(x, weights[0], True):
                    return "grouped_op"
            else:
                if kernel_ok:
                    return "kernel"
                if blocks_ok:
                    return "blocks"
                if self._fused_is_live(weights[0]):
                    return "fused"
        return super().choose_path(x, weights)

    def _bf16_kernel_takes(self, dtype: torch.dtype, device: torch.device, weights: tuple[torch.Tensor, ...],
                           training: bool) -> bool:
        """:meth:`choose_path`'s rule for the bfloat16 blocked kernel, also asked before the
        rows exist (:meth:`autocast_weights`, :meth:`row_multiple`): rows of ``dtype``
        bfloat16 on the CPU, the kernels on and built with AVX-512 BF16, no adapters and no
        path forced, even widths and row strides (it multiplies pairs of values), ``weights``
        all bfloat16 or all float32 as the kernels read them; in ``training`` (the call builds
        a graph) all three weights wanting gradients (it writes all three); in inference on
        bfloat16 weights d_ff up to ``blocks_bf16_inference_max_d_ff`` (float32 weights the
        other path would cast on every call)."""
        if not (dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not self.adapters
                and self.use_grouped_mm is None and kernels.is_enabled() and not torch.compiler.is_compiling()
                and kernels.load() is not None and kernels.blocks_bf16()):
            return False
        if self.d_model % 2 or self.d_ff % 2 or self.d_out % 2 or any(w.stride(1) % 2 for w in weights):
            return False
        if not any(kernels.swiglu_ok(*weights, dtype=d) for d in (torch.bfloat16, torch.float32)):
            return False
        if training:
            return all(w.requires_grad for w in weights)
        return weights[0].dtype != torch.bfloat16 or self.d_ff <= threshold("blocks_bf16_inference_max_d_ff")

    def autocast_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights = self.weights()
        if self._bf16_kernel_takes(x.dtype, x.device, weights, self.needs_grad(x)):
            # the kernel rounds float32 weights as it packs them and returns float32 gradients:
            # no cast ops, no bfloat16 copies (benchmarks/moe_vs_dense.py --dtype bfloat16)
            return weights
        return super().autocast_weights(x)

    def row_multiple(self, dtype: torch.dtype, device: torch.device) -> int:
        if self._bf16_kernel_takes(dtype, device, self.weights(), torch.is_grad_enabled()):
            return 1  # the blocked kernel takes segments of any length (oneDNN's padding is for oneDNN)
        return super().row_multiple(dtype, device)

    def run_path(self, path: str, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                 weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if path in ("kernel", "blocks"):
            blocked = path == "blocks"
            if self.needs_grad(x):
                return ops.swiglu_kernel(x, *weights, tokens_per_expert, blocked=blocked)
            return kernels.swiglu_segments(kernels.load(), x, tokens_per_expert, *weights, blocked=blocked)
        if path == "segments_op":
            return ops.swiglu_segments(x, *weights, tokens_per_expert)
        if path == "grouped_op":
            return ops.swiglu_grouped(x, *weights, tokens_per_expert)
        if path == "fused":
            return self._fused_run(x, tokens_per_expert)
        if path in ("lora_grouped", "lora_loop"):
            return swiglu_with_adapters(x, weights, self.adapters, tokens_per_expert, path == "lora_grouped")
        return super().run_path(path, x, tokens_per_expert, weights)

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
        return swiglu(w, x, out)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.adapters:
            ad = self.adapters
            hidden = F.silu(expert_projection(ad, "w1", self.w1, e, x)) * expert_projection(ad, "w3", self.w3, e, x)
            return expert_projection(ad, "w2", self.w2, e, hidden)
        if self._fused_is_live(self.w1):
            gate, up = (x @ self.fused_gate_up[e]).chunk(2, dim=-1)  # [n, d] -> [n, 2f] -> 2 x [n, f]
            return (F.silu(gate) * up) @ self.w2[e]
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]

    def expert_add_(self, e: int, x: torch.Tensor, out: torch.Tensor, weight: float) -> None:
        if self.adapters:
            out.add_(self.expert_forward(e, x), alpha=weight)
            return
        if self._fused_is_live(self.w1) and not _one_row_kernel(x, out, self.weights()):
            gate, up = (x @ self.fused_gate_up[e]).chunk(2, dim=-1)  # [n, d] -> [n, 2f] -> 2 x [n, f]
            out.addmm_(F.silu(gate).mul_(up), self.w2[e], alpha=weight)  # the down projection adds in, scaled
            return
        swiglu_add_((self.w1[e], self.w3[e], self.w2[e]), x, out, weight, self.weights())

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

    @staticmethod
    def params_per_expert(d_model: int, d_ff: int) -> int:
        """Parameters of one expert (up and down projections)."""
        return 2 * d_model * d_ff

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
        self.adapters = nn.ModuleDict()  # LoRA on w1/w3/w2 (moekit.adapt.lora); empty: none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapters:
            ad = self.adapters
            if self.w3 is None:
                return adapted_linear(self.w2, ad, "w2", F.gelu(adapted_linear(self.w1, ad, "w1", x)))
            hidden = F.silu(adapted_linear(self.w1, ad, "w1", x)) * adapted_linear(self.w3, ad, "w3", x)
            return adapted_linear(self.w2, ad, "w2", hidden)
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

    if config.weight_format is not None:
        from moekit.layers.quantized import QuantizedExperts

        return QuantizedExperts(config.num_experts, config.d_model, config.d_ff, config.weight_format,
                                config.weight_group_size)
    return EXPERTS[config.expert](config.num_experts, config.d_model, config.d_ff)
