"""Low-precision experts: weight formats (:mod:`~moekit.quant.formats`), the experts that
hold them (:mod:`~moekit.quant.experts`) and turning a float model into one
(:func:`quantize_model`, ``moekit quantize``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moekit.quant.experts import QuantizedExperts
from moekit.quant.formats import FORMATS, WeightFormat, get_format


WHAT = ("experts", "all")


def quantize_model(model, weight_format: str, group_size: int = 32, what: str = "experts"):
    """Store the routed SwiGLU experts of ``model`` (a :class:`moekit.Transformer`) in
    ``weight_format`` (``"bf16"``, ``"int8"``, ``"int4"``), and with ``what="all"`` the
    attention projections and the LM head too (unless tied to the embedding); the router,
    norms and embedding stay as they are. The config records the formats, so the model
    saves and loads as a quantised run. Returns ``model``."""
    from moekit.layers.experts import SwiGLUExperts
    from moekit.quant.linear import quantize_linears

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


def quantize_to(src: str | Path, dst: str | Path, weight_format: str, group_size: int = 32,
                overwrite: bool = False, what: str = "experts") -> str:
    """``moekit quantize``: the model at ``src`` (a moekit run or a Hugging Face directory)
    with its experts in ``weight_format``, written as a moekit run at ``dst``."""
    from moekit.checkpoint import check_destination
    from moekit.interop import load_model
    from moekit.interop.hf import save_run

    get_format(weight_format)
    dst = check_destination(dst, (Path(src),), overwrite)
    loaded = load_model(src)
    model = quantize_model(loaded.model, weight_format, group_size, what)
    save_run(dst, model, loaded.tokenizer, {"quantized_from": str(src), "weight_format": weight_format, "what": what})
    scope = "experts" if what == "experts" else "experts, attention" + ("" if model.config.tie_embeddings else " and head")
    return f"wrote {dst}: {scope} in {weight_format}" + (f" (groups of {group_size})" if weight_format == "int4" else "")


__all__ = ["FORMATS", "WHAT", "QuantizedExperts", "WeightFormat", "get_format", "quantize_model", "quantize_to"]
