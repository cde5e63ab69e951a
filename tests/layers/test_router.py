"""Routers: hand-checked small cases and hypothesis properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoEConfig
from moekit.layers.router import build_router, sinkhorn
from moekit.registry import router_names

TOKEN_CHOICE = [r for r in router_names() if r != "expert_choice"]


def make(router, E=4, k=2, d=4, **kw):
    cfg = MoEConfig(d_model=d, d_ff=8, num_experts=E, top_k=k, router=router, **kw)
    return build_router(cfg)


def test_topk_hand_case():
    r = make("topk")
    out = r.route(torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 1.0]]))
    assert out.indices.tolist() == [[0, 1], [2, 3]]
    e = math.e
    assert out.weights[0].tolist() == pytest.approx([e**2 / (e**2 + e), e / (e**2 + e)], rel=1e-6)
    assert out.weights[1].tolist() == pytest.approx([e**5 / (e**5 + e), e / (e**5 + e)], rel=1e-6)
    assert torch.allclose(out.probs.sum(-1), torch.ones(2))


def test_topk_without_renormalisation_keeps_probabilities():
    r = make("topk", renormalize=False)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    out = r.route(logits)
    p = torch.softmax(logits, -1)[0]
    assert out.weights[0].tolist() == pytest.approx([p[0].item(), p[1].item()])


def test_topk_softmax_in_float32_for_bf16_input():
    r = make("topk").to(torch.bfloat16)
    out = r(torch.randn(5, 4, dtype=torch.bfloat16))
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.float32


def test_switch_is_top1_with_raw_probability():
    r = make("switch", k=1)
    logits = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    out = r.route(logits)
    assert out.indices.tolist() == [[1]]
    e = math.e
    assert out.weights.item() == pytest.approx(e**3 / (e**3 + e + 2), rel=1e-6)


def test_noisy_topk_eval_is_clean_topk_and_training_noise_is_learned():
    torch.manual_seed(0)
    r = make("noisy_topk", d=4)
    x = torch.randn(64, 4)
    clean = make("topk", d=4)
    clean.gate.load_state_dict(r.gate.state_dict())
    r.eval()
    assert torch.equal(r(x).indices, clean(x).indices)
    r.train()
    with torch.no_grad():
        r.noise.weight.fill_(-50.0)  # softplus(-50 * x) ~ 0 where x > 0: no noise for positive inputs
    xp = x.abs() + 0.1
    assert torch.equal(r(xp).indices, clean(xp).indices)
    with torch.no_grad():
        r.noise.weight.fill_(3.0)  # large input-dependent noise changes choices
    assert not torch.equal(r(xp).indices, clean(xp).indices)
    out = r(xp)
    out.weights.sum().backward()  # weights depend on the noise scale: the noise gate learns
    assert r.noise.weight.grad is not None and r.noise.weight.grad.abs().sum() > 0


def test_sampling_draws_from_router_distribution():
    torch.manual_seed(0)
    r = make("sampling", k=1)
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(20000, 4)
    r.train()
    freq = torch.bincount(r.route(logits).indices.reshape(-1), minlength=4).float() / 20000
    assert freq.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.015)
    r.eval()
    assert (r.route(logits).indices == 3).all()


def test_sampling_without_replacement_gives_distinct_experts():
    r = make("sampling", E=4, k=4)
    r.train()
    out = r.route(torch.randn(50, 4))
    assert (out.indices.sort(-1).values == torch.arange(4)).all()


def test_sigmoid_bias_chooses_with_bias_weights_without():
    r = make("sigmoid_bias", k=1, renormalize=False)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    out = r.route(logits)
    assert out.indices.tolist() == [[3]]
    assert out.weights.item() == pytest.approx(0.5)  # sigmoid(0), the bias does not enter the weight


def test_sigmoid_bias_group_limited_and_scaled():
    r = make("sigmoid_bias", E=8, k=2, n_groups=4, topk_groups=1, routed_scaling_factor=2.5)
    # group 0 = experts 0,1; group 3 = experts 6,7. Expert 0 is best alone, but group 3's
    # top-2 sum is higher, so both choices must come from group 3.
    logits = torch.tensor([[4.0, -4.0, 0.0, 0.0, 0.0, 0.0, 3.0, 3.0]])
    out = r.route(logits)
    assert sorted(out.indices[0].tolist()) == [6, 7]
    assert out.weights.sum().item() == pytest.approx(2.5, rel=1e-6)


def test_expert_choice_each_expert_takes_its_top_tokens():
    r = make("expert_choice", E=2, k=1)
    logits = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.5]])
    out = r.route(logits)
    probs = torch.softmax(logits, -1)
    # capacity = ceil(4 * 1 / 2) = 2 tokens per expert
    assert out.mask.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    assert torch.allclose(out.weights, probs * out.mask)
    assert not r.causal


def test_expert_choice_token_can_get_many_or_no_experts():
    r = make("expert_choice", E=3, k=1)  # capacity 1: each expert takes its single best token
    out = r.route(torch.tensor([[0.0, 0.0, -10.0], [-10.0, -10.0, 0.0], [-8.0, -8.0, 0.0]]))
    assert out.mask.sum(1).tolist() == [2, 1, 0]


def test_hash_is_fixed_by_token_id_and_parameter_free():
    r = make("hash", E=8, k=2)
    assert sum(p.numel() for p in r.parameters()) == 0
    ids = torch.tensor([5, 17, 5, 99, 17])
    out = r(torch.randn(5, 4), token_ids=ids)
    assert torch.equal(out.indices[0], out.indices[2]) and torch.equal(out.indices[1], out.indices[4])
    assert (out.indices[:, 0] != out.indices[:, 1]).all()
    assert torch.allclose(out.weights, torch.full((5, 2), 0.5))
    again = r(torch.randn(5, 4), token_ids=ids)
    assert torch.equal(out.indices, again.indices)
    many = r(torch.randn(4000, 4), token_ids=torch.arange(4000))
    load = torch.bincount(many.indices.reshape(-1), minlength=8).float()
    assert load.max() / load.mean() < 1.1  # a good hash spreads ids evenly


def test_hash_without_ids_hashes_position():
    r = make("hash", E=8, k=1)
    a = r(torch.randn(6, 4), positions=torch.arange(6))
    b = r(torch.randn(6, 4), positions=torch.arange(6))
    assert torch.equal(a.indices, b.indices)


def test_sinkhorn_balances_a_skewed_router_in_training():
    torch.manual_seed(0)
    r = make("sinkhorn", E=4, k=1, sinkhorn_iters=20)
    logits = torch.tensor([3.0, 0.0, 0.0, 0.0]) + 0.5 * torch.randn(400, 4)
    r.train()
    load = torch.bincount(r.route(logits).indices.reshape(-1), minlength=4).float()
    r.eval()
    plain = torch.bincount(r.route(logits).indices.reshape(-1), minlength=4).float()
    assert plain.max() / plain.mean() > 3.5
    assert load.max() / load.mean() < 1.3


def test_sinkhorn_marginals():
    p = sinkhorn(torch.randn(12, 3), iters=50)
    assert torch.allclose(p.sum(1), torch.ones(12), atol=1e-5)
    assert torch.allclose(p.sum(0), torch.full((3,), 4.0), atol=1e-3)


@pytest.mark.parametrize("router", [r for r in router_names() if r != "hash"])
def test_jitter_changes_learned_routers_in_training_only(router):
    k = 1 if router == "switch" else 2
    r = make(router, E=4, k=k, d=16, router_jitter=0.5)
    x = torch.randn(64, 16)
    r.eval()
    torch.manual_seed(3)
    a = r(x).logits
    torch.manual_seed(4)
    assert torch.equal(a, r(x).logits)
    r.train()
    torch.manual_seed(3)
    assert not torch.equal(a, r(x).logits)


@settings(max_examples=40, deadline=None)
@given(
    router=st.sampled_from(TOKEN_CHOICE),
    T=st.integers(1, 40),
    E=st.integers(1, 16),
    data=st.data(),
    training=st.booleans(),
)
def test_token_choice_properties(router, T, E, data, training):
    k = 1 if router == "switch" else data.draw(st.integers(1, E))
    r = make(router, E=E, k=k, d=6)
    r.train(training)
    out = r(torch.randn(T, 6), token_ids=torch.randint(0, 1000, (T,)))
    assert out.indices.shape == (T, k) and out.weights.shape == (T, k)
    assert out.logits.shape == (T, E) and out.probs.shape == (T, E)
    assert ((out.indices >= 0) & (out.indices < E)).all()
    assert (out.indices.sort(-1).values.diff(dim=-1) > 0).all(), "an expert appears twice for a token"
    assert (out.weights >= 0).all()
    if router in ("topk", "noisy_topk", "sampling", "sinkhorn", "sigmoid_bias", "hash"):
        assert torch.allclose(out.weights.sum(-1), torch.ones(T), atol=1e-5)
    assert torch.allclose(out.probs.sum(-1), torch.ones(T), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 40), E=st.integers(1, 12), data=st.data())
def test_expert_choice_properties(T, E, data):
    k = data.draw(st.integers(1, E))
    r = make("expert_choice", E=E, k=k, d=6)
    out = r(torch.randn(T, 6))
    capacity = min(T, math.ceil(T * k / E))
    assert (out.mask.sum(0) == capacity).all(), "every expert takes exactly C tokens"
    assert (out.weights[~out.mask] == 0).all()
