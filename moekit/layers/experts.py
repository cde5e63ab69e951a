"""Experts: ``x_sorted [N, d_model], tokens_per_expert [E] -> y_sorted [N, d_out]``.

Tokens arrive sorted by expert, so expert ``e`` owns one contiguous segment of rows. The
built-in experts keep all weights in 3-D tensors (``w1``/``w3``: ``[E, d_model, d_ff]``,
``w2``: ``[E, d_ff, d_model]``, Mixtral's roles) and run every segment in one
``torch.nn.functional.grouped_mm`` call where it exists and the inputs qualify, else in a
loop over the non-empty segments. Many small fine-grained experts then cost one kernel
launch per matmul, not one per expert.

``expert_forward(e, x)`` is the obviously-correct single-expert computation the
reference path and the tests use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import MoEConfig
from moekit.registry import register_expert

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not _HAS_GROUPED_MM or x.dtype != w.dtype:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        # The CUDA kernels take bfloat16 on sm80+ with 16-byte aligned rows.
        return x.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0
    return False


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Segment-wise matmul: rows of segment ``e`` of ``x`` times ``w[e]``.

    Args:
        x: ``[N, K]`` rows sorted by expert.
        w: ``[E, K, M]`` one matrix per expert.
        tokens_per_expert: ``[E]`` segment lengths, summing to ``N``.

    Returns:
        ``[N, M]``.
    """
    if _grouped_mm_ok(x, w):
        offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)  # [E] segment ends
        return F.grouped_mm(x, w, offs=offs)
    outs = []
    for e, (seg, n) in enumerate(zip(torch.split(x, tokens_per_expert.tolist()), tokens_per_expert.tolist())):
        if n:
            outs.append(seg @ w[e])
    if not outs:
        return x.new_zeros(0, w.shape[-1])
    return torch.cat(outs)


def _init_uniform(t: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)  # the default of nn.Linear
    nn.init.uniform_(t, -bound, bound)


class GroupedExperts(nn.Module):
    """Base of the built-in experts: E feed-forward networks in 3-D weight tensors."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.d_out = d_model

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_expert("swiglu")
class SwiGLUExperts(GroupedExperts):
    """``w2(silu(x w1) * (x w3))`` per expert (Mixtral, Llama)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__(num_experts, d_model, d_ff)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_uniform(self.w1, self.d_model)
        _init_uniform(self.w3, self.d_model)
        _init_uniform(self.w2, self.d_ff)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        gate = grouped_matmul(x, self.w1, tokens_per_expert)  # [N, d] -> [N, f]
        up = grouped_matmul(x, self.w3, tokens_per_expert)
        return grouped_matmul(F.silu(gate) * up, self.w2, tokens_per_expert)  # [N, f] -> [N, d]

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]


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

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(grouped_matmul(x, self.w1, tokens_per_expert))  # [N, d] -> [N, f]
        return grouped_matmul(hidden, self.w2, tokens_per_expert)  # [N, f] -> [N, d]

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
        counts = tokens_per_expert.tolist()
        outs = [self.experts[e](seg) for e, seg in enumerate(torch.split(x, counts)) if counts[e]]
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
