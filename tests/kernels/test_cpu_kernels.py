"""The C matrix-vector kernels against torch on the same numbers."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig, kernels
from moekit.layers.thresholds import THRESHOLDS
from moekit.ops.swiglu import _SwiGLUGrouped, _SwiGLUKernel
from moekit.layers.norm import RMSNorm
from tests.kernels.rebuild import run_with_flags

lib = kernels.load()
needs_lib = pytest.mark.skipif(lib is None, reason=f"kernels not built here: {kernels.status()}")


@needs_lib
@pytest.mark.parametrize("N, K, ld", [(1, 16, 16), (7, 5, 5), (33, 40, 40), (64, 512, 512), (19, 24, 31), (200, 130, 300)])
def test_rows_equal_a_matrix_vector_product(N, K, ld):
    torch.manual_seed(N + K)
    w = torch.randn(N, ld)[:, :K]  # row stride ld >= K
    x, bias, add = torch.randn(K), torch.randn(N), torch.randn(N)
    out = torch.empty(N)
    torch.testing.assert_close(kernels.rows(lib, w, x, out), w @ x, atol=1e-5, rtol=1e-5)
    kernels.rows(lib, w, x, out, alpha=0.5, bias=bias, add=add)
    torch.testing.assert_close(out, 0.5 * (w @ x) + bias + add, atol=1e-5, rtol=1e-5)
    norm = RMSNorm(K, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    kernels.rows(lib, w, x, out, norm_weight=norm.weight, eps=norm.eps)
    with torch.no_grad():
        torch.testing.assert_close(out, w @ norm(x), atol=1e-5, rtol=1e-5)
    before = add.clone()
    kernels.rows(lib, w, x, add, add=add)  # in place: out is add
    torch.testing.assert_close(add, before + w @ x, atol=1e-5, rtol=1e-5)


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


@needs_lib
@pytest.mark.parametrize("K, Fd, N", [(16, 16, 16), (40, 72, 40), (512, 1408, 512), (33, 200, 17), (24, 300, 1100)])
@pytest.mark.parametrize("fused", [False, True])
def test_swiglu_add_equals_the_expert(K, Fd, N, fused):
    torch.manual_seed(K * Fd)
    if fused:  # the halves of one [K, 2F] tensor, as SwiGLUExperts.fuse_gate_up stores them
        w13 = torch.randn(K, 2 * Fd) / K**0.5
        w1, w3 = w13[:, :Fd], w13[:, Fd:]
    else:
        w1, w3 = torch.randn(K, Fd) / K**0.5, torch.randn(K, Fd) / K**0.5
    w2 = torch.randn(Fd, N) / Fd**0.5
    x, out = torch.randn(K), torch.randn(N)
    want = out + 0.3 * swiglu(x, w1, w3, w2)
    kernels.swiglu_add(lib, x, w1, w3, w2, out, 0.3)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)


@needs_lib
@pytest.mark.parametrize("fields", [{}, dict(renormalize=False, router_bias=True, routed_scaling_factor=2.5),
                                    dict(num_experts=8, top_k=3, d_ff=100), dict(top_k=1)],
                         ids=["mixtral", "no renormalise, bias, scale", "top-3 of 8", "top-1"])
@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "fused gate/up"])
def test_moe_token_equals_the_moe_layer(fields, prepared):
    torch.manual_seed(0)
    cfg = MoEConfig(**(dict(d_model=48, d_ff=40, num_experts=6, top_k=2) | fields))
    moe, norm = MoE(cfg).eval(), RMSNorm(48)
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 1.0)  # far from ties
        if moe.router.gate.bias is not None:
            moe.router.gate.bias.normal_(0, 1.0)
        norm.weight.uniform_(0.5, 1.5)
    if prepared:
        moe.experts.fuse_gate_up()
    assert kernels.moe_token_ok(norm.weight, moe.router.gate.weight, moe.router.gate.bias, *moe.experts.weights())
    with torch.inference_mode():
        for _ in range(5):
            x = torch.randn(48)
            h = norm(x)
            with kernels.enabled(False):  # the reference: the layer in torch ops
                ref = moe(h[None])
            want = x + ref.output[0]
            got = x.clone()
            step = kernels.MoETokenStep(lib, norm.weight, norm.eps, moe.router.gate.weight, moe.router.gate.bias,
                                        cfg.top_k, cfg.renormalize, cfg.routed_scaling_factor, *moe.experts.weights())
            chosen, weights = step(got)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            assert chosen == ref.routing.indices[0].tolist()
            torch.testing.assert_close(torch.tensor(weights), ref.routing.weights[0], atol=1e-6, rtol=1e-5)


def test_moe_token_refuses_what_it_cannot_run():
    from moekit.inference.decode import _norm_ok

    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2)
    moe, norm = MoE(cfg), RMSNorm(16)
    with torch.no_grad():  # GELU experts: the layer does not ask the kernel
        assert MoE(MoEConfig(**{**cfg.__dict__, "expert": "gelu"})).eval().choose_path(torch.randn(1, 16)) == "dispatch"
    assert not _norm_ok(torch.nn.LayerNorm(16)) and _norm_ok(norm)
    gate = moe.router.gate
    assert kernels.moe_token_ok(norm.weight, gate.weight, gate.bias, *moe.experts.weights())
    moe.to(torch.bfloat16)
    assert not kernels.moe_token_ok(norm.weight, gate.weight.float(), None, *moe.experts.weights())


def test_disabled_kernels_say_so_and_are_not_used(tmp_path):
    code = "from moekit import kernels; print(kernels.load() is None); print(kernels.status())"
    env = dict(os.environ, MOEKIT_KERNELS="0", MOEKIT_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["True", "cpu kernels off: disabled by MOEKIT_KERNELS=0"]


def test_a_missing_compiler_falls_back_to_torch(tmp_path):
    code = "from moekit import kernels; print(kernels.load() is None); print(kernels.status())"
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), MOEKIT_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "True" and lines[1].startswith("cpu kernels off: build failed, using torch ops")
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind


@needs_lib
def test_the_build_is_cached_by_source_and_cpu(tmp_path):
    code = "from moekit import kernels; kernels.load(); print(kernels.status())"
    env = dict(os.environ, MOEKIT_CACHE_DIR=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    built = list((tmp_path / "kernels").glob("moekit-cpu-*.so"))
    assert len(built) == 1 and str(built[0]) in first
    mtime = built[0].stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built[0].name]  # no temp files left


def test_every_included_header_is_hashed_with_the_sources():
    """A header the C files include is part of the build's cache key (a change to it must
    rebuild) and of the package, and every listed header exists and is included."""
    import re

    from moekit.kernels import library

    included = {m for src in library.SOURCES for m in re.findall(r'#include "([^"]+)"', src.read_text())}
    included |= {m for h in library.HEADERS for m in re.findall(r'#include "([^"]+)"', h.read_text())}
    assert included == {h.name for h in library.HEADERS}
    assert all(h.exists() for h in library.HEADERS)


@needs_lib
@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "fused gate/up"])
def test_the_few_token_moe_path_runs_one_row_experts_in_the_kernel(prepared, monkeypatch):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=40, d_ff=56, num_experts=4, top_k=2)
    fast = MoE(cfg).eval()
    ref = MoE(MoEConfig(**{**cfg.__dict__, "implementation": "reference"})).eval()
    ref.load_state_dict(fast.state_dict())
    if prepared:
        fast.experts.fuse_gate_up()
    calls = []
    for name in ("swiglu_add", "moe_token"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    x = torch.randn(2, 40)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x).output, ref(x).output, atol=2e-5, rtol=1e-5)
        assert calls == ["swiglu_add"] * 4  # two tokens: one call per chosen expert
        calls.clear()
        torch.testing.assert_close(fast(x[:1]).output, ref(x[:1]).output, atol=2e-5, rtol=1e-5)
        assert calls == ["moe_token"]  # one token: the router and both experts in one call


@needs_lib
@pytest.mark.parametrize("fields", [
    dict(),
    dict(top_k=1, renormalize=False, router_bias=True),
    dict(top_k=3, routed_scaling_factor=2.5, renormalize=False),
    dict(num_experts=64, top_k=8, d_ff=24),
])
@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "fused gate/up"])
def test_one_token_through_the_layer_kernel_equals_the_general_path(fields, prepared, monkeypatch):
    torch.manual_seed(3)
    moe = MoE(MoEConfig(**{"d_model": 48, "d_ff": 40, "num_experts": 6, "top_k": 2, **fields})).eval()
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 1.0)  # well-separated logits: no near-ties to flip
        if moe.router.gate.bias is not None:
            moe.router.gate.bias.normal_(0, 1.0)
    if prepared:
        moe.experts.fuse_gate_up()
    x = torch.randn(1, 1, 48)
    with torch.inference_mode():
        got = moe(x)
        assert moe.choose_path(x.reshape(1, 48)) == "one_token"
        monkeypatch.setattr(MoE, "choose_path", lambda self, *a: "dispatch")
        want = moe(x)
    torch.testing.assert_close(got.output, want.output, atol=2e-5, rtol=1e-5)
    assert got.output.shape == x.shape
    assert torch.equal(got.routing.indices, want.routing.indices)
    for name in ("weights", "logits", "probs"):
        torch.testing.assert_close(getattr(got.routing, name), getattr(want.routing, name), atol=1e-6, rtol=1e-5)
    assert torch.equal(got.stats.tokens_per_expert, want.stats.tokens_per_expert)
    assert int(got.stats.dropped_tokens) == 0 and float(got.aux_loss) == 0.0


@needs_lib
def test_the_one_token_layer_kernel_is_left_where_it_does_not_apply():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=2, router_jitter=0.1))
    flat = torch.randn(1, 16)
    with torch.no_grad():
        assert moe.choose_path(flat) != "one_token"  # training mode with jitter noise
        assert moe.eval().choose_path(flat.double()) != "one_token"
        assert MoE(MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=2, router="sampling")).eval().choose_path(flat) != "one_token"
        assert MoE(MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=2, num_shared_experts=1)).eval().choose_path(flat) != "one_token"
        assert moe.choose_path(flat) == "one_token"  # eval, float32: it applies
        with kernels.enabled(False):
            assert moe.choose_path(flat) != "one_token"  # the public switch
    assert moe.choose_path(flat) != "one_token"  # autograd on


def _segment_reference(experts, x, counts):
    """Each expert on its rows, in torch ops: the output and, through autograd, every gradient."""
    ends = torch.tensor(counts).cumsum(0).tolist()
    return torch.cat([experts.expert_forward(e, x[a - n : a]) for e, (n, a) in enumerate(zip(counts, ends))])


# shapes for both kernels; for the blocked one also a depth over one packed panel (300 >
# 256), an expert over one task's 192 rows, hidden widths that are and are not whole strips
SEGMENT_CASES = [(40, 56, [2, 0, 1, 5]), (33, 200, [1, 1, 3, 0, 5]), (512, 224, [2] * 6), (16, 16, [0, 0, 1]),
                 (300, 40, [250, 0, 7]), (64, 96, [100, 1, 0, 31]),
                 (40, 600, [200, 0, 3]),  # wider than one packed block of B (512 columns)
                 (64, 1024, [20, 0, 3])]  # a small weight read in place, two 512-column blocks


@needs_lib
@pytest.mark.parametrize("d, f, counts", SEGMENT_CASES)
@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "fused gate/up"])
@pytest.mark.parametrize("blocked", [False, True], ids=["rows", "blocked"])
def test_swiglu_segments_equal_each_expert_on_its_rows(d, f, counts, prepared, blocked):
    torch.manual_seed(d + f)
    experts = MoE(MoEConfig(d_model=d, d_ff=f, num_experts=len(counts), top_k=1)).experts.eval()
    if prepared:
        experts.fuse_gate_up()
    tpe = torch.tensor(counts)
    x = torch.randn(sum(counts) + 3, d)  # 3 rows past the counts: zero out
    with torch.inference_mode():
        got = kernels.swiglu_segments(lib, x, tpe, experts.w1, experts.w3, experts.w2, blocked=blocked)
        want = _segment_reference(experts, x, counts)
        torch.testing.assert_close(got[: sum(counts)], want, atol=2e-5, rtol=1e-5)
        assert not got[sum(counts):].any()


@needs_lib
@pytest.mark.parametrize("avx512", [True, False])
def test_the_layer_takes_the_row_kernel_then_the_blocked_kernel(avx512, monkeypatch):
    """Inference: up to eight rows per expert on average the row kernel (where its AVX-512
    loops are built, else the blocked kernel), above it the blocked one, both equal to each
    expert on its rows."""
    torch.manual_seed(3)
    monkeypatch.setattr(kernels, "few_rows_vectorised", lambda: avx512)
    experts = MoE(MoEConfig(d_model=40, d_ff=56, num_experts=4, top_k=1)).experts.eval()
    calls = []
    real = kernels.swiglu_segments
    monkeypatch.setattr(kernels, "swiglu_segments", lambda *a, **kw: calls.append(kw.get("blocked")) or real(*a, **kw))
    for counts, path in (([2, 0, 1, 5], not avx512), ([8] * 4, not avx512), ([9] * 4, True), ([30, 0, 2, 10], True)):
        x, tpe = torch.randn(sum(counts), 40), torch.tensor(counts)
        with torch.inference_mode():
            torch.testing.assert_close(experts(x, tpe), _segment_reference(experts, x, counts), atol=2e-5, rtol=1e-5)
        assert calls == [path]
        calls.clear()


@needs_lib
@pytest.mark.parametrize("n", [1, 15, 16, 17, 70_001])  # the vector loop, its tail, two threads
def test_silu_mul_and_its_backward_equal_float64_torch(n):
    """The one-pass SwiGLU activation (its own exp polynomial) and gradients, against autograd
    in float64, over ordinary values and the extremes where exp over- or underflows."""
    torch.manual_seed(n)
    g, u, dh = torch.randn(n) * 4, torch.randn(n), torch.randn(n)
    g[: min(n, 6)] = torch.tensor([-100.0, -88.0, -20.0, 0.0, 20.0, 100.0])[: min(n, 6)]
    gg, uu = g.double().requires_grad_(), u.double().requires_grad_()
    want = F.silu(gg) * uu
    want.backward(dh.double())
    got = kernels.silu_mul(lib, g, u)
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-5, rtol=1e-6)
    dg, du = kernels.silu_mul_backward(lib, dh, g, u)
    torch.testing.assert_close(dg.double(), gg.grad, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(du.double(), uu.grad, atol=1e-5, rtol=1e-6)
    kernels.silu_mul(lib, g, u, out=g)  # in place
    torch.testing.assert_close(g, got)


@needs_lib
@pytest.mark.parametrize("n", [1, 17, 513, 70_001])  # a chunk's tail, chunks, two threads
def test_bfloat16_silu_mul_rounds_the_float32_result_once(n):
    """bfloat16 buffers: each value computed in float32 from the widened inputs and rounded
    once (within half a bfloat16 step, where torch's two rounded passes may miss by more);
    NaN stays NaN, infinities stay infinite."""
    torch.manual_seed(n)
    g, u, dh = (torch.randn(n) * 4).bfloat16(), torch.randn(n).bfloat16(), torch.randn(n).bfloat16()
    g[: min(n, 4)] = torch.tensor([-100.0, 0.0, 20.0, 100.0])[: min(n, 4)].bfloat16()
    gg, uu = g.double().requires_grad_(), u.double().requires_grad_()
    want = F.silu(gg) * uu
    want.backward(dh.double())
    half_step = lambda t: t.abs() * 2.0**-8 + 1e-30  # noqa: E731 (half a bf16 step, with the polynomial's ulp)
    got = kernels.silu_mul(lib, g, u)
    assert got.dtype == torch.bfloat16 and ((got.double() - want.detach()).abs() <= half_step(want.detach())).all()
    dg, du = kernels.silu_mul_backward(lib, dh, g, u)
    assert ((dg.double() - gg.grad).abs() <= half_step(gg.grad)).all()
    assert ((du.double() - uu.grad).abs() <= half_step(uu.grad)).all()
    special = torch.tensor([float("nan"), float("inf"), 1.0]).bfloat16()
    out = kernels.silu_mul(lib, special, torch.tensor([1.0, 1.0, float("-inf")]).bfloat16())
    assert out[0].isnan() and out[1] == float("inf") and out[2] == float("-inf")


@needs_lib
@pytest.mark.parametrize("d, f, counts", SEGMENT_CASES + [(20, 50, [17, 0, 9]), (24, 40, [0, 0])])
@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "fused gate/up"])
@pytest.mark.parametrize("blocked", [False, True], ids=["rows", "blocked"])
def test_swiglu_segments_backward_equals_autograd_of_each_expert(d, f, counts, prepared, blocked):
    """The training kernels (forward keeping gate/up, backward in one pass per weight) against
    autograd through each expert: output, input gradient and all three weight gradients,
    idle experts' zeros, an expert with more rows than the kernel's 8-row block, no rows."""
    torch.manual_seed(d * f)
    experts = MoE(MoEConfig(d_model=d, d_ff=f, num_experts=len(counts), top_k=1)).experts
    if prepared:  # w1/w3 as strided halves of one tensor
        experts.fuse_gate_up()
    x, tpe = torch.randn(sum(counts), d, requires_grad=True), torch.tensor(counts)
    dy = torch.randn(sum(counts), d)
    got = _SwiGLUKernel.apply(x, experts.w1, experts.w3, experts.w2, tpe, blocked)
    got.backward(dy)
    params = [x, experts.w1, experts.w3, experts.w2]
    got_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    want = _segment_reference(experts, x, counts)
    want.backward(dy)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for g, p in zip(got_grads, params):
        torch.testing.assert_close(g, p.grad if p.grad is not None else torch.zeros_like(p), atol=5e-5, rtol=1e-5)
    for e, n in enumerate(counts):
        if n == 0:
            assert got_grads[1][e].abs().sum() == 0 and got_grads[3][e].abs().sum() == 0


@needs_lib
@pytest.mark.parametrize("avx512", [True, False])
def test_training_takes_the_row_kernel_up_to_eight_rows_per_expert_then_the_blocked_kernel(avx512, monkeypatch):
    """The layer trains through the row kernel at few rows per expert (where its AVX-512
    loops are built, else the blocked kernel) and through the blocked kernel above, up to
    its threshold where the AVX-512 loops are built (the same
    output and gradients as grouped_mm's autograd), and through neither where the experts
    are frozen (the kernels write every weight's gradient)."""
    torch.manual_seed(0)
    monkeypatch.setattr(kernels, "few_rows_vectorised", lambda: avx512)
    moe = MoE(MoEConfig(d_model=64, d_ff=96, num_experts=8, top_k=2))
    calls = []
    real = _SwiGLUKernel.apply
    monkeypatch.setattr(_SwiGLUKernel, "apply", lambda *a: calls.append(a[-1]) or real(*a))

    def grads(T, use_grouped_mm):
        moe.experts.use_grouped_mm = use_grouped_mm
        x = torch.randn(T, 64, generator=torch.Generator().manual_seed(T), requires_grad=True)
        out = moe(x).output
        out.backward(torch.ones_like(out))
        got = [out.detach(), x.grad] + [p.grad.clone() for p in moe.experts.parameters()]
        moe.zero_grad()
        return got

    # 2, 8, 10, 525 slots per expert; with AVX-512 BLAS takes 525 (blocks_max_rows_avx512)
    for T, blocked in ((1, not avx512), (32, not avx512), (40, True), (2100, None if avx512 else True)):
        fast = grads(T, None)
        assert calls == ([] if blocked is None else [blocked])
        calls.clear()
        for a, b in zip(fast, grads(T, True)):
            torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)
    moe.experts.requires_grad_(False)  # frozen experts: the kernels would write their gradients
    for T in (4, 40):
        x = torch.randn(T, 64, requires_grad=True)
        moe(x).output.sum().backward()
        assert calls == [] and x.grad is not None


@needs_lib
@pytest.mark.parametrize("counts", [[12, 0, 30, 5], [0, 0, 9], [40]])
@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "fused gate/up"])
@pytest.mark.parametrize("frozen", [(), ("x",), ("w2",), ("w1", "w3"), ("x", "w1", "w3")])
def test_swiglu_grouped_equals_autograd_of_each_expert(counts, prepared, frozen):
    """grouped_mm's matmuls with the one-pass activation and a hand-written backward, against
    autograd through each expert: output and every gradient that is asked for (idle experts'
    zeros), none of those that are not."""
    torch.manual_seed(len(counts) * 7 + len(frozen))
    experts = MoE(MoEConfig(d_model=40, d_ff=56, num_experts=len(counts), top_k=1)).experts
    if prepared:  # w1/w3 as strided halves of one tensor
        experts.fuse_gate_up()
    x, dy = torch.randn(sum(counts), 40), torch.randn(sum(counts), 40)
    named = {"x": x, "w1": experts.w1, "w3": experts.w3, "w2": experts.w2}
    for name, t in named.items():
        t.requires_grad_(name not in frozen)
    got = _SwiGLUGrouped.apply(x, experts.w1, experts.w3, experts.w2, torch.tensor(counts))
    got.backward(dy)
    got_grads = {name: t.grad for name, t in named.items()}
    for t in named.values():
        t.grad = None
    want = _segment_reference(experts, x, counts)
    want.backward(dy)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for name, t in named.items():
        if name in frozen:
            assert got_grads[name] is None
        else:
            torch.testing.assert_close(got_grads[name], t.grad if t.grad is not None else torch.zeros_like(t),
                                       atol=5e-5, rtol=1e-5)


