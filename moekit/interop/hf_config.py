"""Hugging Face ``config.json`` <-> :class:`moekit.config.ModelConfig`, for the MoE families
moekit reads and writes: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

Every Hugging Face name lives here (and in ``hf_weights.py``); the rest of moekit never sees
one. Anything a config asks for that moekit does not compute the same way (another
activation, RoPE scaling, Qwen's per-layer sliding windows) is a ``ValueError`` naming the
field, never a silent approximation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moekit.config import ModelConfig, MoEConfig


@dataclass(frozen=True)
class Family:
    """What differs between the supported families."""

    model_type: str
    architecture: str
    moe_prefix: str  # the MoE block's module name in a layer
    expert_names: tuple[str, str, str]  # (gate, up, down) per-expert projection names
    default_rope_theta: float


FAMILIES = {
    "mixtral": Family("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), 1e6),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), 1e4),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), 1e4),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), 1e4),
}


def family_of(hf: dict[str, Any]) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; moekit reads {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def _field(hf: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``hf`` (families renamed fields across versions)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise ValueError(f"config.json of model_type {hf.get('model_type')!r} lacks {' or '.join(names)}")


def _rope_theta(hf: dict[str, Any], family: Family) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type")) or scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default"):
        raise ValueError(f"rope_type {kind!r} is not supported; moekit computes the default RoPE only")
    return float(params.get("rope_theta", hf.get("rope_theta", family.default_rope_theta)))


def config_from_hf(hf: dict[str, Any], max_seq_len: int | None = None) -> ModelConfig:
    """The moekit model config of a Hugging Face ``config.json`` dict.

    Args:
        hf: the parsed config.json.
        max_seq_len: cap the RoPE tables and default KV cache length (``None``: the
            checkpoint's ``max_position_embeddings``).
    """
    family = family_of(hf)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; moekit's experts use 'silu' (SwiGLU)")
    t = family.model_type
    heads = _field(hf, "num_attention_heads")
    moe = dict(
        num_experts=_field(hf, "num_local_experts", "num_experts"),
        top_k=_field(hf, "num_experts_per_tok"),
        d_ff=_field(hf, "intermediate_size" if t in ("mixtral", "olmoe") else "moe_intermediate_size"),
        renormalize=True if t == "mixtral" else bool(hf.get("norm_topk_prob", False)),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)),
        z_loss_coef=0.0,  # none of these families trains with a z-loss
        router_jitter=float(hf.get("router_jitter_noise", 0.0) or 0.0),
    )
    model = dict(
        vocab_size=_field(hf, "vocab_size"),
        d_model=_field(hf, "hidden_size"),
        n_layers=_field(hf, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or None,
        max_seq_len=min(hf.get("max_position_embeddings", 4096), max_seq_len or 1 << 62),
        rope_theta=_rope_theta(hf, family),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    if t == "mixtral":
        model["sliding_window"] = hf.get("sliding_window") or None
    else:
        if hf.get("use_sliding_window"):
            if t == "qwen2_moe":
                raise ValueError("use_sliding_window=true is not supported for qwen2_moe (per-layer windows)")
            model["sliding_window"] = hf.get("sliding_window") or None
    if t in ("qwen2_moe", "qwen3_moe"):
        model["moe_every"] = hf.get("decoder_sparse_step", 1) or 1
        model["dense_layers"] = list(hf.get("mlp_only_layers") or [])
        model["dense_d_ff"] = hf.get("intermediate_size")
    if t == "qwen2_moe":
        model["qkv_bias"] = bool(hf.get("qkv_bias", True))
        shared = hf.get("shared_expert_intermediate_size", 0)
        if shared:
            moe.update(num_shared_experts=1, d_ff_shared=shared, shared_expert_gate=True)
    if t in ("qwen3_moe", "olmoe"):
        bias = bool(hf.get("attention_bias", False))
        model.update(qkv_bias=bias, out_bias=bias, qk_norm="head" if t == "qwen3_moe" else "full")
    if t == "olmoe":
        model["clip_qkv"] = hf.get("clip_qkv")
    return ModelConfig(**model, moe=MoEConfig(d_model=model["d_model"], **moe))


def choose_family(config: ModelConfig) -> Family:
    """The family that expresses ``config`` exactly: OLMoE for whole-projection q/k norms,
    Qwen3-MoE for per-head ones, Qwen2-MoE for gated shared experts or q/k/v biases, else
    Mixtral. Raises ValueError when none does (see :func:`check_expressible`)."""
    if config.qk_norm == "full":
        family = FAMILIES["olmoe"]
    elif config.qk_norm == "head":
        family = FAMILIES["qwen3_moe"]
    elif config.moe.num_shared_experts or config.qkv_bias:
        family = FAMILIES["qwen2_moe"]
    else:
        family = FAMILIES["mixtral"]
    check_expressible(config, family)
    return family


def check_expressible(config: ModelConfig, family: Family) -> None:
    """Raise a ValueError listing every feature of ``config`` that ``family`` cannot hold."""
    m, t = config.moe, family.model_type
    problems = []
    if config.dense:
        problems.append("a dense model (dense=True) is not an MoE")
    if m.router not in ("topk", "switch"):
        problems.append(f"router {m.router!r} (Hugging Face MoE routers are softmax top-k: use 'topk' or 'switch')")
    if m.expert != "swiglu":
        problems.append(f"expert {m.expert!r} (these families use SwiGLU experts)")
    if m.capacity_factor is not None:
        problems.append(f"capacity_factor={m.capacity_factor} (transformers routes dropless)")
    if m.router_bias:
        problems.append("router_bias=True (the router gate has no bias)")
    if m.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={m.routed_scaling_factor}")
    renormalize = m.renormalize and m.router != "switch"
    layered = config.first_dense_layers or config.dense_layers or config.moe_every != 1
    if t == "mixtral":
        for flag, what in ((not renormalize, "top-k weights that are not renormalised"),
                           (m.num_shared_experts, "shared experts"), (config.qkv_bias or config.out_bias, "attention biases"),
                           (config.qk_norm, f"qk_norm={config.qk_norm!r}"), (config.clip_qkv, "clip_qkv"),
                           (layered, "dense layers between MoE layers")):
            if flag:
                problems.append(f"{what} (Mixtral has none)")
    else:
        if t == "qwen2_moe":
            if not m.num_shared_experts:
                problems.append("no shared expert (Qwen2-MoE always has one)")
            elif not m.shared_expert_gate:
                problems.append("shared experts without shared_expert_gate (Qwen2-MoE gates its shared expert)")
            if config.out_bias:
                problems.append("out_bias=True (Qwen2-MoE's output projection has no bias)")
            if config.qk_norm:
                problems.append(f"qk_norm={config.qk_norm!r} (Qwen2-MoE has none)")
            if config.sliding_window:
                problems.append("sliding_window (Qwen2-MoE's windows are per layer)")
        else:
            if m.num_shared_experts:
                problems.append(f"shared experts ({t} has none)")
            if config.qkv_bias != config.out_bias:
                problems.append(f"qkv_bias={config.qkv_bias} with out_bias={config.out_bias} ({t} has both or neither)")
            want = "head" if t == "qwen3_moe" else "full"
            if config.qk_norm != want:
                problems.append(f"qk_norm={config.qk_norm!r} ({t} needs {want!r})")
        if t == "olmoe" and layered:
            problems.append("dense layers between MoE layers (OLMoE has an MoE in every layer)")
        if t == "olmoe" and config.sliding_window:
            problems.append("sliding_window (OLMoE has none)")
        if config.clip_qkv and t != "olmoe":
            problems.append(f"clip_qkv ({t} has none)")
    if problems:
        raise ValueError(f"this model cannot be saved as {t}: " + "; ".join(problems))


def config_to_hf(config: ModelConfig, family: Family, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict of ``config`` in ``family`` (checked by :func:`check_expressible`)."""
    check_expressible(config, family)
    m, t = config.moe, family.model_type
    hf: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": t,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": m.aux_loss_coef,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }
    renormalize = m.renormalize and m.router != "switch"
    if t == "mixtral":
        hf.update(num_local_experts=m.num_experts, intermediate_size=m.d_ff, sliding_window=config.sliding_window,
                  router_jitter_noise=m.router_jitter)
        return hf
    hf.update(num_experts=m.num_experts, norm_topk_prob=renormalize)
    if t == "olmoe":
        hf.update(intermediate_size=m.d_ff, attention_bias=config.qkv_bias, clip_qkv=config.clip_qkv)
        return hf
    dense = [i for i in range(config.n_layers) if not config.is_moe_layer(i)]  # exact whatever the pattern
    hf.update(moe_intermediate_size=m.d_ff, intermediate_size=config.ffn_width,
              decoder_sparse_step=1, mlp_only_layers=dense,
              use_sliding_window=bool(config.sliding_window), sliding_window=config.sliding_window)
    if t == "qwen2_moe":
        hf.update(qkv_bias=True, shared_expert_intermediate_size=m.shared_width)
    else:
        hf.update(attention_bias=config.qkv_bias)
    return hf
