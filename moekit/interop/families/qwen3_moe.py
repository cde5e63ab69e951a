"""Qwen3-MoE (``Qwen3MoeForCausalLM``): per-head q/k RMSNorm, an explicit ``head_dim``,
optional dense layers, attention biases on all projections or none."""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.families.base import Family, field, register_family
from moekit.interop.families.qwen2_moe import read_sparse_layers, write_sparse_layers


def read_common(hf: dict[str, Any], model: dict[str, Any], moe: dict[str, Any], d_ff_field: str,
                qk_norm: str) -> None:
    """What Qwen3-MoE and OLMoE read alike: the expert width, top-k renormalisation, one
    sliding window for all layers, biases on all projections or none, their q/k norm."""
    moe.update(d_ff=field(hf, d_ff_field), renormalize=bool(hf.get("norm_topk_prob", False)))
    if hf.get("use_sliding_window"):
        model["sliding_window"] = hf.get("sliding_window") or None
    bias = bool(hf.get("attention_bias", False))
    model.update(qkv_bias=bias, out_bias=bias, qk_norm=qk_norm)


def attention_problems(config: ModelConfig, model_type: str, qk_norm: str) -> list[str]:
    """What Qwen3-MoE and OLMoE share: no shared experts, biases on all projections or none,
    their own q/k norm."""
    out = []
    if config.moe.num_shared_experts:
        out.append(f"shared experts ({model_type} has none)")
    if config.qkv_bias != config.out_bias:
        out.append(f"qkv_bias={config.qkv_bias} with out_bias={config.out_bias} ({model_type} has both or neither)")
    if config.qk_norm != qk_norm:
        out.append(f"qk_norm={config.qk_norm!r} ({model_type} needs {qk_norm!r})")
    return out


@register_family
class Qwen3Moe(Family):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    choose_order = 200

    def read_config(self, hf: dict[str, Any], model: dict[str, Any], moe: dict[str, Any]) -> None:
        read_common(hf, model, moe, "moe_intermediate_size", "head")
        read_sparse_layers(hf, model)

    def claim(self, config: ModelConfig) -> bool:
        return config.qk_norm == "head"

    def problems(self, config: ModelConfig) -> list[str]:
        out = attention_problems(config, self.model_type, "head")
        if config.clip_qkv:
            out.append(f"clip_qkv ({self.model_type} has none)")
        return out

    def write_config(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        write_sparse_layers(config, hf)
        hf.update(attention_bias=config.qkv_bias)
