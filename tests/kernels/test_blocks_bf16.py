"""The bfloat16 blocked experts kernel (``cpu_blocks_bf16.c``): forward and backward against a
float64 reference on the same bfloat16 values, its rounding points, and the layer's bfloat16
training through it against the torch path (oneDNN's bfloat16 products)."""

import os

import pytest
import torch
import torch.nn.functional as F

import moekit.layers.experts as experts_mod
from moekit import MoE, MoEConfig, kernels
from moekit.ops.swiglu import _SwiGLUKernel, swiglu_segments
from tests.kernels.rebuild import run_with_flags

lib = kernels.load()
pytestmark = pytest.mark.skipif(lib is None or not kernels.blocks_bf16(),
                                reason=f"no AVX-512 BF16 build here: {kernels.status()}")
BF16 = torch.bfloat16


def bf16_step(t: torch.Tensor) -> torch.Tensor:
    """One bfloat16 step (unit in the last place) at each value of ``t``: 2^(exponent - 7)."""
    return torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(1e-30))) - 7)


def experts(E, d, f, d_out, fused, seed):
    g = torch.Generator().manual_seed(seed)
    if fused:  # w1 and w3 the halves of one [E, d, 2f] tensor: row stride 2f
        w13 = (torch.randn(E, d, 2 * f, generator=g) / d**0.5).to(BF16)
        w1, w3 = w13[..., :f], w13[..., f:]
    else:
        w1, w3 = ((torch.randn(E, d, f, generator=g) / d**0.5).to(BF16) for _ in range(2))
    return w1, w3, (torch.randn(E, f, d_out, generator=g) / f**0.5).to(BF16)


def reference(x, counts, w1, w3, w2):
    """float64 experts on the bfloat16 values, with autograd: (out, gate, up) of the covered rows."""
    outs, gates, ups, a = [], [], [], 0
    for e, n in enumerate(counts.tolist()):
        g, u = x[a:a + n] @ w1[e], x[a:a + n] @ w3[e]
        outs.append((F.silu(g) * u) @ w2[e])
        gates.append(g)
        ups.append(u)
        a += n
    return torch.cat(outs), torch.cat(gates), torch.cat(ups)


# (E, d_model, d_ff, d_out, counts): the `small` preset's shape with uneven experts; widths
# that leave partial strips of 32 columns, an idle expert and one-row experts; d_model over
# one panel of k (512) and an expert over one panel of a weight gradient's rows (512, odd);
# weight gradients of 1.6 MB (float32 sums) with an expert of several chunks, each of several
# groups of rows (the backward's own sums); and of 3.1 MB, partial blocks of every side (its
# shared weight pass)
SHAPES = [(8, 128, 256, 128, [893, 814, 415, 272, 95, 532, 640, 131]),
          (4, 46, 70, 38, [0, 13, 1, 30]),
          (3, 600, 90, 34, [5, 701, 0]),
          (2, 300, 512, 200, [2101, 3]),
          (3, 256, 1000, 250, [37, 0, 301])]


