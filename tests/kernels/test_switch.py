"""The public switch: ``moekit.kernels.enabled(False)`` as a context manager or a call sends
every module down its torch-ops path, and says so in ``status()``."""

import pytest
import torch

from moekit import MoE, MoEConfig, kernels

pytestmark = pytest.mark.skipif(kernels.load() is None, reason=f"kernels not built here: {kernels.status()}")

WRAPPERS = ["gather_rows", "combine_backward", "topk_softmax", "topk_softmax_backward", "swiglu_segments",
            "swiglu_segments_backward", "silu_mul", "silu_mul_backward", "moe_token", "swiglu_add", "rows"]


def test_the_context_manager_turns_the_kernels_off_and_restores_them():
    t = torch.zeros(3)
    assert kernels.is_enabled() and kernels.for_tensors(t) is not None
    with kernels.enabled(False):
        assert not kernels.is_enabled() and kernels.for_tensors(t) is None
        assert kernels.status() == "cpu kernels off: disabled by moekit.kernels.enabled(False)"
        assert kernels.load() is not None  # still built, and callable directly
    assert kernels.is_enabled() and kernels.status().startswith("cpu kernels: compiled")


def test_the_call_form_holds_until_switched_back():
    try:
        kernels.enabled(False)
        assert kernels.for_tensors(torch.zeros(1)) is None
    finally:
        kernels.enabled(True)
    assert kernels.for_tensors(torch.zeros(1)) is not None
    assert kernels.for_tensors(torch.zeros(1, dtype=torch.float64)) is None  # float32 only


def test_the_switch_takes_a_bool_only():
    with pytest.raises(ValueError, match="takes True or False"):
        kernels.enabled("no")


@pytest.mark.parametrize("T", [1, 3, 40, 600])  # one token, the unsorted path, few and many rows per expert
def test_off_no_kernel_runs_and_the_results_are_the_same(T, monkeypatch):
    torch.manual_seed(T)
    moe = MoE(MoEConfig(d_model=32, d_ff=48, num_experts=4, top_k=2))
    x = torch.randn(T, 32)

    def run(grad):
        xi = x.clone().requires_grad_(grad)
        if not grad:
            with torch.no_grad():
                return [moe.eval()(xi).output]
        out = moe.train()(xi)
        out.output.square().sum().add(out.aux_loss).backward()
        grads = [xi.grad] + [p.grad.clone() for p in moe.parameters()]
        moe.zero_grad(set_to_none=True)
        return [out.output.detach()] + grads

    want = {grad: run(grad) for grad in (False, True)}
    for name in WRAPPERS:
        monkeypatch.setattr(kernels, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran with the kernels off"))
    with kernels.enabled(False):
        for grad in (False, True):
            for a, b in zip(run(grad), want[grad]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
