"""The low-precision decode steps (``cpu_lowp.c``: the MoE feed-forward for up to 64 tokens,
the attention of one token, the head with the final norm) against torch references built from
each format's dequantise-then-matmul (:meth:`WeightFormat.reference`, with the activations
rounded to int8 where the format's products round them), over shapes that take the AVX-512
VNNI blocks (widths a multiple of 64) and shapes that take their masked tails or the generic
loops (widths of 96 and 160)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from moekit import kernels
from moekit.inference import Decoder, KVCache
from moekit.models.quantize import quantize_model
from moekit.ops.lowp import get_format
from tests.kernels.rebuild import run_with_flags
from tests.shrink.test_quantize import moe_model

FORMATS = ["bf16", "int8", "int4"]


def _lib():
    lib = kernels.load()
    if lib is None:
        pytest.skip(f"kernels not built here: {kernels.status()}")
    return lib


def _rms(x, g, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def _weights(fmt, parts, group, lead=()):
    f = get_format(fmt)
    return kernels.lowp_weights("w", fmt, parts[f.parts[0]], parts.get("scale"), group, lead)


def moe_reference(x, g, eps, gate, top_k, fmt, p1, p3, p2, group):
    """x [B, d] plus, per token, the renormalised top-k softmax mix of its chosen experts."""
    f = get_format(fmt)
    h = _rms(x, g, eps)
    top, idx = torch.topk(h @ gate.t(), top_k, dim=-1)
    weights = torch.softmax(top, -1)
    out = x.clone()
    for b in range(x.shape[0]):
        for w, e in zip(weights[b].tolist(), idx[b].tolist()):
            one = {name: {k: t[e] for k, t in parts.items()} for name, parts in (("w1", p1), ("w3", p3), ("w2", p2))}
            hidden = F.silu(f.reference(h[b:b + 1], one["w1"], group)) * f.reference(h[b:b + 1], one["w3"], group)
            out[b] += w * f.reference(hidden, one["w2"], group)[0]
    return out, idx


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d,f,group", [(128, 256, 32), (128, 256, 64), (256, 384, 128), (128, 192, 32), (96, 160, 32)])
@pytest.mark.parametrize("B", [1, 5])
def test_moe_step_equals_the_reference(fmt, d, f, group, B):
    lib = _lib()
    torch.manual_seed(0)
    E, k = 6, 2
    fm = get_format(fmt)
    p1, p3 = fm.quantize(torch.randn(E, f, d) / d**0.5, group), fm.quantize(torch.randn(E, f, d) / d**0.5, group)
    p2 = fm.quantize(torch.randn(E, d, f) / f**0.5, group)
    gate, g = torch.randn(E, d), 1 + 0.1 * torch.randn(d)
    x = torch.randn(B, d)
    expected, idx = moe_reference(x, g, 1e-5, gate, k, fmt, p1, p3, p2, group)
    step = kernels.LowpMoETokenStep(lib, g, 1e-5, gate, None, k, True, 1.0, *(
        _weights(fmt, p, group, (E,)) for p in (p1, p3, p2)))
    got = x.clone()
    chosen, weights = step(got)
    assert [sorted(chosen[b * k:(b + 1) * k]) for b in range(B)] == idx.sort(-1).values.tolist()
    assert abs(sum(weights) - B) < 1e-5  # renormalised: each token's weights sum to 1
    assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item()
    assert (got - x).abs().max().item() > 0.01  # the experts added something


def _rope(t, cos, sin):
    half = t.shape[-1] // 2
    a, b = t[..., :half], t[..., half:]
    return torch.cat([a * cos[:half] - b * sin[:half], b * cos[half:] + a * sin[half:]], -1)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [False, True])
def test_attention_step_equals_the_reference(fmt, bias):
    lib = _lib()
    torch.manual_seed(1)
    H, Hkv, hd, d, group, rows, pos = 4, 2, 32, 128, 32, 16, 9
    fm = get_format(fmt)
    n = (H + 2 * Hkv) * hd
    qkv_parts, wo_parts = fm.quantize(torch.randn(n, d) / d**0.5, group), fm.quantize(torch.randn(d, H * hd) / 11, group)
    b_qkv, b_o = (torch.randn(n), torch.randn(d)) if bias else (None, None)
    g, x = 1 + 0.1 * torch.randn(d), torch.randn(d)
    kc, vc = torch.randn(Hkv, rows, hd), torch.randn(Hkv, rows, hd)
    angle = torch.rand(hd // 2) * 3
    cos, sin = torch.cat([angle.cos(), angle.cos()]), torch.cat([angle.sin(), angle.sin()])
    # the reference
    h = _rms(x, g, 1e-5)
    qkv = fm.reference(h[None], qkv_parts, group)[0] + (b_qkv if bias else 0)
    q, k, v = qkv[:H * hd].view(H, hd), qkv[H * hd:(H + Hkv) * hd].view(Hkv, hd), qkv[(H + Hkv) * hd:].view(Hkv, hd)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    kr, vr = kc.clone(), vc.clone()
    kr[:, pos], vr[:, pos] = k, v
    keys, vals = kr[:, :pos + 1].repeat_interleave(H // Hkv, 0), vr[:, :pos + 1].repeat_interleave(H // Hkv, 0)
    p = torch.softmax((keys @ q[:, :, None])[..., 0] / math.sqrt(hd), -1)  # [H, pos + 1]
    y = (p[:, None, :] @ vals)[:, 0].reshape(1, H * hd)
    expected = x + fm.reference(y, wo_parts, group)[0] + (b_o if bias else 0)
    step = kernels.LowpAttentionStep(lib, g, 1e-5, _weights(fmt, qkv_parts, group), b_qkv, (H, Hkv, hd), kc, vc,
                                     _weights(fmt, wo_parts, group), b_o)
    got = x.clone()
    step(got, cos, sin, pos, 0)
    assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item()
    assert torch.allclose(kc[:, pos], k, atol=1e-4) and torch.allclose(vc[:, pos], v, atol=1e-4)  # the cache row


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_head_folds_the_final_norm(fmt):
    lib = _lib()
    fm = get_format(fmt)
    parts, g, x = fm.quantize(torch.randn(200, 96), 32), 1 + torch.rand(96), torch.randn(3, 96) * 5
    got = kernels.rows_lowp(lib, fmt, parts[fm.parts[0]], parts.get("scale"), 32, x, torch.empty(3, 200),
                            norm_weight=g, eps=1e-6)
    expected = fm.reference(_rms(x, g, 1e-6), parts, 32)
    assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_batched_decode_step_equals_the_forward(fmt):
    """Three sequences a step: the MoE step over all three tokens, q/k/v in one product, the
    head over the batch's rows (``--what all``)."""
    _lib()
    from moekit.layers.quantized import quantize_linears

    model = quantize_model(moe_model(d_ff=128), fmt)
    quantize_linears(model, fmt)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(2))
    cache = KVCache.for_model(model, 3, 32)
    with torch.no_grad():
        model(ids[:, :11], kv_cache=cache)
        decoder = Decoder(model, cache)
        assert all(isinstance(layer[4], kernels.LowpMoETokenStep) for layer in decoder.layers)
        step = decoder.step(ids[:, 11])
        expected = model(ids).logits[:, -1]
    # the forward's 36 rows take bf16's matrix products (bf16 activations), the step float32's
    bound = 2e-2 if fmt == "bf16" else 1e-4
    assert (step - expected).abs().max().item() < bound * expected.abs().max().item()


