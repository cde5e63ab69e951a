"""Losses against hand-computed formulas and against transformers."""

import math

import pytest
import torch

from moekit import (
    MoE,
    MoEConfig,
    expert_weighted_loss,
    load_balancing_loss,
    sequence_balance_loss,
    z_loss,
)


def test_load_balancing_hand_case():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    indices = torch.tensor([[0], [1]])
    # f = [1/2, 1/2, 0], P = [0.4, 0.4, 0.2] -> 3 * (0.2 + 0.2) = 1.2
    assert load_balancing_loss(probs, indices, 3).item() == pytest.approx(1.2)


def test_load_balancing_balanced_and_collapsed_extremes():
    E, k, T = 4, 2, 8
    uniform = torch.full((T, E), 1 / E)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(uniform, balanced, E).item() == pytest.approx(k)
    collapsed = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).expand(T, E)
    assert load_balancing_loss(collapsed, torch.tensor([[0, 1]]).expand(T, k), E).item() == pytest.approx(k * E / 2)


def test_load_balancing_padding_mask_ignores_padding():
    probs = torch.softmax(torch.randn(6, 4), -1)
    idx = probs.topk(2, -1).indices
    mask = torch.tensor([1, 1, 1, 0, 0, 0])
    assert load_balancing_loss(probs, idx, 4, mask).item() == pytest.approx(load_balancing_loss(probs[:3], idx[:3], 4).item())


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_matches_transformers(top_k, masked):
    hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(top_k)
    logits = torch.randn(2 * 7, 6)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]) if masked else None
    ours = load_balancing_loss(torch.softmax(logits, -1), torch.softmax(logits, -1).topk(top_k, -1).indices, 6, mask)
    theirs = hf.load_balancing_loss_func((logits,), num_experts=6, top_k=top_k, attention_mask=mask)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_layer_aux_loss_is_coefficient_weighted_sum():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, aux_loss_coef=0.3, z_loss_coef=0.05)
    layer = MoE(cfg)
    out = layer(torch.randn(10, 8))
    r = out.routing
    expected = 0.3 * load_balancing_loss(r.probs, r.indices, 4) + 0.05 * z_loss(r.logits)
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    none = MoE(MoEConfig(d_model=8, d_ff=8, aux_loss_coef=0.0, z_loss_coef=0.0))(torch.randn(3, 8))
    assert none.aux_loss.item() == 0.0 and none.aux_loss.dim() == 0


def test_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected)
    assert z_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(math.log(2) ** 2)


def test_sequence_balance_loss_formula():
    # one sequence of 2 tokens, E=2, k=1: both tokens to expert 0
    probs = torch.tensor([[[0.8, 0.2], [0.6, 0.4]]])
    idx = torch.tensor([[[0], [0]]])
    # f = [2 * 2 / 2, 0] = [2, 0]; P = [0.7, 0.3] -> 1.4
    assert sequence_balance_loss(probs, idx, 2).item() == pytest.approx(1.4)
    balanced = sequence_balance_loss(torch.full((3, 4, 2), 0.5), torch.tensor([[[0], [1], [0], [1]]] * 3), 2)
    assert balanced.item() == pytest.approx(1.0)


def test_sequence_loss_is_per_sequence_not_per_batch():
    # each sequence collapsed on a different expert: batch-level balance is perfect,
    # sequence-level is not
    probs = torch.tensor([[[1.0, 0.0]] * 2, [[0.0, 1.0]] * 2])
    idx = torch.tensor([[[0]] * 2, [[1]] * 2])
    assert sequence_balance_loss(probs, idx, 2).item() == pytest.approx(2.0)
    assert load_balancing_loss(probs.view(4, 2), idx.view(4, 1), 2).item() == pytest.approx(1.0)


def test_expert_weighted_loss_formula():
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    losses = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    # token 0: 0.75 + 0.75 = 1.5; token 1: 1 + 2 = 3 -> mean 2.25
    assert expert_weighted_loss(w, losses).item() == pytest.approx(2.25)
    mask = torch.tensor([[True, False], [True, True]])
    assert expert_weighted_loss(w, losses, mask).item() == pytest.approx((0.75 + 3.0) / 2)
    with pytest.raises(ValueError, match="same shape"):
        expert_weighted_loss(w, losses[:, :1])