@pytest.mark.parametrize("E, d, f, d_out, counts", SHAPES)
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_forward_and_backward_equal_float64_on_the_same_bfloat16_values(E, d, f, d_out, counts, fused):
    counts = torch.tensor(counts)
    n = int(counts.sum())
    N = n + 3  # rows past the counts' sum: zero output and zero dx
    g = torch.Generator().manual_seed(E * d)
    x, dy = torch.randn(N, d, generator=g).to(BF16), torch.randn(N, d_out, generator=g).to(BF16)
    w1, w3, w2 = experts(E, d, f, d_out, fused, seed=d)
    gate, up = torch.empty(N, f, dtype=BF16), torch.empty(N, f, dtype=BF16)
    out = kernels.swiglu_segments(lib, x, counts, w1, w3, w2, save=(gate, up), blocked=True)
    dx, dw1, dw3, dw2 = kernels.swiglu_segments_backward(lib, x, counts, w1, w3, w2, gate, up, dy, blocked=True)
    assert all(t.dtype == BF16 for t in (out, dx, dw1, dw3, dw2))

    leaves = [t.double().requires_grad_(True) for t in (x, w1, w3, w2)]
    want, want_gate, want_up = reference(leaves[0][:n], counts, *leaves[1:])
    want.backward(dy[:n].double())
    # the saved pre-activations: float32 sums of exact bfloat16 products, rounded once
    for got_t, want_t in ((gate, want_gate), (up, want_up)):
        assert ((got_t[:n].double() - want_t.detach()).abs() <= bf16_step(want_t.detach()) + 1e-6).all()

    def rel(got_t, want_t):
        return float((got_t.double() - want_t).abs().max() / want_t.abs().max())

    assert rel(out[:n], want.detach()) < 1e-2
    assert not out[n:].any() and not dx[n:].any()
    assert rel(dx[:n], leaves[0].grad[:n]) < 1.5e-2
    for got_w, leaf in zip((dw1, dw3, dw2), leaves[1:]):
        assert rel(got_w, leaf.grad) < 1.5e-2
    idle = counts == 0
    assert not dw1[idle].any() and not dw2[idle].any()


def test_as_accurate_as_the_torch_bfloat16_products():
    """The kernel's errors against float64 are no larger than those of torch's bfloat16
    products (the segment op the layer takes without it), output and every gradient."""
    E, d, f = 8, 128, 256
    counts = torch.tensor([300, 41, 0, 250, 7, 190, 333, 100])
    g = torch.Generator().manual_seed(5)
    x, dy = (torch.randn(int(counts.sum()), d, generator=g).to(BF16) for _ in range(2))
    w = experts(E, d, f, d, False, seed=5)

    def errors(run):
        leaves = [t.clone().requires_grad_(True) for t in (x, *w)]
        run(*leaves).backward(dy)
        ref = [t.double().requires_grad_(True) for t in (x, *w)]
        want = reference(ref[0], counts, *ref[1:])[0]
        want.backward(dy.double())
        got = [run(*leaves).detach()] + [t.grad for t in leaves]
        return [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, [want.detach()] + [t.grad for t in ref])]

    got = errors(lambda *t: _SwiGLUKernel.apply(*t, counts, True))
    torch_path = errors(lambda *t: swiglu_segments(*t, counts))
    for mine, theirs in zip(got, torch_path):
        assert mine <= 1.25 * theirs + 1e-4, (got, torch_path)


def test_odd_widths_and_mixed_dtypes_are_refused():
    counts = torch.tensor([2, 3])
    x = torch.randn(5, 6).to(BF16)
    w1, w3, w2 = experts(2, 6, 7, 6, False, seed=0)  # d_ff 7: odd
    with pytest.raises(ValueError, match="even widths.*d_ff 7"):
        kernels.swiglu_segments(lib, x, counts, w1, w3, w2, blocked=True)
    w1, w3, w2 = experts(2, 6, 8, 6, False, seed=0)
    with pytest.raises(ValueError, match="w3 must be torch.float32"):  # float32 weights: all three
        kernels.swiglu_segments(lib, x, counts, w1.float(), w3, w2, blocked=True)
    with pytest.raises(ValueError, match="w1 must be torch.bfloat16 or torch.float32"):
        kernels.swiglu_segments(lib, x, counts, w1.double(), w3, w2, blocked=True)
    with pytest.raises(ValueError, match="x must be torch.float32, got torch.bfloat16"):
        kernels.swiglu_segments(lib, x, counts, w1, w3, w2, blocked=False)  # the row kernel is float32 only
    empty = [w1[..., :0], w3[..., :0], w2[:, :0]]  # d_ff 0 (even, strides even): refused by the kernel itself
    none = torch.empty(5, 0, dtype=BF16)
    with pytest.raises(ValueError, match="refused its arguments"):
        kernels.swiglu_segments(lib, x, counts, *empty, save=(none, none), blocked=True)
    with pytest.raises(ValueError, match="refused its arguments"):
        kernels.swiglu_segments_backward(lib, x, counts, *empty, none, none, x, blocked=True)


