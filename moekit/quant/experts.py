"""Routed SwiGLU experts held in a low-precision format (:mod:`moekit.quant.formats`).

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

from moekit.ops.swiglu import segments
from moekit.quant.formats import get_format

_PROJECTIONS = ("w1", "w3", "w2")


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
        mm, g = self.format.matmul, self.group_size
        hidden = F.silu(mm(x, self.parts("w1", e), g)) * mm(x, self.parts("w3", e), g)  # [n, f]
        return mm(hidden, self.parts("w2", e), g)  # [n, d]

    def expert_add_(self, e: int, x: torch.Tensor, out: torch.Tensor, weight: float) -> None:
        mm, g = self.format.matmul, self.group_size
        hidden = F.silu(mm(x, self.parts("w1", e), g)).mul_(mm(x, self.parts("w3", e), g))  # [n, f]
        mm(hidden, self.parts("w2", e), g, out=out, alpha=weight)  # the down projection adds into out

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