STEPS_CHECK = """
import torch
from tests.shrink import test_lowp_steps as t
for fmt in t.FORMATS:
    for shape in [(128, 256, 32), (256, 384, 128), (96, 160, 32)]:
        t.test_moe_step_equals_the_reference(fmt, *shape, 3)
    t.test_attention_step_equals_the_reference(fmt, True)
    t.test_the_head_folds_the_final_norm(fmt)
from moekit import kernels
print(kernels.status())
print("ok")
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="-mno-avx2 is an x86 flag")
@pytest.mark.parametrize("flags", ["-mno-avx512f -mno-avx2", "-mno-avx512vnni -mno-avx512bf16"])
def test_the_steps_give_the_same_numbers_on_every_build(tmp_path, flags):
    """The steps built without AVX2 (the plain loops) and with AVX-512 but without VNNI and
    BF16 (the AVX2 integer products beside AVX-512 float loops)."""
    _lib()
    done = run_with_flags(tmp_path, flags, STEPS_CHECK)
    assert done.returncode == 0 and done.stdout.split("\n")[-2] == "ok", done.stderr[-2000:]
    said = "plain C loops" if "avx2" in flags else "AVX2"  # kernels.status() names the build's products
    assert f"int8/int4 products: {said}" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_models_run_on_cuda_through_torch_ops(fmt):
    """On CUDA the formats run as dequantise-then-matmul (torch ops): the same products as the
    CPU reference, a forward close to the CPU's and a decode that equals its own forward."""
    fm = get_format(fmt)
    parts = fm.quantize(torch.randn(48, 128), 32)
    x = torch.randn(5, 128)
    on_gpu = fm.matmul(x.cuda(), {k: t.cuda() for k, t in parts.items()}, 32).cpu()
    assert (on_gpu - fm.reference(x, parts, 32)).abs().max().item() < 1e-4 * on_gpu.abs().max().item()
    model = quantize_model(moe_model(d_ff=128), fmt)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cpu = model(ids).logits
        model.cuda()
        gpu = model(ids.cuda()).logits.cpu()
        bound = 2e-2 if fmt == "bf16" else 1e-3  # the CPU's 24-row bf16 products run in bfloat16
        assert (gpu - cpu).abs().max().item() < bound * cpu.abs().max().item()
        cache = KVCache.for_model(model, 2, 32)
        model(ids[:, :11].cuda(), kv_cache=cache)
        step = Decoder(model, cache).step(ids[:, 11].cuda()).cpu()
    assert (step - gpu[:, -1]).abs().max().item() < 1e-3 * gpu.abs().max().item()
