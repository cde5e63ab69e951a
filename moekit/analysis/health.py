"""Routing health: turn per-layer expert loads into one headline figure and readable
warnings when an expert starves (gets almost nothing) or the routing collapses onto a few."""

from __future__ import annotations

import torch

STARVING_SHARE = 0.1
"""An expert with less than this fraction of the mean load is starving."""
COLLAPSE_RATIO = 2.0
"""A layer whose busiest expert carries more than this multiple of the mean is collapsing."""


def max_over_mean(loads: list[torch.Tensor]) -> float:
    """Worst layer's busiest-expert load over its mean load (1.0 = perfectly balanced)."""
    worst = 0.0
    for load in loads:
        mean = load.float().mean()
        if mean > 0:
            worst = max(worst, float(load.max() / mean))
    return worst


def health_warnings(loads: list[torch.Tensor], layer_ids: list[int]) -> list[tuple[tuple, str]]:
    """``(key, message)`` for every starving expert and collapsing layer in ``loads``
    (``[E]`` token counts per MoE layer, summed over a logging window)."""
    out = []
    for layer, load in zip(layer_ids, loads):
        load = load.float()
        mean = float(load.mean())
        if mean == 0:
            continue
        share = load / load.sum()
        for e in torch.nonzero(load < STARVING_SHARE * mean).flatten().tolist():
            message = (f"layer {layer} expert {e} is starving: {100 * float(share[e]):.1f}% of the routed "
                       f"tokens (a balanced share is {100 / len(load):.1f}%). Raise model.aux_loss_coef or "
                       "try model.router sigmoid_bias.")
            out.append(((layer, "starving", e), message))
        ratio = float(load.max()) / mean
        if ratio > COLLAPSE_RATIO:
            message = (f"layer {layer} routing is collapsing: expert {int(load.argmax())} takes {ratio:.1f}x "
                       "the mean load. Raise model.aux_loss_coef, add model.router_jitter, or lower train.lr.")
            out.append(((layer, "collapse"), message))
    return out
