"""Weight names and layouts: Hugging Face <-> moekit, as pure functions on state dicts.

moekit stores routed experts as 3-D tensors in ``x @ w`` layout (``w1``/``w3``
``[E, d_model, d_ff]``, ``w2`` ``[E, d_ff, d_model]``); Hugging Face files hold either one
``nn.Linear`` weight per expert (``experts.N.w1.weight`` ``[d_ff, d_model]``, or
``gate_proj``/``up_proj``/``down_proj``) or, as transformers 5 keeps them in memory, fused
``experts.gate_up_proj`` ``[E, 2*d_ff, d_model]`` and ``experts.down_proj``
``[E, d_model, d_ff]``. :func:`from_hf` reads both; :func:`to_hf` writes the per-expert
layout, the one ``save_pretrained`` writes and vLLM and llama.cpp's converter read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from moekit.config import ModelConfig
from moekit.interop.families import Family

# Buffers some checkpoints carry that moekit recomputes.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_FFN = ("w1", "w3", "w2")  # gate, up, down


def _linear_names(config: ModelConfig) -> list[tuple[str, str, bool]]:
    """(moekit attention name, HF name, has bias) of the attention projections."""
    return [(m, h, config.out_bias if m == "wo" else config.qkv_bias) for m, h in _ATTN.items()]


class _Reader:
    """Takes tensors out of an HF state dict, checking shapes and remembering what it used."""

    def __init__(self, hf: Mapping[str, torch.Tensor], dtype: torch.dtype | None):
        self.hf, self.dtype = hf, dtype
        self.used: set[str] = set()
        self.problems: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.hf

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        if key not in self.hf:
            self.problems.append(f"missing {key} (expected shape {list(shape)})")
            return None
        self.used.add(key)
        t = self.hf[key]
        if tuple(t.shape) != tuple(shape):
            self.problems.append(f"{key} has shape {list(t.shape)}, expected {list(shape)}")
            return None
        return t if self.dtype is None else t.to(self.dtype)


def moe_prefix(hf_keys, layer: int, family: Family) -> str:
    """The MoE block's key prefix of ``layer`` (Mixtral files say ``block_sparse_moe``; a
    fused transformers-5 state dict says ``mlp``)."""
    p = f"model.layers.{layer}."
    if family.moe_prefix != "mlp" and f"{p}{family.moe_prefix}.gate.weight" not in hf_keys and f"{p}mlp.gate.weight" in hf_keys:
        return p + "mlp"
    return p + family.moe_prefix


def from_hf(
    hf: Mapping[str, torch.Tensor],
    config: ModelConfig,
    family: Family,
    shapes: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype | None = torch.float32,
    routed_experts: bool = True,
) -> dict[str, torch.Tensor]:
    """moekit's state dict from a Hugging Face one.

    Args:
        hf: HF tensor names -> tensors (a lazy :class:`SafetensorsDir` works: each tensor is
            read once).
        config: the model config (from :func:`config_from_hf`).
        family: the checkpoint's family.
        shapes: moekit parameter name -> shape (``Transformer(config)``'s state dict shapes).
        dtype: convert every tensor to this (``None``: keep the file's dtype).
        routed_experts: ``False`` leaves the routed experts in ``hf`` unread (expert
            offloading reads them itself, :mod:`moekit.inference.offload`).

    Raises ValueError naming every missing, unexpected or mis-shaped tensor.
    """
    r = _Reader(hf, dtype)
    out: dict[str, torch.Tensor | None] = {}

    def same(ours: str, theirs: str) -> None:
        out[ours] = r.take(theirs, shapes[ours])

    same("embed.weight", "model.embed_tokens.weight")
    same("norm.weight", "model.norm.weight")
    if config.tie_embeddings:
        r.used.add("lm_head.weight")  # some tied checkpoints still store the head
    else:
        same("lm_head.weight", "lm_head.weight")
    for i in range(config.n_layers):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        same(b + "attn_norm.weight", p + "input_layernorm.weight")
        same(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        for ours, theirs, bias in _linear_names(config):
            same(f"{b}attn.{ours}.weight", f"{p}self_attn.{theirs}.weight")
            if bias:
                same(f"{b}attn.{ours}.bias", f"{p}self_attn.{theirs}.bias")
        if config.qk_norm:
            same(b + "attn.q_norm.weight", p + "self_attn.q_norm.weight")
            same(b + "attn.k_norm.weight", p + "self_attn.k_norm.weight")
        if not config.is_moe_layer(i):
            for ours, theirs in zip(_FFN, ("gate_proj", "up_proj", "down_proj")):
                same(f"{b}ffn.{ours}.weight", f"{p}mlp.{theirs}.weight")
            continue
        mp = moe_prefix(hf, i, family)
        same(b + "ffn.router.gate.weight", mp + ".gate.weight")
        if routed_experts:
            out.update(_read_experts(r, mp + ".experts", b + "ffn.experts.", shapes, family.expert_names))
        else:
            r.used.update(k for k in hf if k.startswith(mp + ".experts."))
        if config.moe.num_shared_experts:
            for ours, theirs in zip(_FFN, ("gate_proj", "up_proj", "down_proj")):
                same(f"{b}ffn.shared_experts.ffn.{ours}.weight", f"{mp}.shared_expert.{theirs}.weight")
            if config.moe.shared_expert_gate:
                same(b + "ffn.shared_experts.gate.weight", mp + ".shared_expert_gate.weight")
        elif family.gated_shared_expert and f"{mp}.shared_expert_gate.weight" in hf:
            r.problems.append(f"{mp}.shared_expert_gate.weight is present but shared_expert_intermediate_size is 0")
    unexpected = sorted(k for k in hf if k not in r.used and not _IGNORED.search(k))
    if unexpected:
        r.problems.append(f"unexpected {len(unexpected)} tensor(s): {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else ""))
    if r.problems:
        raise ValueError(f"the {family.model_type} checkpoint does not match its config: " + "; ".join(r.problems))
    return out  # type: ignore[return-value]


def _read_experts(r: _Reader, prefix: str, ours: str, shapes, names: tuple[str, str, str]) -> dict:
    """The experts of one layer from the fused or the per-expert layout."""
    E, d, f = shapes[ours + "w1"]
    if r.has(prefix + ".gate_up_proj") or r.has(prefix + ".down_proj"):
        gate_up = r.take(prefix + ".gate_up_proj", (E, 2 * f, d))
        down = r.take(prefix + ".down_proj", (E, d, f))
        if gate_up is None or down is None:
            return {}
        return {
            ours + "w1": gate_up[:, :f].transpose(1, 2).contiguous(),  # [E, f, d] -> [E, d, f]
            ours + "w3": gate_up[:, f:].transpose(1, 2).contiguous(),
            ours + "w2": down.transpose(1, 2).contiguous(),  # [E, d, f] -> [E, f, d]
        }
    out = {}
    for name, theirs, shape in zip(_FFN, names, ((f, d), (f, d), (d, f))):
        parts = [r.take(f"{prefix}.{e}.{theirs}.weight", shape) for e in range(E)]
        if all(p is not None for p in parts):
            out[ours + name] = torch.stack([p.t() for p in parts])  # E x [out, in] -> [E, in, out]
    return out


def to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig, family: Family) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict (per-expert layout) of a moekit one; ``config`` must be
    expressible in ``family`` (see :func:`moekit.interop.hf_config.check_expressible`)."""
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": state["embed.weight"],
                                    "model.norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    gate, up, down = family.expert_names
    for i in range(config.n_layers):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = state[b + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = state[b + "ffn_norm.weight"]
        for ours, theirs, bias in _linear_names(config):
            w = state[f"{b}attn.{ours}.weight"]
            out[f"{p}self_attn.{theirs}.weight"] = w
            if bias:
                out[f"{p}self_attn.{theirs}.bias"] = state[f"{b}attn.{ours}.bias"]
            elif family.zero_qkv_bias and ours != "wo":  # the family always has q/k/v biases
                out[f"{p}self_attn.{theirs}.bias"] = w.new_zeros(w.shape[0])
        if config.qk_norm:
            out[p + "self_attn.q_norm.weight"] = state[b + "attn.q_norm.weight"]
            out[p + "self_attn.k_norm.weight"] = state[b + "attn.k_norm.weight"]
        if not config.is_moe_layer(i):
            for ours, theirs in zip(_FFN, ("gate_proj", "up_proj", "down_proj")):
                out[f"{p}mlp.{theirs}.weight"] = state[f"{b}ffn.{ours}.weight"]
            continue
        mp = f"{p}{family.moe_prefix}"
        out[mp + ".gate.weight"] = state[b + "ffn.router.gate.weight"]
        for ours, theirs in zip(_FFN, (gate, up, down)):
            w = state[f"{b}ffn.experts.{ours}"]  # [E, in, out]
            for e in range(w.shape[0]):
                out[f"{mp}.experts.{e}.{theirs}.weight"] = w[e].t().contiguous()  # -> [out, in]
        if config.moe.num_shared_experts:
            for ours, theirs in zip(_FFN, ("gate_proj", "up_proj", "down_proj")):
                out[f"{mp}.shared_expert.{theirs}.weight"] = state[f"{b}ffn.shared_experts.ffn.{ours}.weight"]
            out[mp + ".shared_expert_gate.weight"] = state[b + "ffn.shared_experts.gate.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}
