"""moekit: sparse Mixture-of-Experts layers, models and tools on PyTorch."""

from moekit.config import MoEConfig
from moekit.layers import (
    MoE,
    MoEOutput,
    MoEStats,
    ParamCount,
    Router,
    RouterOutput,
    count_params,
    expert_weighted_loss,
    load_balancing_loss,
    sequence_balance_loss,
    update_router_biases,
    z_loss,
)
from moekit.registry import register_expert, register_router, router_names

__version__ = "0.1.0"

__all__ = [
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "MoEStats",
    "ParamCount",
    "Router",
    "RouterOutput",
    "count_params",
    "expert_weighted_loss",
    "load_balancing_loss",
    "register_expert",
    "register_router",
    "router_names",
    "sequence_balance_loss",
    "update_router_biases",
    "z_loss",
]
