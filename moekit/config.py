"""Configuration dataclasses.

One dataclass per concern. Every field has a docstring-style comment; ``__post_init__``
validates and raises ``ValueError`` naming the field and what is allowed, so a bad config
fails at construction rather than deep inside a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from moekit.registry import expert_names, router_names

IMPLEMENTATIONS = ("fast", "reference")


def _positive(name: str, value: Any, kind: type = int) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) and value > 0
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass
class MoEConfig:
    """Configuration of one sparse Mixture-of-Experts feed-forward layer."""

    d_model: int
    """Width of the input and output (the residual stream)."""
    d_ff: int
    """Hidden width of each routed expert."""
    num_experts: int = 8
    """Number of routed experts E."""
    top_k: int = 2
    """Experts per token for token-choice routers; for ``expert_choice`` the average
    number of experts per token (its capacity is ``top_k * T / E`` tokens per expert)."""
    router: str = "topk"
    """Router name from the registry (see ``moekit.registry.router_names()``)."""
    expert: str = "swiglu"
    """Expert kind from the registry: ``"swiglu"`` (Mixtral) or ``"gelu"``."""
    num_shared_experts: int = 0
    """Always-active shared experts (DeepSeek/Qwen style) added to the routed output."""
    d_ff_shared: int | None = None
    """Hidden width of each shared expert; ``None`` means ``d_ff``."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by ``sigmoid(x @ w)`` (Qwen2-MoE)."""
    capacity_factor: float | None = None
    """``None`` = dropless (default). Otherwise each expert takes at most
    ``ceil(capacity_factor * T * top_k / E)`` tokens; overflow is dropped by router priority.
    For ``expert_choice`` it scales the per-expert capacity (default 1.0)."""
    renormalize: bool = True
    """Renormalise the top-k weights to sum to 1 (Mixtral); ``False`` keeps the raw probabilities."""
    aux_loss_coef: float = 0.01
    """Coefficient of the Switch/GShard load-balancing loss (0 disables it)."""
    z_loss_coef: float = 0.001
    """Coefficient of the ST-MoE router z-loss (0 disables it)."""
    seq_aux_loss_coef: float = 0.0
    """Coefficient of the DeepSeek-V3 sequence-wise balancing loss (0 disables it)."""
    router_jitter: float = 0.0
    """Multiplicative jitter ``U(1-j, 1+j)`` on the router input, training only."""
    router_bias: bool = False
    """Give the router's linear gate a bias term."""
    bias_update_rate: float = 0.001
    """``sigmoid_bias``: step of the aux-loss-free bias update (DeepSeek-V3's gamma)."""
    n_groups: int = 1
    """``sigmoid_bias``: number of expert groups for group-limited routing."""
    topk_groups: int = 1
    """``sigmoid_bias``: groups each token may pick experts from."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' weights (DeepSeek-V3 uses 2.5)."""
    sinkhorn_iters: int = 3
    """``sinkhorn``: Sinkhorn normalisation iterations during training."""
    implementation: str = "fast"
    """``"fast"`` (sort and grouped matmul) or ``"reference"`` (slow dense loop, for tests)."""
    check_inputs: bool = False
    """Debug mode: validate input width and finiteness on every forward (costs a sync)."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k", "sinkhorn_iters", "n_groups", "topk_groups"):
            _positive(name, getattr(self, name))
        _non_negative("num_shared_experts", self.num_shared_experts)
        if not isinstance(self.num_shared_experts, int):
            raise ValueError(f"num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}")
        if self.d_ff_shared is not None:
            _positive("d_ff_shared", self.d_ff_shared)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in 1..num_experts (1..{self.num_experts}), got {self.top_k}"
            )
        routers = router_names()
        if self.router not in routers:
            raise ValueError(f"router must be one of {routers}, got {self.router!r}")
        experts = expert_names()
        if self.expert not in experts:
            raise ValueError(f"expert must be one of {experts}, got {self.expert!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {self.implementation!r}")
        if self.capacity_factor is not None:
            _positive("capacity_factor", self.capacity_factor, float)
        for name in ("aux_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate"):
            _non_negative(name, getattr(self, name))
        _positive("routed_scaling_factor", self.routed_scaling_factor, float)
        if not (isinstance(self.router_jitter, (int, float)) and 0 <= self.router_jitter < 1):
            raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter!r}")
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"top_k must be 1 for router 'switch' (Switch Transformer routes top-1), got {self.top_k}")
        if self.num_experts % self.n_groups:
            raise ValueError(
                f"n_groups must divide num_experts ({self.num_experts}), got {self.n_groups}"
            )
        if self.topk_groups > self.n_groups:
            raise ValueError(f"topk_groups must be in 1..n_groups (1..{self.n_groups}), got {self.topk_groups}")
        if self.n_groups > 1:
            if self.router != "sigmoid_bias":
                raise ValueError(f"n_groups > 1 is only supported by router 'sigmoid_bias', got router {self.router!r}")
            per_group = self.num_experts // self.n_groups
            if self.top_k > self.topk_groups * per_group:
                raise ValueError(
                    f"top_k ({self.top_k}) must be <= topk_groups * experts per group "
                    f"({self.topk_groups} * {per_group})"
                )

    @property
    def shared_width(self) -> int:
        """Hidden width of all shared experts together (they act as one wider FFN)."""
        return self.num_shared_experts * (self.d_ff_shared or self.d_ff)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)
