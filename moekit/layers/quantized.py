"""Layers whose weights are held in a low-precision format (:mod:`moekit.ops.lowp`): routed
SwiGLU experts (:class:`QuantizedExperts`) and linear layers (:class:`QuantizedLinear`, the
attention projections and LM head of ``moekit quantize --what all``). Each product runs the
format's kernel (:func:`kernel_rows`: int8 and int4 always, bf16 up to ``lowp_kernel_max_rows``
rows, :data:`moekit.layers.thresholds.THRESHOLDS`), else multiplies as the format says
(bf16: in bfloat16; without the kernels: dequantise once and multiply).

Each projection of all experts is stored as the format's parts in ``nn.Linear``'s
``[out, in]`` layout per expert (``w1``/``w3`` ``[E, d_ff, d_model]``, ``w2``
``[E, d_model, d_ff]``), as buffers named ``w1_q``, ``w1_scale``... so a quantised model
saves and loads through its state dict like any other. Inference only: the codes are not
parameters and get no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.thresholds import threshold
from moekit.ops.lowp import get_format
from moekit.ops.swiglu import segments

_PROJECTIONS = ("w1", "w3", "w2")
_ATTENTION = ("wq", "wk", "wv", "wo")


def kernel_rows(x: torch.Tensor, fmt) -> bool:
    """Whether a product over the rows ``x`` takes the format's kernel (each weight read once
    per 64 rows): int8 and int4 at every row count (benchmarks/quantize.py's prefill line),
    bf16 up to ``lowp_kernel_max_rows`` (beyond, bfloat16 matrix products are faster)."""
    return fmt.int8_activations or x.shape[0] <= threshold("lowp_kernel_max_rows")


class QuantizedExperts(nn.Module):
    """``w2(silu(x w1) * (x w3))`` per expert with weights in ``weight_format``."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, weight_format: str, group_size: int = 32):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff, self.d_out = num_experts, d_model, d_ff, d_model
        self.format, self.group_size = get_format(weight_format), group_size
        self.adapters = nn.ModuleDict()  # none: LoRA trains float weights
        for name, shape in self._shapes().items():
            self.format.check(shape, group_size)
            for part, (part_shape, dtype) in self.format.part_shapes(shape, group_size).items():
                self.register_buffer(f"{name}_{part}", torch.zeros(part_shape, dtype=dtype))

    def _shapes(self) -> dict[str, tuple[int, int, int]]:
        E, d, f = self.num_experts, self.d_model, self.d_ff
        return {"w1": (E, f, d), "w3": (E, f, d), "w2": (E, d, f)}

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"format={self.format.name}, group_size={self.group_size}")

    @classmethod
    @torch.no_grad()
    def from_float(cls, experts, weight_format: str, group_size: int = 32) -> QuantizedExperts:
        """The quantised copy of float SwiGLU experts (``w1``/``w3`` ``[E, d, f]``, ``w2 [E, f, d]``)."""
        q = cls(experts.num_experts, experts.d_model, experts.d_ff, weight_format, group_size)
        for name, w in zip(_PROJECTIONS, (experts.w1, experts.w3, experts.w2)):
            for part, t in q.format.quantize(w.detach().transpose(1, 2), group_size).items():  # [E, in, out] -> [E, out, in]
                getattr(q, f"{name}_{part}").copy_(t)
        return q.to(experts.w1.device)

    def parts(self, name: str, e: int | None = None) -> dict[str, torch.Tensor]:
        """The parts of projection ``name`` (of expert ``e``, or all experts)."""
        return {p: getattr(self, f"{name}_{p}") if e is None else getattr(self, f"{name}_{p}")[e]
                for p in self.format.parts}

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 ``w1``, ``w3`` ``[E, d, f]`` and ``w2 [E, f, d]`` (moekit's layout) of the stored codes."""
        return tuple(self.format.dequantize(self.parts(n), self.group_size).transpose(1, 2) for n in _PROJECTIONS)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        mm, g, k = self.format.matmul, self.group_size, kernel_rows(x, self.format)
        hidden = F.silu(mm(x, self.parts("w1", e), g, kernel=k)) * mm(x, self.parts("w3", e), g, kernel=k)  # [n, f]
        return mm(hidden, self.parts("w2", e), g, kernel=k)  # [n, d]

    def expert_add_(self, e: int, x: torch.Tensor, out: torch.Tensor, weight: float) -> None:
        mm, g, k = self.format.matmul, self.group_size, kernel_rows(x, self.format)
        hidden = F.silu(mm(x, self.parts("w1", e), g, kernel=k)).mul_(mm(x, self.parts("w3", e), g, kernel=k))
        mm(hidden, self.parts("w2", e), g, out=out, alpha=weight, kernel=k)  # the down projection adds into out

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [N, d_model]`` sorted by expert -> ``[N, d_model]``."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(f"{self.format.name} experts run inference only (their codes are not parameters); "
                               "train the float model")
        out = x.new_empty(x.shape[0], self.d_out)
        for e, a, b in segments(tokens_per_expert):
            out[a:b] = self.expert_forward(e, x[a:b])
        return out

    def _apply(self, fn, recurse=True):
        # the parts keep their dtypes: a model-wide .to(dtype) must not round the scales or
        # recast the codes; only the device moves
        return super()._apply(lambda t: t.to(fn(t.new_empty(0)).device), recurse)


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with its ``[out, in]`` weight stored as a format's parts (buffers
    ``weight_q``, ``weight_scale``...); the bias, if any, stays a float parameter. Inference only."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_format: str, group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format, self.group_size = get_format(weight_format), group_size
        shape = (out_features, in_features)
        self.format.check(shape, group_size)
        for part, (part_shape, dtype) in self.format.part_shapes(shape, group_size).items():
            self.register_buffer(f"weight_{part}", torch.zeros(part_shape, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format.name}")

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, weight_format: str, group_size: int = 32) -> QuantizedLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_format, group_size)
        for part, t in q.format.quantize(linear.weight.detach(), group_size).items():
            getattr(q, f"weight_{part}").copy_(t)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q.to(linear.weight.device)

    def parts(self) -> dict[str, torch.Tensor]:
        return {p: getattr(self, f"weight_{p}") for p in self.format.parts}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [..., in] -> [T, in]
        y = self.format.matmul(flat, self.parts(), self.group_size, kernel=kernel_rows(flat, self.format))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # codes and scales keep their dtypes; the float bias follows the model (see QuantizedExperts)
        return super()._apply(lambda t: fn(t) if t is self.bias else t.to(fn(t.new_empty(0)).device), recurse)


def quantize_linears(model, weight_format: str, group_size: int = 32) -> list[str]:
    """Replace the attention projections of every block of ``model`` and its LM head (unless
    tied to the embedding) by :class:`QuantizedLinear` copies. Returns what was replaced."""
    done = []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if attn.adapters:
            raise ValueError(f"block {i}'s attention has LoRA adapters: merge them before quantizing")
        attn.fused_qkv = None  # the fused float copy is gone with the float weights
        for name in _ATTENTION:
            setattr(attn, name, QuantizedLinear.from_linear(getattr(attn, name), weight_format, group_size))
            done.append(f"blocks.{i}.attn.{name}")
    if not model.config.tie_embeddings:
        model.lm_head = QuantizedLinear.from_linear(model.lm_head, weight_format, group_size)
        done.append("lm_head")
    return done
