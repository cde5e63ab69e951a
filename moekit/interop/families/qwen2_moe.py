"""Qwen2-MoE (``Qwen2MoeForCausalLM``): a gated shared expert, q/k/v biases, optional dense
layers (``decoder_sparse_step``, ``mlp_only_layers``), top-k renormalised or not."""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.families.base import Family, field, register_family


def read_sparse_layers(hf: dict[str, Any], model: dict[str, Any]) -> None:
    """The Qwen MoE families' dense-layer pattern and dense width."""
    model["moe_every"] = hf.get("decoder_sparse_step", 1) or 1
    model["dense_layers"] = list(hf.get("mlp_only_layers") or [])
    model["dense_d_ff"] = hf.get("intermediate_size")


def write_sparse_layers(config: ModelConfig, hf: dict[str, Any]) -> None:
    dense = [i for i in range(config.n_layers) if not config.is_moe_layer(i)]  # exact whatever the pattern
    hf.update(num_experts=config.moe.num_experts, moe_intermediate_size=config.moe.d_ff,
              intermediate_size=config.ffn_width, decoder_sparse_step=1, mlp_only_layers=dense,
              use_sliding_window=bool(config.sliding_window), sliding_window=config.sliding_window,
              norm_topk_prob=config.moe.renormalize and config.moe.router != "switch")


@register_family
class Qwen2Moe(Family):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    choose_order = 300
    zero_qkv_bias = True
    gated_shared_expert = True

    def read_config(self, hf: dict[str, Any], model: dict[str, Any], moe: dict[str, Any]) -> None:
        moe.update(d_ff=field(hf, "moe_intermediate_size"), renormalize=bool(hf.get("norm_topk_prob", False)))
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported for qwen2_moe (per-layer windows)")
        read_sparse_layers(hf, model)
        model["qkv_bias"] = bool(hf.get("qkv_bias", True))
        shared = hf.get("shared_expert_intermediate_size", 0)
        if shared:
            moe.update(num_shared_experts=1, d_ff_shared=shared, shared_expert_gate=True)

    def claim(self, config: ModelConfig) -> bool:
        return bool(config.moe.num_shared_experts or config.qkv_bias)

    def problems(self, config: ModelConfig) -> list[str]:
        m, out = config.moe, []
        if not m.num_shared_experts:
            out.append("no shared expert (Qwen2-MoE always has one)")
        elif not m.shared_expert_gate:
            out.append("shared experts without shared_expert_gate (Qwen2-MoE gates its shared expert)")
        if config.out_bias:
            out.append("out_bias=True (Qwen2-MoE's output projection has no bias)")
        if config.qk_norm:
            out.append(f"qk_norm={config.qk_norm!r} (Qwen2-MoE has none)")
        if config.sliding_window:
            out.append("sliding_window (Qwen2-MoE's windows are per layer)")
        if config.clip_qkv:
            out.append("clip_qkv (qwen2_moe has none)")
        return out

    def write_config(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        write_sparse_layers(config, hf)
        hf.update(qkv_bias=True, shared_expert_intermediate_size=config.moe.shared_width)
