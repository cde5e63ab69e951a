"""Rotary position embeddings (RoPE), in the half-split layout of Llama/Mixtral in
transformers: the first and second halves of each head are the two coordinates rotated
together, so Hugging Face weights load without permuting the projections."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions ``0..max_seq_len-1``."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # [S, hd/2]
        angles = torch.cat([angles, angles], dim=-1)  # [S, hd/2] -> [S, hd]
        self.max_seq_len = max_seq_len
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` ``[S]`` -> cos, sin ``[S, head_dim]``."""
        if positions.numel() and int(positions.max()) >= self.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} is beyond max_seq_len={self.max_seq_len}; "
                "use a shorter input or a model with a larger max_seq_len"
            )
        return self.cos[positions], self.sin[positions]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, S, hd]`` by the angles of its positions (cos/sin ``[S, hd]``)."""
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)
