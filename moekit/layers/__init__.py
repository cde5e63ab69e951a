"""Single-device building blocks of an MoE layer: router, experts, dispatch, losses."""

from moekit.layers.dispatch import (
    DispatchPlan,
    dispatch,
    expert_capacity,
    plan_dispatch,
    reference_dispatch,
)
from moekit.layers.experts import (
    FeedForward,
    GELUExperts,
    ModuleExperts,
    SharedExperts,
    SwiGLUExperts,
)
from moekit.layers.losses import (
    expert_weighted_loss,
    load_balancing_loss,
    sequence_balance_loss,
    z_loss,
)
from moekit.layers.moe import (
    MoE,
    MoEOutput,
    MoEStats,
    ParamCount,
    count_params,
    update_router_biases,
)
from moekit.layers.router import Router, RouterOutput

__all__ = [
    "DispatchPlan",
    "FeedForward",
    "GELUExperts",
    "MoE",
    "MoEOutput",
    "MoEStats",
    "ModuleExperts",
    "ParamCount",
    "Router",
    "RouterOutput",
    "SharedExperts",
    "SwiGLUExperts",
    "count_params",
    "dispatch",
    "expert_capacity",
    "expert_weighted_loss",
    "load_balancing_loss",
    "plan_dispatch",
    "reference_dispatch",
    "sequence_balance_loss",
    "update_router_biases",
    "z_loss",
]
