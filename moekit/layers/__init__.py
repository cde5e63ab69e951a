"""Single-device building blocks of an MoE layer: router, experts, dispatch, losses."""

from moekit.layers.dispatch import DispatchPlan, dispatch, expert_capacity, plan_dispatch, reference_dispatch
from moekit.layers.experts import FeedForward, GELUExperts, ModuleExperts, SharedExperts, SwiGLUExperts
from moekit.layers.losses import expert_weighted_loss, load_balancing_loss, sequence_balance_loss, z_loss
from moekit.layers.moe import MoE, MoEOutput, MoEStats, ParamCount, count_params, update_router_biases
from moekit.layers.router import Router, RouterOutput

__all__ = [
    "DispatchPlan", "dispatch", "expert_capacity", "plan_dispatch", "reference_dispatch",
    "FeedForward", "GELUExperts", "ModuleExperts", "SharedExperts", "SwiGLUExperts",
    "expert_weighted_loss", "load_balancing_loss", "sequence_balance_loss", "z_loss",
    "MoE", "MoEOutput", "MoEStats", "ParamCount", "count_params", "update_router_biases",
    "Router", "RouterOutput",
]
