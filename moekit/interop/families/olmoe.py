"""OLMoE (``OlmoeForCausalLM``): q/k RMSNorm over the whole projection, optional q/k/v
clamping (``clip_qkv``), an MoE in every layer, no sliding window."""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.families.base import Family, field, layered, register_family
from moekit.interop.families.qwen3_moe import attention_problems


@register_family
class Olmoe(Family):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    choose_order = 100

    def read_config(self, hf: dict[str, Any], model: dict[str, Any], moe: dict[str, Any]) -> None:
        moe.update(d_ff=field(hf, "intermediate_size"), renormalize=bool(hf.get("norm_topk_prob", False)))
        if hf.get("use_sliding_window"):
            model["sliding_window"] = hf.get("sliding_window") or None
        bias = bool(hf.get("attention_bias", False))
        model.update(qkv_bias=bias, out_bias=bias, qk_norm="full", clip_qkv=hf.get("clip_qkv"))

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
