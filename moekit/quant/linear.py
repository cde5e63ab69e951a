"""Linear layers held in a low-precision format: the attention projections and the LM head
when a model is quantised with ``what="all"`` (``ModelConfig.linear_format``)."""

from __future__ import annotations

import torch
from torch import nn

from moekit.quant.formats import get_format

_ATTENTION = ("wq", "wk", "wv", "wo")


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with its ``[out, in]`` weight stored as a format's parts (buffers
    ``weight_q``, ``weight_scale``...); the bias, if any, stays a float parameter. Inference only."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_format: str, group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format, self.group_size = get_format(weight_format), group_size
        shape = (out_features, in_features)
        self.format.check(shape, group_size)
        for part, (part_shape, dtype) in self.format.part_shapes(shape, group_size).items():
            self.register_buffer(f"weight_{part}", torch.zeros(part_shape, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format.name}")

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, weight_format: str, group_size: int = 32) -> QuantizedLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_format, group_size)
        for part, t in q.format.quantize(linear.weight.detach(), group_size).items():
            getattr(q, f"weight_{part}").copy_(t)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q.to(linear.weight.device)

    def parts(self) -> dict[str, torch.Tensor]:
        return {p: getattr(self, f"weight_{p}") for p in self.format.parts}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [..., in] -> [T, in]
        y = self.format.matmul(flat, self.parts(), self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # codes and scales keep their dtypes; the float bias follows the model (see QuantizedExperts)
        return super()._apply(lambda t: fn(t) if t is self.bias else t.to(fn(t.new_empty(0)).device), recurse)


def quantize_linears(model, weight_format: str, group_size: int = 32) -> list[str]:
    """Replace the attention projections of every block of ``model`` and its LM head (unless
    tied to the embedding) by :class:`QuantizedLinear` copies. Returns what was replaced."""
    done = []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if attn.adapters:
            raise ValueError(f"block {i}'s attention has LoRA adapters: merge them before quantizing")
        attn.fused_qkv = None  # the fused float copy is gone with the float weights
        for name in _ATTENTION:
            setattr(attn, name, QuantizedLinear.from_linear(getattr(attn, name), weight_format, group_size))
            done.append(f"blocks.{i}.attn.{name}")
    if not model.config.tie_embeddings:
        model.lm_head = QuantizedLinear.from_linear(model.lm_head, weight_format, group_size)
        done.append("lm_head")
    return done