@needs_lib
def test_training_takes_the_grouped_activation_kernels_between_the_thresholds(monkeypatch):
    """Where the blocked kernel is off (here by its threshold), above the few-rows kernels and
    below the segment backward, the layer trains through grouped_mm with the one-pass
    activation: the same output and gradients as autograd over grouped_mm, in float32;
    bfloat16 keeps autograd."""
    for name in ("blocks_max_rows", "blocks_max_rows_avx512"):
        monkeypatch.setitem(THRESHOLDS, name, THRESHOLDS[name]._replace(value=0))
    torch.manual_seed(1)
    moe = MoE(MoEConfig(d_model=64, d_ff=96, num_experts=8, top_k=2))
    calls = []
    real = _SwiGLUGrouped.apply
    monkeypatch.setattr(_SwiGLUGrouped, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(100, 64, requires_grad=True)  # 25 slots per expert on average

    def run(use_grouped_mm, dtype=torch.float32):
        moe.experts.use_grouped_mm = use_grouped_mm
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = moe(x).output
        out.backward(torch.ones_like(out))
        got = [out.detach().float(), x.grad] + [p.grad.clone() for p in moe.parameters()]
        moe.zero_grad()
        x.grad = None
        return got

    fast = run(None)
    assert calls == [1]
    for a, b in zip(fast, run(True)):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)
    calls.clear()
    run(None, torch.bfloat16)
    assert calls == []


