"""Compose an MoE from several dense models of one architecture (mergekit's "frankenMoE",
the merge step of Branch-Train-MiX).

Attention, norms and embeddings come from the base model (or, with
``attention="average"``, the mean over the expert models, as Branch-Train-MiX does); expert
``i`` of every layer is the FFN of model ``i``. The router rows say which expert a token
goes to:

- ``hidden`` (mergekit's best mode): run the base model on each expert's prompts; the row of
  expert ``i`` in layer ``l`` is the mean of layer ``l``'s FFN inputs over those tokens,
  normalised.
- ``cheap_embed``: the normalised mean of the prompts' token embeddings, the same in every
  layer (no forward pass; weaker).
- ``random``: normal rows (the router is to be trained afterwards).

A layer whose rows are nearly collinear cannot tell the experts apart: :func:`compose`
reports it (:func:`degenerate_layers`).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch

from moekit.analysis.collect import ffn_inputs
from moekit.data.corpus import calibration_tokens
from moekit.config import ModelConfig
from moekit.interop.hf import build_from_state
from moekit.models import Transformer

GATES = ("hidden", "cheap_embed", "random")
ATTENTION = ("base", "average")
# Rows whose cosine exceeds this route almost alike: a degenerate gate (see degenerate_layers).
COLLINEAR_COSINE = 0.995
_SAME = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "qkv_bias", "out_bias",
         "qk_norm", "tie_embeddings", "ffn_width")


def check_same_architecture(base: ModelConfig, others: list[ModelConfig]) -> None:
    """Every model must be dense and share the base's shapes; a ValueError names each field
    that differs, in which model."""
    problems = []
    for i, config in enumerate([base, *others]):
        who = "the base" if i == 0 else f"expert {i - 1}"
        if not config.dense:
            problems.append(f"{who} is an MoE model (compose takes dense models)")
        if i:
            for name in _SAME:
                ours, theirs = getattr(base, name), getattr(config, name)
                if ours != theirs:
                    problems.append(f"expert {i - 1} has {name}={theirs!r}, the base {ours!r}")
    if problems:
        raise ValueError("the models cannot be composed: " + "; ".join(problems))


@torch.no_grad()
def gate_rows(base: Transformer, prompts: list[torch.Tensor], gate: str, seed: int = 0) -> list[torch.Tensor]:
    """One ``[E, d_model]`` router weight per layer for ``gate`` (see the module doc)."""
    n_layers, E, d = base.config.n_layers, len(prompts), base.config.d_model
    if gate == "random":
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(E, d, generator=gen) * base.config.init_std for _ in range(n_layers)]
    if gate == "cheap_embed":
        rows = torch.stack([base.embed.weight[p.reshape(-1)].float().mean(0) for p in prompts])  # [E, d]
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return [rows.clone() for _ in range(n_layers)]
    per_expert = [ffn_inputs(base, p) for p in prompts]  # E x layers x [N, d]
    out = []
    for layer in range(n_layers):
        rows = torch.stack([h[layer].mean(0) for h in per_expert])  # [E, d]
        out.append(rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return out


def degenerate_layers(rows: list[torch.Tensor], cosine: float = COLLINEAR_COSINE) -> list[tuple[int, float]]:
    """``(layer, highest cosine between two rows)`` of each layer whose router rows are
    nearly collinear (above ``cosine``): its router hardly tells the experts apart."""
    out = []
    for layer, w in enumerate(rows):
        unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = unit @ unit.t() - 2 * torch.eye(w.shape[0])  # the diagonal out of the running
        top = float(cos.max())
        if top > cosine:
            out.append((layer, top))
    return out


@torch.no_grad()
def compose(base: Transformer, experts: list[Transformer], prompts: list[torch.Tensor] | None = None,
            top_k: int = 2, gate: str = "hidden", attention: str = "base", seed: int = 0) -> Transformer:
    """An MoE :class:`Transformer` whose layer experts are the FFNs of ``experts``.

    Args:
        base: the dense model giving attention, norms, embeddings and the hidden states.
        experts: dense models of the base's architecture, one per expert (at least 2).
        prompts: one ``[B, S]`` token tensor per expert (needed unless ``gate="random"``).
        top_k: experts per token.
        gate: ``"hidden"``, ``"cheap_embed"`` or ``"random"`` router rows.
        attention: ``"base"`` or ``"average"`` (the mean of the expert models' attention,
            norms and embeddings).
    Returns the model in eval mode; warns when a layer's router rows are nearly collinear.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {list(GATES)}, got {gate!r}")
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {list(ATTENTION)}, got {attention!r}")
    if len(experts) < 2:
        raise ValueError(f"compose needs at least 2 expert models, got {len(experts)}")
    check_same_architecture(base.config, [m.config for m in experts])
    if not 1 <= top_k <= len(experts):
        raise ValueError(f"top_k must be in 1..{len(experts)} (the number of experts), got {top_k}")
    if gate != "random":
        if prompts is None or len(prompts) != len(experts):
            raise ValueError(f"gate {gate!r} needs one prompt set per expert ({len(experts)}), got "
                             f"{0 if prompts is None else len(prompts)}")
        empty = [i for i, p in enumerate(prompts) if p.numel() == 0]
        if empty:
            raise ValueError(f"the prompts of expert(s) {empty} are empty")
    rows = gate_rows(base, prompts or [torch.zeros(0)] * len(experts), gate, seed)
    if gate != "random":
        for layer, cos in degenerate_layers(rows):
            warnings.warn(f"layer {layer}: router rows nearly collinear (cosine {cos:.4f}): its router can hardly "
                          "tell the experts apart; give more distinct prompts or train the router", stacklevel=2)
    width = base.config.ffn_width
    moe = replace(base.config.moe, d_ff=width, num_experts=len(experts), top_k=top_k, router="topk",
                  renormalize=True, num_shared_experts=0, d_ff_shared=None, shared_expert_gate=False,
                  capacity_factor=None, routed_scaling_factor=1.0)
    config = replace(base.config, dense=False, dense_d_ff=width, moe=moe, first_dense_layers=0, dense_layers=[],
                     moe_every=1)
    sources = [m.state_dict() for m in experts]
    rest = base.state_dict()
    state = {}
    for name, t in rest.items():
        if ".ffn." in name:
            continue
        state[name] = (torch.stack([s[name] for s in sources]).mean(0) if attention == "average"
                       else t).clone()
    for layer in range(config.n_layers):
        b = f"blocks.{layer}.ffn."
        for name in ("w1", "w3", "w2"):
            state[f"{b}experts.{name}"] = torch.stack([s[f"{b}{name}.weight"].t() for s in sources]).contiguous()
        state[b + "router.gate.weight"] = rows[layer].to(rest[b + "w1.weight"].dtype)
    return build_from_state(config, state)


