"""The dense families (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``):
a SwiGLU FFN in every layer, read as a ``ModelConfig(dense=True)``. They are what sparse
upcycling starts from and what a composed MoE borrows its experts from.

- Llama: biases on all four attention projections or none (``attention_bias``), no MLP bias.
- Mistral: no biases, an optional sliding window for every layer.
- Qwen2: q/k/v biases always, none on the output projection; one window for every layer.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.families.base import Family, field, register_family


class DenseFamily(Family):
    """What the three dense families share: the FFN width is ``intermediate_size``."""

    dense = True

    def read_config(self, hf: dict[str, Any], model: dict[str, Any], moe: dict[str, Any]) -> None:
        width = field(hf, "intermediate_size")
        if hf.get("mlp_bias"):
            raise ValueError(f"mlp_bias=true is not supported for {self.model_type} (moekit's FFNs have no bias)")
        # the moe section is what upcycling starts from: experts as wide as the dense FFN
        model.update(dense=True, dense_d_ff=width)
        moe.update(d_ff=width)

    def problems(self, config: ModelConfig) -> list[str]:
        out = []
        if config.qk_norm:
            out.append(f"qk_norm={config.qk_norm!r} ({self.model_type} has none)")
        if config.clip_qkv:
            out.append(f"clip_qkv ({self.model_type} has none)")
        return out

    def write_config(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        hf["intermediate_size"] = config.ffn_width


@register_family
class Llama(DenseFamily):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    choose_order = 1000  # the default dense family

    def read_config(self, hf: dict[str, Any], model: dict[str, Any], moe: dict[str, Any]) -> None:
        super().read_config(hf, model, moe)
        if (hf.get("pretraining_tp") or 1) != 1:
            raise ValueError(f"pretraining_tp={hf['pretraining_tp']} is not supported for llama (use 1)")
        bias = bool(hf.get("attention_bias", False))
        model.update(qkv_bias=bias, out_bias=bias)

    def claim(self, config: ModelConfig) -> bool:
        return True

    def problems(self, config: ModelConfig) -> list[str]:
        out = super().problems(config)
        if config.qkv_bias != config.out_bias:
            out.append(f"qkv_bias={config.qkv_bias} with out_bias={config.out_bias} (llama has both or neither)")
        if config.sliding_window:
            out.append("sliding_window (llama has none)")
        return out

    def write_config(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        super().write_config(config, hf)
        hf.update(attention_bias=config.qkv_bias, mlp_bias=False)


@register_family
class Mistral(DenseFamily):
    model_type = "mistral"
    architecture = "MistralForCausalLM"
    choose_order = 200

    def read_config(self, hf: dict[str, Any], model: dict[str, Any], moe: dict[str, Any]) -> None:
        super().read_config(hf, model, moe)
        model["sliding_window"] = hf.get("sliding_window") or None

    def claim(self, config: ModelConfig) -> bool:
        return bool(config.sliding_window) and not config.qkv_bias

    def problems(self, config: ModelConfig) -> list[str]:
        out = super().problems(config)
        if config.qkv_bias or config.out_bias:
            out.append("attention biases (mistral has none)")
        return out

    def write_config(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        super().write_config(config, hf)
        hf["sliding_window"] = config.sliding_window


@register_family
class Qwen2(DenseFamily):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    choose_order = 300
    zero_qkv_bias = True

    def read_config(self, hf: dict[str, Any], model: dict[str, Any], moe: dict[str, Any]) -> None:
        super().read_config(hf, model, moe)
        if hf.get("use_sliding_window"):
            layers = hf.get("num_hidden_layers")
            if (hf.get("max_window_layers") or 0) < (layers or 0):  # transformers: layers >= max_window_layers slide
                raise ValueError("use_sliding_window=true with max_window_layers below num_hidden_layers is not "
                                 "supported for qwen2 (per-layer windows; moekit has one window for all layers)")
        model["qkv_bias"] = True

    def claim(self, config: ModelConfig) -> bool:
        return config.qkv_bias and not config.out_bias

    def problems(self, config: ModelConfig) -> list[str]:
        out = super().problems(config)
        if config.out_bias:
            out.append("out_bias=True (qwen2's output projection has no bias)")
        if config.sliding_window:
            out.append("sliding_window (qwen2's windows are per layer)")
        return out

    def write_config(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        super().write_config(config, hf)
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers,
                  layer_types=["full_attention"] * config.n_layers)
