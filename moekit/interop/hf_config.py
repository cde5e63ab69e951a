"""Hugging Face ``config.json`` <-> :class:`moekit.config.ModelConfig`.

What every supported family shares (sizes, heads, RoPE, norms, the router's top-k) is mapped
here; what differs is the family's adapter in ``families/`` (one file each, registered in
:data:`FAMILIES`). Every Hugging Face name lives in ``interop/``; the rest of moekit never
sees one. Anything a config asks for that moekit does not compute the same way (another
activation, RoPE scaling, Qwen's per-layer sliding windows) is a ``ValueError`` naming the
field, never a silent approximation.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.interop.families import FAMILIES, Family, field


def family_of(hf: dict[str, Any]) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; moekit reads {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def family_named(model_type: str) -> Family:
    """The adapter of ``model_type``, or a ValueError listing the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; moekit writes {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def _rope_theta(hf: dict[str, Any], family: Family) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", family.default_rope_theta)))


def unsupported(hf: dict[str, Any]) -> list[str]:
    """Every field of ``hf`` that changes the computation in a way moekit does not implement
    (refused, never ignored): RoPE scaling of any type, partial rotary embeddings, another
    activation, attention dropout, per-layer attention kinds."""
    out = []
    for name in ("rope_parameters", "rope_scaling"):
        rope = hf.get(name)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            out.append(f"{name} must be an object, got {type(rope).__name__}")
            continue
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in (None, "default"):
            out.append(f"rope_type {kind!r} is not supported (in {name}; moekit computes the default RoPE only)")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            out.append(f"{name}.partial_rotary_factor={rope['partial_rotary_factor']} (moekit rotates whole heads)")
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        out.append(f"partial_rotary_factor={hf['partial_rotary_factor']} (moekit rotates whole heads)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        out.append(f"hidden_act {act!r} is not supported (moekit's experts use 'silu': SwiGLU)")
    if (hf.get("attention_dropout") or 0.0) != 0.0:
        out.append(f"attention_dropout={hf['attention_dropout']} (moekit has no attention dropout)")
    kinds = sorted({k for k in (hf.get("layer_types") or []) if k != "full_attention"})
    if kinds:
        out.append(f"layer_types with {kinds} (moekit has one attention kind for all layers)")
    return out


def config_from_hf(hf: dict[str, Any], max_seq_len: int | None = None) -> ModelConfig:
    """The moekit model config of a Hugging Face ``config.json`` dict.

    Args:
        hf: the parsed config.json.
        max_seq_len: cap the RoPE tables and default KV cache length (``None``: the
            checkpoint's ``max_position_embeddings``).
    """
    family = family_of(hf)
    refused = unsupported(hf)
    if refused:
        raise ValueError(f"config.json asks for what moekit does not compute: {'; '.join(refused)}")
    heads = field(hf, "num_attention_heads")
    moe: dict[str, Any] = {} if family.dense else dict(
        num_experts=field(hf, "num_local_experts", "num_experts"),
        top_k=field(hf, "num_experts_per_tok"),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)),
        z_loss_coef=0.0,  # none of these families trains with a z-loss
        router_jitter=float(hf.get("router_jitter_noise", 0.0) or 0.0),
    )
    model = dict(
        vocab_size=field(hf, "vocab_size"),
        d_model=field(hf, "hidden_size"),
        n_layers=field(hf, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or None,
        max_seq_len=min(hf.get("max_position_embeddings", 4096), max_seq_len or 1 << 62),
        rope_theta=_rope_theta(hf, family),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    family.read_config(hf, model, moe)
    return ModelConfig(**model, moe=MoEConfig(d_model=model["d_model"], **moe))


def choose_family(config: ModelConfig) -> Family:
    """The family that expresses ``config`` exactly: the first adapter of its kind (dense or
    MoE), in ``choose_order``, that claims it (MoE: OLMoE for whole-projection q/k norms,
    Qwen3-MoE for per-head ones, Qwen2-MoE for gated shared experts or q/k/v biases, else
    Mixtral; dense: Qwen2 for q/k/v biases alone, Mistral for a sliding window, else Llama).
    Raises ValueError when it cannot hold the model (see :func:`check_expressible`)."""
    kind = [f for f in FAMILIES.values() if f.dense == config.dense]
    family = next(f for f in sorted(kind, key=lambda f: f.choose_order) if f.claim(config))
    check_expressible(config, family)
    return family


def check_expressible(config: ModelConfig, family: Family) -> None:
    """Raise a ValueError listing every feature of ``config`` that ``family`` cannot hold."""
    if family.dense != config.dense:
        kinds = sorted(f.model_type for f in FAMILIES.values() if f.dense == config.dense)
        what = "a dense model (dense=True)" if config.dense else "an MoE model"
        raise ValueError(f"this model cannot be saved as {family.model_type}: {what} is saved as one of {kinds}")
    problems = [] if family.dense else moe_problems(config.moe)
    problems += family.problems(config)
    if not config.dense and config.moe.weight_format is not None:
        problems.append(f"experts stored as {config.moe.weight_format} (Hugging Face families hold float experts: "
                        "convert the model it was quantized from)")
    if problems:
        raise ValueError(f"this model cannot be saved as {family.model_type}: " + "; ".join(problems))


def moe_problems(m: MoEConfig) -> list[str]:
    """What of an MoE layer no Hugging Face MoE family holds."""
    problems = []
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
    return problems


def config_to_hf(config: ModelConfig, family: Family, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict of ``config`` in ``family`` (checked by :func:`check_expressible`)."""
    check_expressible(config, family)
    m = config.moe
    hf: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
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
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }
    if not family.dense:
        hf.update(num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_coef)
    family.write_config(config, hf)
    return hf
