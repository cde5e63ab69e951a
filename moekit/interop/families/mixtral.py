"""Mixtral (``MixtralForCausalLM``): every layer an MoE, renormalised top-k, no biases, no
shared experts, an optional sliding window."""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.families.base import Family, field, layered, register_family


@register_family
class Mixtral(Family):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    moe_prefix = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")
    default_rope_theta = 1e6
    choose_order = 1000  # the default: anything the others do not claim

    def read_config(self, hf: dict[str, Any], model: dict[str, Any], moe: dict[str, Any]) -> None:
        moe.update(d_ff=field(hf, "intermediate_size"), renormalize=True)
        model["sliding_window"] = hf.get("sliding_window") or None

    def claim(self, config: ModelConfig) -> bool:
        return True

    def problems(self, config: ModelConfig) -> list[str]:
        m = config.moe
        renormalize = m.renormalize and m.router != "switch"
        found = [what for flag, what in (
            (not renormalize, "top-k weights that are not renormalised"), (m.num_shared_experts, "shared experts"),
            (config.qkv_bias or config.out_bias, "attention biases"), (config.qk_norm, f"qk_norm={config.qk_norm!r}"),
            (config.clip_qkv, "clip_qkv"), (layered(config), "dense layers between MoE layers")) if flag]
        return [f"{what} (Mixtral has none)" for what in found]

    def write_config(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        m = config.moe
        hf.update(num_local_experts=m.num_experts, intermediate_size=m.d_ff, sliding_window=config.sliding_window,
                  router_jitter_noise=m.router_jitter)
