"""moekit: sparse Mixture-of-Experts layers, models and tools on PyTorch."""

from moekit import _threads  # noqa: F401  (first: the OpenMP wait policy, before torch loads)
from moekit.config import DataConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig
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
from moekit.models import ModelOutput, Transformer, count_model_params
from moekit.registry import register_expert, register_router, router_names

__version__ = "0.1.0"

__all__ = [
    "DataConfig",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "MoEStats",
    "ModelConfig",
    "ModelOutput",
    "ParamCount",
    "Router",
    "RouterOutput",
    "RunConfig",
    "TrainConfig",
    "Transformer",
    "count_model_params",
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
