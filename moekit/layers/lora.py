"""Low-rank adapters (LoRA, Hu et al. 2021): ``W x`` becomes ``W x + (alpha / r) B A x`` with
``A`` small random and ``B`` zero, so an adapted model starts equal to its base.

:class:`LinearAdapter` adapts one ``nn.Linear`` (attention projections, dense FFNs, shared
experts); :class:`ExpertAdapter` adapts a 3-D expert weight ``[E, in, out]`` with
``a [E, in, r]`` and ``b [E, r, out]``, applied per expert inside the experts' own path:
a grouped matmul over the sorted rows where ``F.grouped_mm`` takes them, one segment at a
time otherwise (never a Python module per expert). Layers keep adapters in an
``adapters`` ``ModuleDict`` keyed by the adapted weight's name (``wq``, ``w1``...), empty
when there are none; :mod:`moekit.adapt.lora` attaches, merges, saves and loads them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.ops.swiglu import grouped_matmul, segments


class LinearAdapter(nn.Module):
    """``x [..., in] -> scale * dropout(x) @ a @ b`` ``[..., out]``; ``a [in, r]``, ``b [r, out]``."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.rank, self.scale = rank, alpha / rank
        self.a = nn.Parameter(torch.empty(d_in, rank))
        self.b = nn.Parameter(torch.zeros(rank, d_out))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        nn.init.kaiming_uniform_(self.a.T, a=math.sqrt(5))  # peft's init of A; B = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a.to(x.dtype), self.b.to(x.dtype)
        return (self.dropout(x) @ a @ b) * self.scale  # [..., in] -> [..., r] -> [..., out]

    def delta(self) -> torch.Tensor:
        """The weight change ``[out, in]`` (``nn.Linear`` layout) that merging adds."""
        return (self.a @ self.b).t() * self.scale


class ExpertAdapter(nn.Module):
    """Per-expert adapter of a ``[E, in, out]`` weight: ``a [E, in, r]``, ``b [E, r, out]``."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.rank, self.scale = rank, alpha / rank
        self.a = nn.Parameter(torch.empty(num_experts, d_in, rank))
        self.b = nn.Parameter(torch.zeros(num_experts, rank, d_out))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        for e in range(num_experts):
            nn.init.kaiming_uniform_(self.a.data[e].T, a=math.sqrt(5))

    def grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """All experts' adapters over rows ``x [N, in]`` sorted by expert -> ``[N, out]``."""
        a, b = self.a.to(x.dtype), self.b.to(x.dtype)
        low = grouped_matmul(self.dropout(x), a, tokens_per_expert)  # [N, in] -> [N, r]
        return grouped_matmul(low, b, tokens_per_expert) * self.scale  # [N, r] -> [N, out]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s adapter on its rows ``x [n, in]`` (the reference) -> ``[n, out]``."""
        return (self.dropout(x) @ self.a[e].to(x.dtype) @ self.b[e].to(x.dtype)) * self.scale

    def delta(self) -> torch.Tensor:
        """The weight change ``[E, in, out]`` that merging adds."""
        return torch.bmm(self.a, self.b) * self.scale


def expert_projection(adapters: nn.ModuleDict, name: str, w: torch.Tensor, e: int, rows: torch.Tensor) -> torch.Tensor:
    """``rows @ w[e]`` plus expert ``e``'s adapter on weight ``name`` when there is one."""
    y = rows @ w[e]
    return y + adapters[name].expert(e, rows) if name in adapters else y


def adapted_linear(linear: nn.Linear, adapters: nn.ModuleDict, name: str, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` plus its adapter ``adapters[name]`` when there is one."""
    y = linear(x)
    return y + adapters[name](x) if name in adapters else y


def swiglu_with_adapters(x: torch.Tensor, weights: tuple[torch.Tensor, ...], adapters: nn.ModuleDict,
                         tokens_per_expert: torch.Tensor, grouped: bool) -> torch.Tensor:
    """SwiGLU experts with adapters on any of ``w1``/``w3``/``w2``: rows ``x [N, d]`` sorted
    by expert -> ``[N, d]``, all segments at once (``grouped``) or one segment at a time."""
    w1, w3, w2 = weights
    segs = None if grouped else segments(tokens_per_expert)  # one host sync for the three projections

    def project(name: str, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if grouped:
            y = grouped_matmul(rows, w, tokens_per_expert)
            return y + adapters[name].grouped(rows, tokens_per_expert) if name in adapters else y
        outs = [expert_projection(adapters, name, w, e, rows[lo:hi]) for e, lo, hi in segs]
        return torch.cat(outs) if outs else rows.new_zeros(0, w.shape[-1])

    hidden = F.silu(project("w1", w1, x)) * project("w3", w3, x)  # [N, d] -> [N, f]
    return project("w2", w2, hidden)  # [N, f] -> [N, d]
