"""``moekit quantize``: a model (moekit run or Hugging Face directory) written as a moekit
run with its experts (and optionally attention and head) in bf16, int8 or int4."""

from __future__ import annotations

from pathlib import Path

from moekit.models.quantize import quantize_model
from moekit.ops.lowp import get_format


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