def _layer_step(layer, x, use_kernels):
    xi = x.clone().requires_grad_(True)
    with kernels.enabled(use_kernels), torch.autocast("cpu", dtype=BF16):
        out = layer(xi, return_expert_outputs=True)
    (out.output.float().square().sum() + out.aux_loss).backward()
    grads = [xi.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad()
    return out, grads


@pytest.mark.parametrize("capacity_factor", [None, 0.8])
def test_bfloat16_training_takes_the_kernel_unpadded_and_matches_the_torch_path(capacity_factor, monkeypatch):
    """Under CPU bfloat16 autocast the experts take the blocked kernel on their own row counts
    (no padding: the gather writes no padded layout, the experts pad nothing); outputs, each
    slot's expert output and every gradient match the torch path (kernels off) within
    bfloat16 rounding."""
    torch.manual_seed(3)
    layer = MoE(MoEConfig(d_model=64, d_ff=96, num_experts=4, top_k=2, capacity_factor=capacity_factor))
    x = torch.randn(2, 150, 64)
    paths, padded = [], []
    real_run, real_pad = experts_mod.SwiGLUExperts.run_path, experts_mod.padded_segments
    monkeypatch.setattr(experts_mod.SwiGLUExperts, "run_path",
                        lambda self, path, xs, tpe, w: paths.append((path, tpe.tolist())) or real_run(self, path, xs, tpe, w))
    monkeypatch.setattr(experts_mod, "padded_segments", lambda *a: padded.append(1) or real_pad(*a))
    got, got_grads = _layer_step(layer, x, True)
    assert [p for p, _ in paths] == ["blocks"] and not padded
    assert any(n % 64 for n in paths[0][1])  # the experts' own counts
    want, want_grads = _layer_step(layer, x, False)
    assert got.output.dtype == want.output.dtype == BF16
    assert (got.output.float() - want.output.float()).norm() / want.output.float().norm() < 1e-2
    kept = want.expert_outputs.float().abs().sum(-1) > 0
    assert torch.equal(kept, got.expert_outputs.float().abs().sum(-1) > 0)
    assert (got.expert_outputs.float() - want.expert_outputs.float()).norm() / want.expert_outputs.float().norm() < 1e-2
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype and (a - b).norm() / b.norm() < 3e-2


def test_bfloat16_inference_takes_the_kernel():
    torch.manual_seed(4)
    layer = MoE(MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=2)).to(BF16)
    x = torch.randn(3, 40, 32).to(BF16)
    assert layer.experts.choose_path(x.reshape(-1, 32), layer.experts.weights()) == "blocks"
    with torch.no_grad():
        got = layer(x).output
        with kernels.enabled(False):
            want = layer(x).output
    assert (got.float() - want.float()).norm() / want.float().norm() < 1e-2


