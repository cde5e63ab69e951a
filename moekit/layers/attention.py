"""Causal self-attention with RoPE and grouped-query attention (GQA), on
``scaled_dot_product_attention``. With a KV cache it attends to the cached keys too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.rope import apply_rotary


class Attention(nn.Module):
    """Multi-head attention where ``n_kv_heads`` key/value heads are shared by groups of
    ``n_heads // n_kv_heads`` query heads (Mixtral: 32 query heads, 8 KV heads)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache=None,
        layer: int = 0,
    ) -> torch.Tensor:
        """Args:
            x: ``[B, S, d_model]``.
            cos, sin: ``[S, head_dim]`` rotary tables of x's positions.
            kv_cache: optional :class:`moekit.inference.KVCache`; x's keys and values are
                appended to layer ``layer``'s cache and x attends to everything cached.
        Returns ``[B, S, d_model]``.
        """
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, S, H*hd] -> [B, H, S, hd]
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # -> [B, Hkv, S, hd]
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(layer, k, v)  # [B, Hkv, past+S, hd]
        gqa = self.n_heads != self.n_kv_heads
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif S == 1:  # one new token sees every cached one
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # a chunk after a prefix: query i sees keys 0..past+i
            keys = torch.arange(past + S, device=x.device)
            mask = keys[None, :] <= (past + torch.arange(S, device=x.device))[:, None]  # [S, past+S]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))  # [B, H, S, hd] -> [B, S, H*hd]
