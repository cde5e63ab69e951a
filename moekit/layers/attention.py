"""Causal self-attention with RoPE and grouped-query attention (GQA), on
``scaled_dot_product_attention``. With a KV cache it attends to the cached keys too.

The options the Hugging Face MoE families need are flags here: q/k/v (and output) biases
(Qwen2-MoE), RMSNorm on queries and keys per head (Qwen3-MoE) or over the whole projection
(OLMoE), clamping q/k/v (OLMoE's ``clip_qkv``) and a sliding window (Mixtral).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import QK_NORMS
from moekit.layers.lora import adapted_linear
from moekit.layers.norm import RMSNorm
from moekit.layers.rope import apply_rotary



def _float32_attention(q: torch.Tensor) -> bool:
    """Whether a causal attention over ``q`` runs in float32: bfloat16 on the CPU, in training."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad

class Attention(nn.Module):
    """Multi-head attention where ``n_kv_heads`` key/value heads are shared by groups of
    ``n_heads // n_kv_heads`` query heads (Mixtral: 32 query heads, 8 KV heads).

    Args:
        qkv_bias / out_bias: biases on the q, k, v projections / on the output projection.
        qk_norm: ``None``, ``"head"`` (RMSNorm over each head's ``head_dim``, Qwen3) or
            ``"full"`` (RMSNorm over the whole q and k projections, OLMoE).
        clip_qkv: clamp q, k and v to ``[-clip_qkv, clip_qkv]`` (``None``: no clamp).
        sliding_window: a query sees at most this many most recent keys (itself included).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = 1e-5,
        clip_qkv: float | None = None,
        sliding_window: int | None = None,
    ):
        super().__init__()
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {list(QK_NORMS)}, got {qk_norm!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)
        self.qk_norm, self.clip_qkv, self.sliding_window = qk_norm, clip_qkv, sliding_window
        self.fused_qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.adapters = nn.ModuleDict()  # LoRA on wq/wk/wv/wo (moekit.adapt.lora); empty: none
        self.q_norm = self.k_norm = None
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, norm_eps), RMSNorm(head_dim, norm_eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(n_heads * head_dim, norm_eps)
            self.k_norm = RMSNorm(n_kv_heads * head_dim, norm_eps)

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Inference: store the q, k and v weights (and biases) as row blocks of one
        ``[(H + 2 Hkv) hd, d_model]`` tensor, so that a forward without gradients runs one
        matmul instead of three (one token reads the weights faster in one long call). The
        parameters stay the same objects, now views of the fused tensor."""
        if not isinstance(self.wq, nn.Linear):  # quantised projections (moekit.layers.quantized): nothing to fuse
            return
        weight, bias = self.qkv_weights()
        start = 0
        for lin in (self.wq, self.wk, self.wv):
            n = lin.weight.shape[0]
            lin.weight.data = weight[start:start + n]
            if bias is not None:
                lin.bias.data = bias[start:start + n]
            start += n
        self.fused_qkv = (weight, bias)

    def _fused_is_live(self) -> bool:
        """Whether :meth:`fuse_qkv` ran and ``wq`` still views its tensor."""
        return self.fused_qkv is not None and self.wq.weight.data_ptr() == self.fused_qkv[0].data_ptr()

    def qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The q, k, v weights (and biases) as one ``[(H + 2 Hkv) hd, d_model]`` tensor: the
        fused one after :meth:`fuse_qkv`, else a concatenated copy."""
        if self._fused_is_live():
            return self.fused_qkv
        bias = None if self.wq.bias is None else torch.cat([self.wq.bias, self.wk.bias, self.wv.bias])
        return torch.cat([self.wq.weight, self.wk.weight, self.wv.weight]), bias

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.adapters:
            return tuple(adapted_linear(getattr(self, n), self.adapters, n, x) for n in ("wq", "wk", "wv"))
        if torch.is_grad_enabled() or not self._fused_is_live():
            return self.wq(x), self.wk(x), self.wv(x)
        fused = self.fused_qkv
        qkv = F.linear(x, fused[0], fused[1])
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return qkv.split([q_width, kv_width, kv_width], dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache=None,
        layer: int = 0,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            x: ``[B, S, d_model]``.
            cos, sin: ``[S, head_dim]`` (or ``[B, S, head_dim]``) rotary tables of x's positions.
            kv_cache: optional :class:`moekit.inference.KVCache`; x's keys and values are
                appended to layer ``layer``'s cache and x attends to everything cached.
            key_mask: optional ``[B, past+S]`` bool, False for padding keys (left-padded
                batches); a padding query still sees itself so no row is empty.
        Returns ``[B, S, d_model]``.
        """
        B, S, _ = x.shape
        q, k, v = self._project(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, S, self.n_heads, self.head_dim)  # [B, S, H*hd] -> [B, S, H, hd]
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if cos.dim() == 3:  # per-sequence positions: [B, S, hd] -> [B, 1, S, hd]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # -> [B, H, S, hd]
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # -> [B, Hkv, S, hd]
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            cached_k, cached_v = kv_cache.update(layer, k, v)  # [B, Hkv, past+S, hd]
            if past:  # (a prefill attends to its own k, v: the same values, without the cache's strides)
                k, v = cached_k, cached_v
        gqa = self.n_heads != self.n_kv_heads
        mask = self._mask(past, S, key_mask, x.device)
        if mask is None and past == 0 and _float32_attention(q):
            # the CPU's flash attention trains slower in bfloat16 than in float32 (its backward;
            # benchmarks/moe_vs_dense.py --dtype bfloat16): there it runs in float32
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                   enable_gqa=gqa).to(q.dtype)
        elif mask is None and past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # mask None here: one new token sees every cached one
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return adapted_linear(self.wo, self.adapters, "wo", y.transpose(1, 2).reshape(B, S, -1))  # [B, H, S, hd] -> [B, S, H*hd]

    def _mask(self, past: int, S: int, key_mask: torch.Tensor | None, device) -> torch.Tensor | None:
        """Boolean ``[S, past+S]`` or ``[B, 1, S, past+S]`` mask (True = attend), or None when
        plain causal attention (or, for one new token, no mask at all) is exact."""
        total = past + S
        windowed = self.sliding_window is not None and total > self.sliding_window
        if key_mask is None and not windowed and (past == 0 or S == 1):
            return None
        keys = torch.arange(total, device=device)
        queries = past + torch.arange(S, device=device)
        mask = keys[None, :] <= queries[:, None]  # [S, total] query i sees keys 0..past+i
        if windowed:
            mask = mask & (keys[None, :] > queries[:, None] - self.sliding_window)
        if key_mask is not None:  # [B, total] -> [B, 1, S, total]
            mask = mask & key_mask[:, None, None, :].bool()
            mask = mask | (keys[None, :] == queries[:, None])  # a padding query sees itself
        return mask