BUILD_WITHOUT = """
import torch
from moekit import MoE, MoEConfig, kernels
assert kernels.load() is not None and not kernels.blocks_bf16(), kernels.status()
assert "bfloat16 experts: oneDNN" in kernels.status()
layer = MoE(MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=2))
assert layer.experts.row_multiple(torch.bfloat16, torch.device("cpu")) == 64
x = torch.randn(60, 32)
with torch.autocast("cpu", dtype=torch.bfloat16):
    y = layer(x).output
y.float().sum().backward()
assert torch.isfinite(layer.experts.w1.grad).all() and layer.experts.w1.grad.abs().sum() > 0
print("ok")
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="-mno-avx512bf16 is an x86 flag")
def test_a_build_without_avx512_bf16_trains_on_the_padded_onednn_path(tmp_path):
    done = run_with_flags(tmp_path, "-mno-avx512bf16", BUILD_WITHOUT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_float32_weights_are_rounded_as_a_cast_and_get_float32_gradients():
    """float32 weights (a model's, under autocast) give what their bfloat16 casts give, bit for
    bit, and float32 weight gradients: the same float32 sums, not rounded to bfloat16."""
    E, d, f = 3, 64, 96
    counts = torch.tensor([40, 0, 57])
    g = torch.Generator().manual_seed(9)
    x, dy = (torch.randn(97, d, generator=g).to(BF16) for _ in range(2))
    w32 = [torch.randn(E, d, f, generator=g) / 8, torch.randn(E, d, f, generator=g) / 8, torch.randn(E, f, d, generator=g) / 9]
    w16 = [w.to(BF16) for w in w32]
    saves = [[torch.empty(97, f, dtype=BF16) for _ in range(2)] for _ in range(2)]
    outs = [kernels.swiglu_segments(lib, x, counts, *w, save=s, blocked=True) for w, s in zip((w32, w16), saves)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(saves[0][0], saves[1][0])
    g32, g16 = (kernels.swiglu_segments_backward(lib, x, counts, *w, *s, dy, blocked=True) for w, s in zip((w32, w16), saves))
    assert torch.equal(g32[0], g16[0])  # dx
    for a, b in zip(g32[1:], g16[1:]):
        assert a.dtype == torch.float32 and b.dtype == BF16
        assert torch.equal(a.to(BF16), b)  # the same sums, rounded once by the bfloat16 path
        assert not torch.equal(a, b.float())


@pytest.mark.parametrize("threads", [1, 3])
def test_other_thread_counts_cut_other_chunks_and_still_match_float64(threads):
    """The chunks of an expert's rows follow the thread count: one thread and three (more than
    the cores) give the float64 reference's gradients too, at the own-sums and shared shapes."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for E, d, f, counts in ((3, 128, 256, [1100, 0, 357]), (2, 256, 1000, [301, 130])):
            counts = torch.tensor(counts)
            n = int(counts.sum())
            g = torch.Generator().manual_seed(threads)
            x, dy = torch.randn(n, d, generator=g).to(BF16), torch.randn(n, d, generator=g).to(BF16)
            w = [t.float() for t in experts(E, d, f, d, False, seed=threads)]
            gate, up = torch.empty(n, f, dtype=BF16), torch.empty(n, f, dtype=BF16)
            kernels.swiglu_segments(lib, x, counts, *w, save=(gate, up), blocked=True)
            got = kernels.swiglu_segments_backward(lib, x, counts, *w, gate, up, dy, blocked=True)
            leaves = [t.to(BF16).double().requires_grad_(True) for t in (x, *w)]
            reference(leaves[0], counts, *leaves[1:])[0].backward(dy.double())
            for a, leaf in zip(got, leaves):
                assert float((a.double() - leaf.grad).abs().max() / leaf.grad.abs().max()) < 1.5e-2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("d, f", [(64, 96), (256, 1000)], ids=["own sums", "shared pass"])
def test_no_rows_at_all_give_zero_gradients(d, f):
    """Every expert idle (a batch whose slots were all dropped): zero outputs and gradients."""
    counts = torch.zeros(3, dtype=torch.long)
    x, dy = torch.randn(2, d).to(BF16), torch.randn(2, d).to(BF16)
    w = [t.float() for t in experts(3, d, f, d, False, seed=3)]
    gate, up = torch.empty(2, f, dtype=BF16), torch.empty(2, f, dtype=BF16)
    out = kernels.swiglu_segments(lib, x, counts, *w, save=(gate, up), blocked=True)
    assert not out.any()
    for g in kernels.swiglu_segments_backward(lib, x, counts, *w, gate, up, dy, blocked=True):
        assert not g.any()