def compose_to(base: str | Path, experts: list[str | Path], dst: str | Path, prompts: list[str | Path] | None = None,
               top_k: int = 2, gate: str = "hidden", attention: str = "base", seed: int = 0,
               overwrite: bool = False) -> str:
    """``moekit compose``: the models at ``base`` and ``experts`` (moekit runs or Hugging Face
    directories) composed into a moekit run at ``dst``, the prompts read from text files with
    the base's tokenizer. Everything is checked before ``dst`` is touched."""
    from moekit.checkpoint import check_destination
    from moekit.interop import load_model
    from moekit.interop.hf import save_run

    paths = [Path(base), *map(Path, experts)]
    for p in paths + [Path(f) for f in prompts or []]:
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
    if gate != "random" and len(prompts or []) != len(experts):
        raise ValueError(f"give one --prompts FILE per --expert ({len(experts)} experts, {len(prompts or [])} "
                         f"prompt files), or --gate random")
    dst = check_destination(dst, tuple(paths), overwrite)
    loaded = [load_model(p) for p in paths]
    check_same_architecture(loaded[0].model.config, [m.model.config for m in loaded[1:]])
    tokens = None
    if gate != "random":
        seq = min(256, loaded[0].model.config.max_seq_len)
        tokens = [calibration_tokens(f, loaded[0].tokenizer, seq) for f in prompts]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = compose(loaded[0].model, [m.model for m in loaded[1:]], tokens, top_k, gate, attention, seed)
    info = {"composed_from": [str(p) for p in paths], "gate": gate, "attention": attention}
    save_run(dst, model, loaded[0].tokenizer, info)
    notes = "".join(f"\nwarning: {w.message}" for w in caught)
    return f"wrote an MoE of {len(experts)} experts (top-{top_k}, gate {gate}) to {dst}{notes}"
