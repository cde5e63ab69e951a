"""Getting a model ready for fast inference."""

from __future__ import annotations

from torch import nn


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, and the projections a decoded token reads back to back fused into one
    tensor each (attention q/k/v, each expert's gate/up), so that one long matrix-vector
    product replaces two or three short ones. Parameters keep their names, shapes and
    values (they become views of the fused tensors): state dicts, saving and the logits
    are unchanged. Returns ``model``."""
    from moekit.layers.attention import Attention
    from moekit.layers.experts import SwiGLUExperts

    for m in model.modules():
        if isinstance(m, Attention):
            m.fuse_qkv()
        elif isinstance(m, SwiGLUExperts):
            m.fuse_gate_up()
    return model.eval()
