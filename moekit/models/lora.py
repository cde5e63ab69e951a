"""LoRA on a moekit model: attach adapters to the layers they target, merge them into the
weights, remove them.

Adapters live in each adapted layer's ``adapters`` ``ModuleDict`` (see
:mod:`moekit.layers.lora`), so parameter names say what they adapt
(``blocks.0.attn.adapters.wq.a``, ``blocks.1.ffn.experts.adapters.w1.b``). Targets:

- ``attention``: q/k/v/o projections (:class:`LinearAdapter`).
- ``experts``: the routed experts' 3-D weights, one low-rank pair per expert
  (:class:`ExpertAdapter`); a model without MoE layers is refused.
- ``ffn``: dense FFNs and shared experts (:class:`LinearAdapter`).

``B`` starts at zero, so an adapted model's logits equal its base's until it trains.
:func:`merge_lora` adds ``alpha/r * A B`` to each weight and removes the adapters: the
merged model is a plain model (saves to Hugging Face, decodes with the kernels). This sits
with the model (below checkpoints, which merge a LoRA run when they load it); saving and
loading adapters on their own is :mod:`moekit.adapt.lora`.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.config import LoRAConfig
from moekit.layers.experts import FeedForward, SwiGLUExperts
from moekit.layers.lora import ExpertAdapter, LinearAdapter

def _adapted(model: nn.Module, targets: list[str]):
    """``(layer module, weight names, kind)`` of every layer the targets reach."""
    from moekit.layers.attention import Attention

    for name, m in model.named_modules():
        if isinstance(m, Attention) and "attention" in targets:
            yield name, m, ("wq", "wk", "wv", "wo"), "linear"
        elif isinstance(m, SwiGLUExperts) and "experts" in targets:
            yield name, m, ("w1", "w3", "w2"), "experts"
        elif isinstance(m, FeedForward) and "ffn" in targets:
            yield name, m, ("w1", "w3", "w2") if m.w3 is not None else ("w1", "w2"), "linear"


def attach_lora(model: nn.Module, config: LoRAConfig) -> int:
    """Add adapters of ``config`` to ``model`` (on its weights' device, in float32).
    Returns the adapter parameter count. Raises ValueError for a target the model lacks."""
    if config.rank == 0:
        raise ValueError("lora.rank is 0: no adapters to attach (set --lora.rank, e.g. 8)")
    targets = config.target_list()
    if "experts" in targets:
        from moekit.layers.experts import GroupedExperts

        kinds = {type(m).__name__ for m in model.modules() if isinstance(m, GroupedExperts)}
        if not kinds:
            raise ValueError("lora.targets names experts but this model has no MoE layers (a dense model); "
                             "use attention and/or ffn")
        if kinds - {"SwiGLUExperts"}:
            raise ValueError(f"LoRA on experts supports SwiGLU experts; this model has {sorted(kinds)}")
    count = 0
    for _, layer, names, kind in _adapted(model, targets):
        if len(layer.adapters):
            raise ValueError("this model already has adapters; merge them (merge_lora) before attaching more")
        for n in names:
            w = getattr(layer, n)
            if kind == "experts":  # [E, in, out]
                ad = ExpertAdapter(w.shape[0], w.shape[1], w.shape[2], config.rank, config.alpha, config.dropout)
            else:  # nn.Linear: weight [out, in]
                ad = LinearAdapter(w.in_features, w.out_features, config.rank, config.alpha, config.dropout)
            param = w if kind == "experts" else w.weight
            layer.adapters[n] = ad.to(param.device)
            count += sum(p.numel() for p in ad.parameters())
    if count == 0:
        raise ValueError(f"lora.targets {config.targets!r} reaches no layer of this model ('ffn' adapts dense "
                         "FFNs and shared experts; this model has neither)")
    return count


def has_adapters(model: nn.Module) -> bool:
    return any(".adapters." in name for name, _ in model.named_parameters())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (``W += alpha/r A B``, in the weight's dtype) and
    remove the adapters. Returns ``model``."""
    for _, layer, names, kind in _adapted(model, ["attention", "experts", "ffn"]):
        for n in list(layer.adapters):
            delta = layer.adapters[n].delta()
            target = getattr(layer, n) if kind == "experts" else getattr(layer, n).weight
            target.add_(delta.to(target.dtype))
        layer.adapters.clear()
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by parameter name."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if ".adapters." in name}


def remove_adapters(model: nn.Module) -> None:
    """Remove every adapter without merging it."""
    for _, layer, _, _ in _adapted(model, ["attention", "experts", "ffn"]):
        layer.adapters.clear()
