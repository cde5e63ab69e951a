"""A Mixtral-style decoder-only language model, and its dense baseline.

``Transformer(config)`` builds pre-norm blocks (RMSNorm -> causal GQA attention with RoPE ->
RMSNorm -> feed-forward). The feed-forward is an :class:`moekit.MoE` in MoE layers and a
dense SwiGLU :class:`FeedForward` elsewhere; ``ModelConfig(dense=True)`` makes every layer
dense with width ``top_k * d_ff``, the baseline of equal active compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.layers.attention import Attention
from moekit.layers.experts import FeedForward
from moekit.layers.moe import MoE, MoEStats, ParamCount
from moekit.layers.norm import RMSNorm
from moekit.layers.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    """What :meth:`Transformer.forward` returns.

    Attributes:
        logits: ``[B, S, vocab_size]``.
        loss: mean next-token cross-entropy when ``targets`` were given, else ``None``
            (the auxiliary loss is *not* included; add ``aux_loss`` to train).
        aux_loss: scalar, the sum of every MoE layer's weighted auxiliary losses.
        layer_stats: one :class:`MoEStats` per block, ``None`` for dense blocks.
        router_logits: ``[B*S, E]`` per MoE block, ``None`` for dense blocks.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    layer_stats: list[MoEStats | None] = field(default_factory=list)
    router_logits: list[torch.Tensor | None] = field(default_factory=list)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(
            config.d_model, config.n_heads, config.kv_heads, config.dim_per_head,
            qkv_bias=config.qkv_bias, out_bias=config.out_bias, qk_norm=config.qk_norm,
            norm_eps=config.norm_eps, clip_qkv=config.clip_qkv, sliding_window=config.sliding_window,
        )
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.is_moe = config.is_moe_layer(index)
        self.ffn = MoE(config.moe) if self.is_moe else FeedForward(config.d_model, config.ffn_width)

    def forward(self, x, cos, sin, tokens, padding_mask, kv_cache, key_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, self.index, key_mask)
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.ffn(h), None
        out = self.ffn(h, token_ids=tokens, padding_mask=padding_mask)
        return x + out.output, out


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(tokens, targets=None, kv_cache=None)`` -> :class:`ModelOutput`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(config.dim_per_head, config.max_seq_len, config.rope_theta)
        self.reset_parameters()
        if config.linear_format is not None:  # a quantised run: its codes come from the checkpoint
            from moekit.layers.quantized import quantize_linears

            quantize_linears(self, config.linear_format, config.moe.weight_group_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by
        ``1/sqrt(2 n_layers)`` (GPT-2), so the residual stream's variance does not grow
        with depth. MoE experts and dense FFNs get the same init, for a fair comparison."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:  # norms (ones) and biases (zeros) keep their init
                continue
            last = name.rsplit(".", 1)[-1]
            out_proj = name.endswith(("attn.wo.weight", "w2.weight")) or last == "w2"
            nn.init.normal_(p, 0.0, out_std if out_proj else std)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache=None,
        padding_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> ModelOutput:
        """Args:
            tokens: ``[B, S]`` int64 ids.
            targets: ``[B, S]`` next-token ids; ``-100`` is ignored. Gives ``loss``.
            kv_cache: optional :class:`moekit.inference.KVCache`: tokens continue the cached
                sequence (positions start at ``kv_cache.length``).
            padding_mask: ``[B, S]`` 1 for real tokens; padding is left out of the MoE losses.
            positions: ``[B, S]`` RoPE position of each token (left-padded batches); default
                ``kv_cache.length + arange(S)`` for every sequence.
            key_mask: ``[B, past+S]`` bool, False where a key is padding (with a KV cache,
                covering the cached tokens too).
            last_only: compute logits for the last position only (``[B, 1, V]``; generation).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq] ids, got shape {tuple(tokens.shape)}")
        B, S = tokens.shape
        start = 0 if kv_cache is None else kv_cache.length
        if positions is None:
            positions = torch.arange(start, start + S, device=tokens.device)
        cos, sin = self.rope(positions)  # [S, hd] or [B, S, hd]
        x = self.embed(tokens)
        aux = x.new_zeros((), dtype=torch.float32)
        stats, logits_per_layer = [], []
        for block in self.blocks:
            x, moe_out = block(x, cos, sin, tokens, padding_mask, kv_cache, key_mask)
            stats.append(None if moe_out is None else moe_out.stats)
            logits_per_layer.append(None if moe_out is None else moe_out.router_logits)
            if moe_out is not None:
                aux = aux + moe_out.aux_loss
        if kv_cache is not None:
            kv_cache.advance(S)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(B * S, -1), targets.reshape(B * S), ignore_index=-100)
        return ModelOutput(logits, loss, aux, stats, logits_per_layer)

    @property
    def causal(self) -> bool:
        """False when a router needs the whole batch to decide (expert choice), so a token's
        output can depend on later tokens: such a model cannot generate. (A
        ``capacity_factor`` also lets later tokens displace earlier ones in training; at
        decode time one token never overflows, so generation is allowed there.)"""
        return all(block.ffn.router.causal for block in self.blocks if block.is_moe)

    def num_params(self) -> ParamCount:
        """Total parameters, and those active per token (``top_k`` routed experts per MoE
        layer). Tied embeddings count once."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for block in self.blocks:
            if block.is_moe:
                c = block.ffn.num_params()
                inactive += c.total - c.active
        return ParamCount(total, total - inactive)


def count_model_params(config: ModelConfig) -> ParamCount:
    """Exact :meth:`Transformer.num_params` from the config alone (no weights allocated):
    Mixtral 8x7B's shape gives 46.70B total, 12.88B active."""
    from moekit.layers.moe import count_params

    d, hd, h, kv = config.d_model, config.dim_per_head, config.n_heads, config.kv_heads
    attn = d * hd * (2 * h + 2 * kv) + 2 * d  # q, o, k, v + two norms
    attn += hd * (h + 2 * kv) if config.qkv_bias else 0
    attn += d if config.out_bias else 0
    attn += {"head": 2 * hd, "full": hd * (h + kv)}.get(config.qk_norm, 0)
    dense_ffn = 3 * d * config.ffn_width
    moe = count_params(config.moe)
    total = active = 0
    for i in range(config.n_layers):
        if config.is_moe_layer(i):
            total, active = total + attn + moe.total, active + attn + moe.active
        else:
            total, active = total + attn + dense_ffn, active + attn + dense_ffn
    embed = config.vocab_size * d * (1 if config.tie_embeddings else 2) + d  # embedding, head, final norm
    return ParamCount(total + embed, active + embed)


def model_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (and 3-D expert weights) decay; norms, biases and the
    embedding-free 1-D tensors do not."""
    decay, no_decay = [], []
    seen = set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["Block", "ModelOutput", "Transformer", "count_model_params", "model_param_groups"]
