"""Dynamic expert skipping at inference (``MoEConfig.skip_below``): a chosen expert whose
routing weight is below the threshold is not computed (see
:func:`moekit.layers.moe.skip_light_experts`)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn


def set_skip_below(model: nn.Module, below: float) -> int:
    """Set ``skip_below`` on every MoE layer of ``model`` (validated: ``0 <= below < 1``).
    Returns the number of layers changed."""
    from moekit.layers.moe import MoE

    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if below and not layers:
        raise ValueError("skip_below applies to MoE layers; this model has none")
    for m in layers:
        m.config = replace(m.config, skip_below=below)
    return len(layers)