@pytest.mark.parametrize("d, f", [(128, 256), (256, 1000)], ids=["own sums", "shared pass"])
def test_weight_gradients_do_not_depend_on_which_thread_ran_what(d, f):
    """Repeated calls give the same weight gradients bit for bit: an expert's rows are cut into
    fixed chunks whose sums are added in order, whichever thread ran each."""
    counts = torch.tensor([1500, 3, 700, 0])
    g = torch.Generator().manual_seed(13)
    x, dy = torch.randn(2203, d, generator=g).to(BF16), torch.randn(2203, d, generator=g).to(BF16)
    w = [t.float() for t in experts(4, d, f, d, False, seed=13)]  # float32 gradients: every last bit kept
    gate, up = torch.empty(2203, f, dtype=BF16), torch.empty(2203, f, dtype=BF16)
    kernels.swiglu_segments(lib, x, counts, *w, save=(gate, up), blocked=True)
    want = kernels.swiglu_segments_backward(lib, x, counts, *w, gate, up, dy, blocked=True)
    for _ in range(6):
        got = kernels.swiglu_segments_backward(lib, x, counts, *w, gate, up, dy, blocked=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_concurrent_calls_get_their_own_buffers():
    """Calls from several Python threads at once (one holds the kept workspace, the others
    allocate their own) give what one call at a time gives."""
    import threading

    E, d, f = 4, 64, 128
    counts = torch.tensor([300, 200, 0, 100])
    g = torch.Generator().manual_seed(11)
    x, dy = (torch.randn(600, d, generator=g).to(BF16) for _ in range(2))
    w = experts(E, d, f, d, False, seed=11)

    def run():
        gate, up = torch.empty(600, f, dtype=BF16), torch.empty(600, f, dtype=BF16)
        out = kernels.swiglu_segments(lib, x, counts, *w, save=(gate, up), blocked=True)
        return [out, *kernels.swiglu_segments_backward(lib, x, counts, *w, gate, up, dy, blocked=True)]

    want = run()
    got = [None] * 4

    def worker(i):
        for _ in range(5):
            got[i] = run()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in got:
        assert all(torch.equal(a, b) for a, b in zip(result, want))


def test_frozen_expert_weights_under_autocast_take_the_cast_path(monkeypatch):
    """The kernel writes all three weight gradients: with one expert weight frozen the experts
    take another path, with the weights cast as autocast would (not the float32 weights the
    kernel takes), and train as the torch path does."""
    torch.manual_seed(6)
    layer = MoE(MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=2))
    layer.experts.w2.requires_grad_(False)
    paths = []
    real = experts_mod.SwiGLUExperts.run_path
    monkeypatch.setattr(experts_mod.SwiGLUExperts, "run_path",
                        lambda self, path, xs, tpe, w: paths.append((path, [t.dtype for t in w])) or real(self, path, xs, tpe, w))
    x = torch.randn(2, 300, 32)
    got, got_grads = _layer_step(layer, x, True)
    assert paths and paths[0][0] != "blocks" and paths[0][1] == [BF16] * 3
    want, want_grads = _layer_step(layer, x, False)
    assert (got.output.float() - want.output.float()).norm() / want.output.float().norm() < 1e-2
    for a, b in zip(got_grads, want_grads):
        assert (a - b).norm() / b.norm() < 3e-2


def test_wide_bfloat16_inference_leaves_the_kernel_below_its_threshold(monkeypatch):
    """Inference on bfloat16 weights takes the kernel up to blocks_bf16_inference_max_d_ff and
    oneDNN's path above it (padded segments again); training takes it at any width."""
    from moekit.layers import thresholds

    layer = MoE(MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=2))
    rows = torch.randn(20, 32).to(BF16)
    row = thresholds.THRESHOLDS["blocks_bf16_inference_max_d_ff"]
    for limit, want in ((64, "blocks"), (32, "segments")):
        monkeypatch.setitem(thresholds.THRESHOLDS, "blocks_bf16_inference_max_d_ff", row._replace(value=limit))
        bf = layer.to(BF16)
        with torch.no_grad():
            path = bf.experts.choose_path(rows, bf.experts.weights())
            assert (path == "blocks") == (want == "blocks")
            assert bf.experts.row_multiple(BF16, rows.device) == (1 if want == "blocks" else 64)
        assert bf.experts.choose_path(rows.requires_grad_(True), bf.experts.weights()) == "blocks"
        rows = rows.detach()
