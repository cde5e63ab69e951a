"""Every op against the torch-ops reference beside it: outputs and gradients."""

import pytest
import torch

from moekit import kernels, ops
from moekit.layers.dispatch import plan_dispatch

pytestmark = pytest.mark.skipif(kernels.load() is None, reason=f"kernels not built here: {kernels.status()}")


def grads_of(fn, inputs, dy):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(dy)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7], [12, 9, 30, 1]])
@pytest.mark.parametrize("op", ["swiglu_kernel", "swiglu_grouped", "swiglu_segments"])
def test_swiglu_ops_equal_the_reference(op, counts):
    g = torch.Generator().manual_seed(len(counts) + sum(counts))
    E, d, f = len(counts), 16, 24
    x = torch.randn(sum(counts), d, generator=g)
    w1, w3 = torch.randn(E, d, f, generator=g) / 4, torch.randn(E, d, f, generator=g) / 4
    w2 = torch.randn(E, f, d, generator=g) / 5
    tpe, dy = torch.tensor(counts), torch.randn(sum(counts), d, generator=g)
    want, want_grads = grads_of(lambda *t: ops.swiglu_reference(*t, tpe), [x, w1, w3, w2], dy)
    got, got_grads = grads_of(lambda *t: getattr(ops, op)(*t, tpe), [x, w1, w3, w2], dy)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)
    idle = [e for e, n in enumerate(counts) if n == 0]
    assert all(got_grads[1][e].abs().sum() == 0 for e in idle)


@pytest.mark.parametrize("capacity", [None, 3])
def test_gather_and_combine_equal_their_references(capacity):
    g = torch.Generator().manual_seed(7)
    T, k, E, d = 10, 2, 4, 6
    x = torch.randn(T, d, generator=g)
    logits = torch.randn(T, E, generator=g)
    weights, indices = torch.softmax(logits, -1).topk(k, dim=-1)
    plan = plan_dispatch(indices, weights, E, capacity)
    pos = torch.full((T * k,), -1, dtype=torch.long)
    pos[plan.slot_idx] = torch.arange(plan.slot_idx.numel())
    n = plan.token_idx.numel()
    dxs = torch.randn(n, d, generator=g)
    want, (want_dx,) = grads_of(lambda t: ops.gather_rows_reference(t, plan.token_idx), [x], dxs)
    got, (got_dx,) = grads_of(lambda t: ops.gather_rows(t, plan.token_idx, pos, k), [x], dxs)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_dx, want_dx, atol=1e-6, rtol=1e-6)
    y, dout = torch.randn(n, d, generator=g), torch.randn(T, d, generator=g)
    want, want_g = grads_of(lambda a, b: ops.combine_reference(a, b, plan.token_idx, plan.slot_idx, T), [y, weights],
                            dout)
    got, got_g = grads_of(lambda a, b: ops.combine(a, b, plan.token_idx, plan.slot_idx, pos), [y, weights], dout)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("capacity", [None, 5])
def test_bfloat16_rows_in_a_padded_layout_equal_the_reference(capacity):
    """The bfloat16 training dispatch: float32 tokens gathered into bfloat16 rows with padding
    between the experts' segments, and combined back, against the float64 reference on the
    same rows; outputs and gradients within bfloat16 rounding."""
    g = torch.Generator().manual_seed(11)
    T, k, E, d = 40, 2, 5, 24
    x = torch.randn(T, d, generator=g)
    weights, indices = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k, dim=-1)
    plan = plan_dispatch(indices, weights, E, capacity)
    expert = torch.full((T * k,), E)
    expert[plan.slot_idx] = indices.reshape(-1)[plan.slot_idx]
    s = kernels.sort_slots(kernels.load(), expert, E, k, 8)
    assert torch.equal(s.slot_idx, plan.slot_idx) and torch.equal(s.counts, plan.tokens_per_expert)
    P = s.row_token.numel()
    dxs = torch.randn(P, d, generator=g)
    got, (got_dx,) = grads_of(lambda t: ops.gather_rows(t, s.row_token, s.pos, k, dtype=torch.bfloat16), [x],
                              dxs.bfloat16())
    want, (want_dx,) = grads_of(lambda t: ops.gather_rows_reference(t, plan.token_idx), [x.double()],
                                dxs[s.rows].double())
    assert got.dtype == torch.bfloat16 and got_dx.dtype == torch.float32
    assert torch.equal(got[s.rows], want.bfloat16()) and not got[s.row_token < 0].any()
    assert ((got_dx.double() - want_dx).abs() <= 2 * 2.0**-8 * want_dx.abs() + 1e-2).all()  # bf16 gradient rows
    y, dout = torch.randn(P, d, generator=g).bfloat16(), torch.randn(T, d, generator=g)
    got, got_g = grads_of(lambda a, b: ops.combine(a, b, s.row_token, s.row_slot, s.pos), [y, weights], dout.bfloat16())
    want, want_g = grads_of(lambda a, b: ops.combine_reference(a, b, plan.token_idx, plan.slot_idx, T),
                            [y[s.rows].double(), weights.double()], dout.double())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2**-7)
    assert not got_g[0][s.row_token < 0].any()  # padding rows get no gradient
    torch.testing.assert_close(got_g[0][s.rows].double(), want_g[0], atol=2e-2, rtol=2**-7)
    torch.testing.assert_close(got_g[1].double(), want_g[1], atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("k, renormalize, scale", [(2, True, 1.0), (3, False, 2.5), (1, False, 1.0)])
def test_topk_softmax_equals_the_reference(k, renormalize, scale):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(20, 6, generator=g) * 2
    dp, dw = torch.randn(20, 6, generator=g), torch.randn(20, k, generator=g)

    def run(fn):
        x = logits.clone().requires_grad_(True)
        probs, weights, indices = fn(x, k, renormalize, scale)
        ((probs * dp).sum() + (weights * dw).sum()).backward()
        return probs.detach(), weights.detach(), indices, x.grad

    got, want = run(ops.topk_softmax), run(ops.topk_softmax_reference)
    assert torch.equal(got[2], want[2])
    for a, b in zip(got[:2] + got[3:], want[:2] + want[3:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k, renormalize", [(2, True), (1, False)])
def test_topk_softmax_losses_and_their_gradients_equal_the_reference(k, renormalize):
    """The balancing loss and the z-loss from the kernel's sums, and the gradient that reaches
    the logits through them with the probabilities' and weights' gradients at once, against
    torch ops; and the losses equal moekit.layers.losses' functions."""
    from moekit.layers.losses import load_balancing_loss, z_loss

    g = torch.Generator().manual_seed(7 + k)
    logits = torch.randn(30, 8, generator=g) * 3
    dp, dw = torch.randn(30, 8, generator=g), torch.randn(30, k, generator=g)

    def run(fn):
        x = logits.clone().requires_grad_(True)
        probs, weights, indices, balance, z = fn(x, k, renormalize, 1.0, with_losses=True)
        ((probs * dp).sum() + (weights * dw).sum() + 0.7 * balance + 1.3 * z).backward()
        return balance.detach(), z.detach(), x.grad, probs.detach(), indices

    got, want = run(ops.topk_softmax), run(ops.topk_softmax_reference)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], load_balancing_loss(got[3], got[4], 8), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], z_loss(logits), atol=1e-5, rtol=1e-5)
