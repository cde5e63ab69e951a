"""OLMoE (``OlmoeForCausalLM``): q/k RMSNorm over the whole projection, optional q/k/v
clamping (``clip_qkv``), an MoE in every layer, no sliding window."""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.families.base import Family, layered, register_family
from moekit.interop.families.qwen3_moe import attention_problems, read_common


@register_family
class Olmoe(Family):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    choose_order = 100

    def read_config(self, hf: dict[str, Any], model: dict[str, Any], moe: dict[str, Any]) -> None:
        read_common(hf, model, moe, "intermediate_size", "full")
        model["clip_qkv"] = hf.get("clip_qkv")

    def claim(self, config: ModelConfig) -> bool:
        return config.qk_norm == "full"

    def problems(self, config: ModelConfig) -> list[str]:
        out = attention_problems(config, self.model_type, "full")
        if layered(config):
            out.append("dense layers between MoE layers (OLMoE has an MoE in every layer)")
        if config.sliding_window:
            out.append("sliding_window (OLMoE has none)")
        return out

    def write_config(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        hf.update(num_experts=config.moe.num_experts, intermediate_size=config.moe.d_ff,
                  norm_topk_prob=config.moe.renormalize and config.moe.router != "switch",
                  attention_bias=config.qkv_bias, clip_qkv=config.clip_qkv)