@needs_lib
@pytest.mark.parametrize("n, k, d", [(1, 1, 1), (5, 2, 7), (64, 3, 130), (300, 2, 128), (40, 8, 33)])
@pytest.mark.parametrize("weighted", [False, True])
def test_gather_rows_sums_the_gathered_rows(n, k, d, weighted):
    torch.manual_seed(n * k + d)
    src = torch.randn(50, d)
    idx = torch.randint(-1, 50, (n * k,))  # -1: no source (a dropped slot)
    idx[:k] = -1  # row 0 has none: it must come out zero
    w = torch.rand(n * k) if weighted else None
    want = torch.zeros(n, d)
    for i in range(n):
        for j in range(k):
            s = int(idx[i * k + j])
            if s >= 0:
                want[i] += (1.0 if w is None else float(w[i * k + j])) * src[s]
    got = kernels.gather_rows(lib, src, idx, k, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not got[0].any()


def bf16_step(t: torch.Tensor) -> torch.Tensor:
    """Half a bfloat16 step at each value of ``t``: one rounding's worst error."""
    return t.abs() * 2.0**-8 + 1e-30


@needs_lib
@pytest.mark.parametrize("src_dtype, dst_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("n, k, d", [(5, 2, 7), (300, 2, 128), (40, 3, 600)])  # 600: past one 256-column block
def test_gather_rows_in_bfloat16_sums_in_float32_and_rounds_once(src_dtype, dst_dtype, n, k, d):
    torch.manual_seed(n + d)
    src = torch.randn(50, d).to(src_dtype)
    idx = torch.randint(-1, 50, (n * k,))
    idx[:k] = -1
    w = torch.rand(n * k)
    want = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        for j in range(k):
            s = int(idx[i * k + j])
            if s >= 0:
                want[i] += float(w[i * k + j]) * src[s].double()
    got = kernels.gather_rows(lib, src, idx, k, w, dtype=dst_dtype)
    assert got.dtype == dst_dtype and not got[0].any()
    err = (got.double() - want).abs()
    if dst_dtype == torch.bfloat16:  # float32 sums rounded once: within half a step of the exact sum
        assert (err <= bf16_step(want) + 1e-6).all()
    else:
        assert err.max() < 1e-5
    assert torch.equal(kernels.gather_rows(lib, src, idx, 1, dtype=dst_dtype)[: n * k],
                       torch.where(idx[:, None] >= 0, src[idx.clamp(min=0)], 0).to(dst_dtype))


@needs_lib
@pytest.mark.parametrize("dout_dtype, y_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32)])
def test_combine_backward_in_bfloat16_and_padding_rows(dout_dtype, y_dtype):
    torch.manual_seed(3)
    n, d, T = 300, 300, 120
    tok = torch.randint(0, T, (n,))
    tok[::7] = -1  # padding rows between segments: no token, dy and dw zero
    y, w = torch.randn(n, d).to(y_dtype), torch.rand(n)
    dout = torch.randn(T, d).to(dout_dtype)
    g = torch.where(tok[:, None] >= 0, dout.double()[tok.clamp(min=0)], 0)
    want_dy, want_dw = w.double()[:, None] * g, (g * y.double()).sum(1)
    dy, dw = kernels.combine_backward(lib, dout, y, tok, w, True, True)
    assert dy.dtype == y_dtype and dw.dtype == torch.float32
    assert not dy[::7].any() and not dw[::7].any()
    tol = bf16_step(want_dy) + 1e-6 if y_dtype == torch.bfloat16 else 1e-5
    assert ((dy.double() - want_dy).abs() <= tol).all()
    torch.testing.assert_close(dw.double(), want_dw, atol=1e-3, rtol=1e-4)


@needs_lib
@pytest.mark.parametrize("multiple", [1, 4, 64])
@pytest.mark.parametrize("mask_some", [False, True])
def test_sort_slots_is_a_stable_sort_by_expert_with_padded_segments(multiple, mask_some):
    torch.manual_seed(multiple)
    T, k, E = 97, 3, 7
    expert = torch.randint(0, E, (T * k,))
    if mask_some:
        expert[torch.rand(T * k) < 0.2] = E  # slots that do not exist
    s = kernels.sort_slots(lib, expert, E, k, multiple)
    real = expert < E
    order = torch.argsort(expert, stable=True)[: int(real.sum())]
    assert torch.equal(s.slot_idx, order) and torch.equal(s.token_idx, order // k)
    assert torch.equal(s.counts, torch.bincount(expert[real], minlength=E))
    assert torch.equal(s.padded_counts, (s.counts + multiple - 1) // multiple * multiple)
    starts = torch.cumsum(s.padded_counts, 0) - s.padded_counts  # each segment's first padded row
    assert (starts % multiple == 0).all() and s.row_token.numel() == int(s.padded_counts.sum())
    within = torch.arange(order.numel()) - (torch.cumsum(s.counts, 0) - s.counts)[expert[order]]
    assert torch.equal(s.rows, starts[expert[order]] + within)
    assert torch.equal(s.pos[order], s.rows) and (s.pos[~real] == -1).all()
    assert torch.equal(s.row_slot[s.rows], order) and torch.equal(s.row_token[s.rows], order // k)
    padding = torch.ones(s.row_token.numel(), dtype=torch.bool)
    padding[s.rows] = False
    assert (s.row_token[padding] == -1).all() and (s.row_slot[padding] == -1).all()


@needs_lib
def test_sort_slots_refuses_what_it_cannot_sort():
    with pytest.raises(ValueError, match=r"expert must hold values in \[0, 5\)"):
        kernels.sort_slots(lib, torch.tensor([0, 5, 1, 2]), 4, 2)
    with pytest.raises(ValueError, match="multiple of k=3"):
        kernels.sort_slots(lib, torch.tensor([0, 1, 1, 2]), 4, 3)
    with pytest.raises(ValueError, match="multiple must be an int"):
        kernels.sort_slots(lib, torch.tensor([0, 1]), 4, 2, 0)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        kernels.gather_rows(lib, torch.randn(3, 2), torch.tensor([0, 1]), 1, dtype=torch.float16)


@needs_lib
@pytest.mark.parametrize("n, d", [(1, 1), (9, 7), (500, 128), (64, 257)])
def test_combine_backward_gives_the_gradients_of_the_weighted_scatter(n, d):
    torch.manual_seed(n + d)
    T = max(n // 2, 1)
    tok = torch.randint(0, T, (n,))
    y, w = torch.randn(n, d, requires_grad=True), torch.rand(n, requires_grad=True)
    dout = torch.randn(T, d)
    torch.zeros(T, d).index_add(0, tok, y * w[:, None]).backward(dout)
    dy, dw = kernels.combine_backward(lib, dout, y.detach(), tok, w.detach(), True, True)
    torch.testing.assert_close(dy, y.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, w.grad, atol=1e-5, rtol=1e-5)
    assert kernels.combine_backward(lib, dout, y.detach(), tok, w.detach(), False, False) == (None, None)


@needs_lib
@pytest.mark.parametrize("fields", [
    dict(),  # dropless top-2
    dict(top_k=3, capacity_factor=0.6),  # capacity drops slots: their rows are zero
    dict(router="expert_choice", capacity_factor=1.0),  # a token may get no expert at all
    dict(router="sigmoid_bias", top_k=2, num_shared_experts=1),
])
def test_dispatch_moves_rows_in_the_kernels_as_torch_ops_do(fields, monkeypatch):
    """The training path: output and every gradient equal with the row kernels and without."""
    torch.manual_seed(1)
    moe = MoE(MoEConfig(d_model=24, d_ff=40, num_experts=6, **{"top_k": 2, **fields}))
    x, g = torch.randn(2, 150, 24), torch.randn(2, 150, 24)
    calls = []
    for name in ("sort_slots", "gather_rows", "combine_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))

    def run(use_kernels):
        xi = x.clone().requires_grad_(True)
        with kernels.enabled(use_kernels):
            out = moe(xi)
            (out.output * g).sum().add(out.aux_loss).backward()
        grads = [xi.grad] + [p.grad.clone() for p in moe.parameters()]
        moe.zero_grad(set_to_none=True)
        return out.output.detach(), grads

    want, want_grads = run(False)
    assert not calls
    got, got_grads = run(True)
    # the plan; the gather, the combine, the gather's backward and the router weights' gradient
    # taken from the sorted rows to the slots; the combine's backward
    assert sorted(calls) == ["combine_backward"] + ["gather_rows"] * 4 + ["sort_slots"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_lib
def test_a_damaged_cached_build_is_rebuilt(tmp_path):
    code = "from moekit import kernels; print(kernels.load() is not None)"
    env = dict(os.environ, MOEKIT_CACHE_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    (built,) = (tmp_path / "kernels").glob("moekit-cpu-*.so")
    built.write_bytes(b"not a shared library")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True" and built.read_bytes()[:4] == b"\x7fELF"


PORTABLE_CHECK = """
import torch, torch.nn.functional as F
from moekit import MoE, MoEConfig, kernels
from moekit.layers.norm import RMSNorm
lib = kernels.load()
assert lib is not None, kernels.status()
torch.manual_seed(0)
w, x = torch.randn(37, 50), torch.randn(50)
torch.testing.assert_close(kernels.rows(lib, w, x, torch.empty(37)), w @ x, atol=1e-5, rtol=1e-5)
w1, w3, w2, out = torch.randn(50, 70) / 7, torch.randn(50, 70) / 7, torch.randn(70, 50) / 8, torch.zeros(50)
kernels.swiglu_add(lib, x, w1, w3, w2, out, 0.5)
torch.testing.assert_close(out, 0.5 * (F.silu(x @ w1) * (x @ w3)) @ w2, atol=2e-5, rtol=1e-5)
moe, norm = MoE(MoEConfig(d_model=50, d_ff=70, num_experts=4, top_k=2)).eval(), RMSNorm(50)
with torch.inference_mode():
    moe.router.gate.weight.normal_(0, 1.0)
    got = x.clone()
    kernels.MoETokenStep(lib, norm.weight, norm.eps, moe.router.gate.weight, None, 2, True, 1.0, *moe.experts.weights())(got)
    with kernels.enabled(False):  # the reference: the layer in torch ops
        torch.testing.assert_close(got, x + moe(norm(x)[None]).output[0], atol=2e-5, rtol=1e-5)
ex, xs, tpe = moe.experts, torch.randn(4, 50), torch.tensor([3, 0, 1, 0])
with torch.inference_mode():
    torch.testing.assert_close(kernels.swiglu_segments(lib, xs, tpe, ex.w1, ex.w3, ex.w2),
                               torch.cat([ex.expert_forward(0, xs[:3]), ex.expert_forward(2, xs[3:])]), atol=2e-5, rtol=1e-5)
from moekit.ops.swiglu import _SwiGLUKernel
xs.requires_grad_(True)
dy = torch.randn(4, 50)
for blocked in (False, True):
    got = _SwiGLUKernel.apply(xs, ex.w1, ex.w3, ex.w2, tpe, blocked)
    got.backward(dy)
    grads = [p.grad.clone() for p in (xs, ex.w1, ex.w3, ex.w2)]
    xs.grad = None
    ex.zero_grad()
    want = torch.cat([ex.expert_forward(0, xs[:3]), ex.expert_forward(2, xs[3:])])
    want.backward(dy)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for g, p in zip(grads, (xs, ex.w1, ex.w3, ex.w2)):
        torch.testing.assert_close(g, p.grad, atol=5e-5, rtol=1e-5)
    xs.grad = None
    ex.zero_grad()
g, u = torch.randn(37) * 3, torch.randn(37)
torch.testing.assert_close(kernels.silu_mul(lib, g, u), F.silu(g) * u, atol=1e-5, rtol=1e-6)
dg, du = kernels.silu_mul_backward(lib, u, g, u)
torch.testing.assert_close(du, u * F.silu(g), atol=1e-5, rtol=1e-6)
src, idx = torch.randn(9, 20), torch.tensor([3, -1, 0, 8])
torch.testing.assert_close(kernels.gather_rows(lib, src, idx, 2), torch.stack([src[3], src[0] + src[8]]))
print("ok")
"""


@needs_lib
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="-mno-avx512f is an x86 flag")
@pytest.mark.parametrize("flags", ["-mno-avx512f -mno-avx", "-mno-avx512f"], ids=["sse", "avx2"])
def test_the_build_without_avx_gives_the_same_numbers(tmp_path, flags):
    """The portable loops (the #else branches of cpu_gemv.c, cpu_blocks.c's micro-kernel on
    4-lane vectors; cpu_rows.c has no others), built with AVX and AVX-512 turned off; and the
    AVX2 build (8-lane micro-kernel of 6 rows, the AVX2 SiLU) where the CPU has AVX2."""
    if flags == "-mno-avx512f" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    done = run_with_flags(tmp_path, flags, PORTABLE_CHECK)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@needs_lib
@pytest.mark.parametrize("E", [8, 20, 3])
def test_the_topk_router_softmax_equals_float64_and_keeps_nan_rows_nan(E):
    """The router's softmax (vectorised exp, 16 experts a call, and a partial vector): within
    float32 rounding of float64's; a row with a NaN logit gets NaN probabilities (the exp's
    clamps would have made them numbers), the other rows are untouched by it."""
    torch.manual_seed(E)
    logits = torch.randn(64, E) * 8
    logits[3, E // 2] = float("nan")
    probs, _, _ = kernels.topk_softmax(lib, logits, 2, True, 1.0)
    assert probs[3].isnan().all()
    rest = torch.cat([probs[:3], probs[4:]]).double()
    want = torch.softmax(torch.cat([logits[:3], logits[4:]]).double(), -1)
    assert (rest - want).abs().max() < 1e-6 and not rest.isnan().any()


@needs_lib
@pytest.mark.parametrize("E, k", [(8, 2), (64, 8), (5, 5), (3, 1)])
def test_the_topk_router_kernel_picks_the_largest_ties_to_the_lower_index(E, k):
    """The one-pass top-k: the k largest probabilities, largest first, equal ones in index
    order, as a stable sort of the negated values gives them; on logits with many ties."""
    torch.manual_seed(E * k)
    logits = torch.randint(0, 4, (300, E)).float()  # four distinct values: ties everywhere
    logits[0] = 0.0  # a row of one value
    probs, weights, indices = kernels.topk_softmax(lib, logits, k, True, 1.0)
    torch.testing.assert_close(probs, torch.softmax(logits, -1), atol=1e-6, rtol=1e-5)
    want = torch.sort(-probs, dim=-1, stable=True).indices[:, :k]
    assert torch.equal(indices, want)
    chosen = probs.gather(1, want)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


@needs_lib
@pytest.mark.parametrize("fields", [dict(), dict(renormalize=False, routed_scaling_factor=2.5), dict(top_k=1),
                                    dict(num_experts=64, top_k=8, z_loss_coef=0.01, seq_aux_loss_coef=0.01),
                                    dict(router="switch", top_k=1, routed_scaling_factor=1.5)])
def test_the_topk_router_kernel_equals_torch_ops(fields, monkeypatch):
    """Probabilities, choice, weights, and the gradients that reach the gate through the
    combine weights and the balancing losses."""
    torch.manual_seed(5)
    moe = MoE(MoEConfig(**{"d_model": 20, "d_ff": 12, "num_experts": 6, "top_k": 2, **fields}))
    x, g = torch.randn(3, 40, 20), torch.randn(3, 40, 20)
    calls = []
    real = kernels.topk_softmax
    monkeypatch.setattr(kernels, "topk_softmax", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def run():
        out = moe(x)
        (out.output * g).sum().add(out.aux_loss).backward()
        grad = moe.router.gate.weight.grad.clone()
        moe.zero_grad(set_to_none=True)
        return out.routing, out.aux_loss.detach(), grad

    got, got_aux, got_grad = run()
    assert calls == [1]
    with kernels.enabled(False):  # the routers' torch ops
        want, want_aux, want_grad = run()
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.probs, want.probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.weights, want.weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_aux, want_aux, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)
