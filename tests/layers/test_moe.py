"""The MoE layer as a user sees it: bias balancing, generic experts, bad input, counts."""

import pytest
import torch
from torch import nn

from moekit import (
    MoE,
    MoEConfig,
    count_params,
    expert_weighted_loss,
    update_router_biases,
)
from moekit.registry import router_names


def test_output_contract_on_3d_input():
    layer = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2))
    out = layer(torch.randn(2, 5, 16))
    assert out.output.shape == (2, 5, 16)
    assert out.router_logits.shape == (10, 4)
    assert out.stats.tokens_per_expert.shape == (4,)
    assert int(out.stats.tokens_per_expert.sum()) == 20
    assert int(out.stats.dropped_tokens) == 0
    assert out.aux_loss.dim() == 0


def test_bias_balancing_fixes_a_skewed_router():
    torch.manual_seed(0)
    E = 8
    layer = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=E, top_k=2, router="sigmoid_bias", bias_update_rate=0.01))
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.5)
    skew = torch.zeros(16)
    skew[:4] = 2.0  # a shifted input: a few experts win for most tokens

    def load(x):
        layer.train()
        return layer(x).stats

    def imbalance(stats):
        t = stats.tokens_per_expert.float()
        return (t.max() / t.mean()).item()

    x0 = torch.randn(1024, 16) + skew
    start = imbalance(load(x0))
    for _ in range(300):
        update_router_biases(layer, [load(torch.randn(1024, 16) + skew).router_load])
    with torch.no_grad():
        end = imbalance(load(torch.randn(4096, 16) + skew))
    assert start > 2.0, start
    assert end < 1.2, end


def test_from_experts_with_arbitrary_modules():
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)) for _ in range(4)]
    experts[3] = nn.Linear(6, 3)  # experts need not share an architecture
    layer = MoE.from_experts(experts, d_model=6, top_k=2, router="topk")
    x = torch.randn(20, 6)
    out = layer(x, return_expert_outputs=True)
    assert out.output.shape == (20, 3)
    probs = out.routing.weights
    manual = torch.zeros(20, 3)
    for t in range(20):
        for j in range(2):
            manual[t] += probs[t, j] * experts[int(out.routing.indices[t, j])](x[t : t + 1])[0]
    torch.testing.assert_close(out.output, manual)
    target = torch.randn(20, 3)
    losses = ((out.expert_outputs - target.unsqueeze(1)) ** 2).mean(-1)
    loss = expert_weighted_loss(out.routing.weights, losses, out.expert_mask)
    loss.backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in experts[0].parameters())


def test_from_experts_rejects_bad_modules():
    with pytest.raises(ValueError, match="experts must hold at least one"):
        MoE.from_experts([], d_model=4)
    with pytest.raises(ValueError, match=r"experts\[0\] must map"):
        MoE.from_experts([nn.Linear(5, 2)], d_model=4)


@pytest.mark.parametrize("router", [r for r in router_names() if r != "hash"])
def test_router_gets_gradient_through_combine_weights(router):
    k = 1 if router == "switch" else 2
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=k, router=router, renormalize=router != "topk" or k > 1,
                    aux_loss_coef=0.0, z_loss_coef=0.0)
    layer = MoE(cfg).train()
    layer(torch.randn(16, 8)).output.pow(2).sum().backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_wrong_input_width_is_a_clear_error():
    layer = MoE(MoEConfig(d_model=8, d_ff=8))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 7))


def test_check_inputs_mode_catches_nan_and_inf():
    layer = MoE(MoEConfig(d_model=4, d_ff=8, check_inputs=True))
    x = torch.randn(5, 4)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in 1 of 5 tokens"):
        layer(x)
    x[2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(x)
    with pytest.raises(ValueError, match="token_ids must have shape"):
        layer(torch.randn(5, 4), token_ids=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"expert": "gelu"},
        {"num_shared_experts": 2, "shared_expert_gate": True},
        {"num_shared_experts": 1, "d_ff_shared": 40},
        {"router": "noisy_topk"},
        {"router": "hash"},
        {"router": "topk", "router_bias": True},
        {"num_experts": 64, "top_k": 8, "d_ff": 12},
    ],
)
def test_count_params_is_exact(kw):
    cfg = MoEConfig(d_model=24, d_ff=kw.pop("d_ff", 36), **kw)
    layer = MoE(cfg)
    counted = count_params(cfg)
    assert counted.total == sum(p.numel() for p in layer.parameters())
    assert counted == layer.num_params()
    per_expert = sum(p.numel() for p in layer.experts.parameters()) // cfg.num_experts
    assert counted.active == counted.total - (cfg.num_experts - cfg.top_k) * per_expert


def test_mixtral_layer_count():
    cfg = MoEConfig(d_model=4096, d_ff=14336, num_experts=8, top_k=2)
    c = count_params(cfg)
    assert c.total == 8 * 3 * 4096 * 14336 + 8 * 4096
    assert c.active == 2 * 3 * 4096 * 14336 + 8 * 4096


def test_bias_loads_count_once_under_activation_checkpointing():
    """The bias update takes the loads the forward returned: recomputing the forward in the
    backward (torch.utils.checkpoint) changes nothing, and a forward alone moves no bias."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=8, top_k=2, router="sigmoid_bias", bias_update_rate=0.01)
    torch.manual_seed(0)
    plain = MoE(cfg)
    recomputed = MoE(cfg)
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(64, 16) + 1.0
    out = plain(x)
    out.output.sum().backward()
    stats = []

    def run(t):
        o = recomputed(t)
        stats.append(o.stats)
        return o.output

    with set_checkpoint_early_stop(False):  # recompute the whole forward
        checkpoint(run, x, use_reentrant=False).sum().backward()
    assert len(stats) == 2  # the forward ran twice
    assert torch.equal(recomputed.router.expert_bias, torch.zeros(8))  # forwards alone change nothing
    update_router_biases(plain, [out.stats.router_load])
    update_router_biases(recomputed, [stats[0].router_load])
    assert torch.equal(plain.router.expert_bias, recomputed.router.expert_bias)
    assert plain.router.expert_bias.abs().sum() > 0
    assert int(out.stats.router_load.sum()) == 64 * 2
