"""Storing a model's weights in a low-precision format (:mod:`moekit.ops.lowp`):
:func:`quantize_model` swaps its routed experts (and with ``what="all"`` its attention
projections and LM head) for :mod:`moekit.layers.quantized` copies and records the formats
in its config, so that it saves and loads as a quantised run."""

from __future__ import annotations

import dataclasses

from moekit.layers.quantized import QuantizedExperts, quantize_linears
from moekit.ops.lowp import get_format

WHAT = ("experts", "all")


def quantize_model(model, weight_format: str, group_size: int = 32, what: str = "experts"):
    """Store the routed SwiGLU experts of ``model`` (a :class:`moekit.Transformer`) in
    ``weight_format`` (``"bf16"``, ``"int8"``, ``"int4"``), and with ``what="all"`` the
    attention projections and the LM head too (unless tied to the embedding); the router,
    norms and embedding stay as they are. The config records the formats, so the model
    saves and loads as a quantised run. Returns ``model``."""
    from moekit.layers.experts import SwiGLUExperts

    fmt = get_format(weight_format)
    if what not in WHAT:
        raise ValueError(f"what must be one of {WHAT}, got {what!r}")
    if model.config.linear_format is not None:
        raise ValueError(f"the attention and head are already stored as {model.config.linear_format}; quantize the "
                         "float model")
    moe = model.config.moe
    if not any(b.is_moe for b in model.blocks):
        raise ValueError("this is a dense model: it has no routed experts to quantize")
    if moe.weight_format is not None:
        raise ValueError(f"the experts are already stored as {moe.weight_format}; quantize the float model")
    moe = dataclasses.replace(moe, weight_format=fmt.name, weight_group_size=group_size)  # checks the sizes
    for block in model.blocks:
        if not block.is_moe:
            continue
        experts = block.ffn.experts
        if type(experts) is not SwiGLUExperts or experts.adapters:
            raise ValueError(f"{type(experts).__name__} experts cannot be quantized (SwiGLU experts without LoRA "
                             "adapters can: merge adapters first)")
        block.ffn.experts = QuantizedExperts.from_float(experts, fmt.name, group_size)
        block.ffn.config = moe
    linear = None
    if what == "all":
        dataclasses.replace(model.config, linear_format=fmt.name, moe=moe)  # checks every width first
        quantize_linears(model, fmt.name, group_size)
        linear = fmt.name
    model.config = dataclasses.replace(model.config, moe=moe, linear_format=linear)
    return model
