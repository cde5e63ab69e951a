"""Attention, RoPE and RMSNorm against direct formulas."""

import math

import torch
import torch.nn.functional as F

from moekit.layers.attention import Attention
from moekit.layers.norm import RMSNorm
from moekit.layers.rope import RotaryEmbedding, apply_rotary


def test_gqa_attention_matches_a_naive_loop():
    torch.manual_seed(1)
    B, S, d, H, Hkv, hd = 2, 6, 24, 4, 2, 6
    attn = Attention(d, H, Hkv, hd)
    rope = RotaryEmbedding(hd, 16)
    x = torch.randn(B, S, d)
    cos, sin = rope(torch.arange(S))
    y = attn(x, cos, sin)

    q = attn.wq(x).view(B, S, H, hd)
    k = attn.wk(x).view(B, S, Hkv, hd)
    v = attn.wv(x).view(B, S, Hkv, hd)
    out = torch.zeros(B, S, H, hd)
    for h in range(H):
        g = h // (H // Hkv)  # the KV head this query head shares
        qh = apply_rotary(q[:, :, h].unsqueeze(1), cos, sin).squeeze(1)
        kh = apply_rotary(k[:, :, g].unsqueeze(1), cos, sin).squeeze(1)
        scores = qh @ kh.transpose(1, 2) / math.sqrt(hd)  # [B, S, S]
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, h] = F.softmax(scores, -1) @ v[:, :, g]
    torch.testing.assert_close(y, attn.wo(out.reshape(B, S, H * hd)), atol=1e-5, rtol=1e-5)


def test_bfloat16_training_attends_in_float32_on_the_cpu(monkeypatch):
    """Under CPU bfloat16 autocast with gradients the causal attention itself runs in float32
    (its backward is 2.2x faster there); without gradients it stays in bfloat16. Outputs and
    gradients stay within bfloat16's rounding of a float32 model's."""
    torch.manual_seed(2)
    B, S, d, H, Hkv, hd = 2, 32, 64, 4, 2, 16
    attn = Attention(d, H, Hkv, hd)
    cos, sin = RotaryEmbedding(hd, 64)(torch.arange(S))
    x = torch.randn(B, S, d, requires_grad=True)
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: seen.append(q.dtype) or sdpa(q, *a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x, cos, sin)
        with torch.no_grad():
            attn(x, cos, sin)
    assert seen == [torch.float32, torch.bfloat16] and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    grad, wgrad = x.grad.clone(), attn.wq.weight.grad.clone()
    x.grad = None
    attn.zero_grad()
    ref = attn(x, cos, sin)
    ref.square().sum().backward()
    assert (y.float() - ref).abs().max() < 0.02 * ref.abs().max()
    assert (x.grad - grad).norm() < 0.03 * x.grad.norm() and (attn.wq.weight.grad - wgrad).norm() < 0.03 * wgrad.norm()


def test_rope_rotates_pairs_of_half_split_coordinates_and_keeps_norms():
    rope = RotaryEmbedding(4, 8, theta=10000.0)
    x = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]] * 3]])  # [1, 1, 3, 4]
    cos, sin = rope(torch.tensor([0, 1, 2]))
    y = apply_rotary(x, cos, sin)[0, 0]
    # coordinate 0 pairs with coordinate 2 at frequency 1: position p rotates by p radians
    for p in range(3):
        torch.testing.assert_close(y[p], torch.tensor([math.cos(p), 0.0, math.sin(p), 0.0]))
    z = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(apply_rotary(z, cos, sin).norm(dim=-1), z.norm(dim=-1))


def test_rmsnorm_formula_and_float32_accumulation():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(8.0))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.arange(8.0)
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.float32  # weight is float32: the product promotes
